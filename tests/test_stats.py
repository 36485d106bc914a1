"""Paired statistics (dpflat/stats.py) on synthetic tables with a known difference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dpflat import stats
from dpflat.sweep import markdown, summarize

N_TEST, SEEDS = 400, 5


def _vectors(diff: float, gap: float, seed: int = 0):
    """Per seed: baseline correctness, a variant exactly ``diff`` better, non-private ``gap`` better."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(SEEDS):
        base = np.zeros(N_TEST)
        base[rng.permutation(N_TEST)[: int(0.6 * N_TEST)]] = 1
        wrong = np.flatnonzero(base == 0)
        pick = rng.permutation(wrong)
        var, npv = base.copy(), base.copy()
        var[pick[: int(round(diff * N_TEST))]] = 1
        npv[pick[: int(round(gap * N_TEST))]] = 1
        out[s] = {"dp": base, "better": var, "same": base.copy(), "nonprivate": npv}
    return out


def _table(vecs, epsilons=(3.0,)):
    rows = []
    for s, by in vecs.items():
        for v, c in by.items():
            for e in ([None] if v == "nonprivate" else epsilons):
                rows.append({"task": "sst2", "variant": v, "target_epsilon": e, "seed": s, "accuracy": c.mean(),
                             "guarantee": "x", "epsilon_spent": np.nan, "run_dir": f"{v}|{s}"})
    return pd.DataFrame(rows)


def _lookup(vecs):
    def correct(row):
        v, s = row["run_dir"].split("|")
        return vecs[int(s)][v]
    return correct


def test_known_difference_and_gap():
    vecs = _vectors(diff=0.05, gap=0.10)
    t = _table(vecs)
    p = stats.paired_differences(t, "dp", correct=_lookup(vecs), n_boot=1000).set_index("variant")
    better, same = p.loc["better"], p.loc["same"]
    assert better.mean_diff == pytest.approx(0.05) and better.n_pairs == SEEDS
    assert better.ci_low > 0 and better.ci_high < 0.10 and not better.crosses_zero
    assert better.gap_closed == pytest.approx(0.5)
    assert better.gap_ci_low < 0.5 < better.gap_ci_high
    assert same.mean_diff == 0 and same.crosses_zero
    assert better.method == "bootstrap over seeds and test examples"
    # the non-private variant pairs with dp at every ε: its difference is the gap
    assert p.loc["nonprivate"].mean_diff == pytest.approx(0.10)


def test_interval_covers_the_true_difference():
    """Coverage of the 95% interval for a noisy, truly +0.03 variant (both models err at random)."""
    rng = np.random.default_rng(1)
    hits = 0
    reps = 40
    for r in range(reps):
        vecs = {}
        for s in range(SEEDS):
            shift = rng.normal(0, 0.01)  # seed-to-seed variation of the true difference
            base = (rng.random(N_TEST) < 0.70).astype(float)
            var = (rng.random(N_TEST) < 0.73 + shift).astype(float)
            vecs[s] = {"dp": base, "better": var}
        p = stats.paired_differences(_table(vecs), "dp", correct=_lookup(vecs), n_boot=300, seed=r)
        row = p.set_index("variant").loc["better"]
        hits += row.ci_low <= 0.03 <= row.ci_high
    assert hits / reps >= 0.85


def test_without_predictions_falls_back_to_seeds():
    vecs = _vectors(diff=0.05, gap=0.10)
    t = _table(vecs)
    p = stats.paired_differences(t, "dp", correct=lambda row: None, n_boot=500).set_index("variant")
    assert p.loc["better"].method == "bootstrap over seeds only"
    assert p.loc["better"].mean_diff == pytest.approx(0.05)
    assert p.loc["better"].ci_low == pytest.approx(0.05)  # identical per-seed differences: no seed noise


def test_unpaired_seeds_are_left_out_and_missing_baseline_gives_empty():
    vecs = _vectors(diff=0.05, gap=0.10)
    t = _table(vecs)
    t = t[~((t["variant"] == "dp") & (t["seed"] == 0))]
    p = stats.paired_differences(t, "dp", correct=_lookup(vecs), n_boot=200).set_index("variant")
    assert p.loc["better"].n_pairs == SEEDS - 1
    assert stats.paired_differences(t, "no-such-baseline").empty


def test_summarize_reads_saved_predictions(tmp_path):
    """summarize/markdown: paired columns from each run's test_predictions.npz; old tables still work."""
    vecs = _vectors(diff=0.05, gap=0.10)
    t = _table(vecs)
    dirs = []
    for r in t.itertuples():
        d = tmp_path / f"{r.variant}_{r.seed}_{r.target_epsilon}"
        d.mkdir()
        c = vecs[r.seed][r.variant]
        np.savez(d / stats.PREDICTIONS, idx=np.arange(N_TEST), correct=c.astype(bool))
        dirs.append(str(d))
    t["run_dir"] = dirs
    t["val_accuracy"] = t["accuracy"]
    s = summarize(t, n_boot=300).set_index("variant")
    assert s.loc["better", "diff"] == pytest.approx(0.05) and not s.loc["better", "crosses_zero"]
    assert s.loc["same", "crosses_zero"] and pd.isna(s.loc["dp", "diff"])
    md = markdown(s.reset_index())
    assert "Δ vs dp" in md and "(crosses 0)" in md and "val (mean)" in md
    old = t.drop(columns=["val_accuracy", "run_dir"])  # a table from before val/test and predictions
    s_old = summarize(old, n_boot=100)
    assert "val_mean" not in s_old and "Δ vs dp" in markdown(s_old)
    assert "Δ vs" not in markdown(summarize(old, baseline=None))


def test_paired_interval_is_seeded_and_brackets_the_mean():
    """One pair of runs (the notebooks' paired difference): examples resampled, the seed fixes the draw."""
    rng = np.random.default_rng(0)
    diff = rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=300)
    a = stats.paired_interval(diff, n_boot=300, seed=1)
    assert a == stats.paired_interval(diff, n_boot=300, seed=1) != stats.paired_interval(diff, n_boot=300, seed=2)
    assert a[0] < diff.mean() < a[1] and a[1] - a[0] < 0.3
    assert stats.paired_interval(np.zeros(50), n_boot=20) == (0.0, 0.0)


def test_a_cells_interval_does_not_move_when_other_cells_join_the_table():
    """Each compared cell has its own bootstrap stream: adding another task's runs (or a new
    variant) to the table leaves the intervals already reported where they were."""
    vecs = _vectors(diff=0.05, gap=0.10)
    t = _table(vecs)
    one = stats.paired_differences(t, "dp", correct=_lookup(vecs), n_boot=300).set_index("variant")
    other = t.assign(task="aaa")  # sorts before sst2: with one shared stream it would shift sst2's draws
    both = stats.paired_differences(pd.concat([other, t]), "dp", correct=_lookup(vecs), n_boot=300)
    both = both[both["task"] == "sst2"].set_index("variant")
    for col in ("ci_low", "ci_high", "gap_ci_low", "gap_ci_high"):
        assert both.loc["better", col] == one.loc["better", col]
