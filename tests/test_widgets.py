"""The notebook panels, driven headlessly: set a control, read the figure.

Why: a widget callback that silently stops updating (or plots the wrong column, or
drops a guarantee from a label) is invisible in a notebook test that only checks
for cell errors. Here every control is moved and the figure data is checked.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from dpflat import widgets as W
from dpflat.config import PAPER_AWP_GAMMA, FlatConfig
from dpflat.engine import epsilon_for
from dpflat.privacy import DP, NOT_DP_NONPRIVATE, NOT_DP_PAPER

# Opacus hints that larger RDP orders could tighten ε at some slider settings: expected here
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")


# --------------------------------------------------------------------------- privacy sliders
def test_epsilon_curve_is_the_accountants_number_at_every_step():
    q, sigma, T, delta = 0.02, 0.9, 300, 1e-5
    ts, eps = W.epsilon_curve(sigma, q, T, delta, n_points=8)
    assert ts[0] == 1 and ts[-1] == T and np.all(np.diff(eps) > 0)
    for t, e in zip(ts[[0, 3, -1]], eps[[0, 3, -1]]):
        assert e == pytest.approx(epsilon_for("rdp", q, sigma, int(t), delta), rel=1e-9)


def test_privacy_panel_recomputes_epsilon_when_sliders_move():
    p = W.privacy_panel(sigma=1.0, sample_rate=0.01, steps=1000, delta_exp=-5, n_points=10)
    c, curve = p.controls, lambda: np.array(p.figure.data[0].y)
    e0, y0 = p.epsilon, curve()
    assert e0 == pytest.approx(epsilon_for("rdp", 0.01, 1.0, 1000, 1e-5), rel=1e-9)
    assert y0[-1] == pytest.approx(e0) and f"{e0:.3g}" in c["readout"].value

    c["sigma"].value = 2.0  # more noise: less privacy spent
    assert p.epsilon < e0 and np.all(curve() < y0)
    c["sigma"].value = 1.0
    c["delta_exp"].value = -8  # smaller δ: larger ε
    assert p.epsilon > e0
    c["delta_exp"].value = -5
    c["steps"].value = 4000  # longer training: larger ε, curve reaches the new step count
    assert p.epsilon > e0 and p.figure.data[0].x[-1] == 4000 and p.figure.data[1].x[0] == 4000
    c["steps"].value = 1000
    c["sample_rate"].value = 0.05  # larger batches per step: larger ε
    assert p.epsilon > e0
    c["sample_rate"].value = 0.01
    assert p.epsilon == pytest.approx(e0)

    y_before = curve()
    c["clip"].value = 3.0  # C does not enter ε; the readout shows the noise scale σ·C
    assert np.array_equal(curve(), y_before) and "σ·C = 3" in c["readout"].value

    c["accountant"].value = "prv"  # another accountant: a different but close number
    assert p.epsilon != e0 and p.epsilon == pytest.approx(e0, rel=0.3)


def test_panels_work_without_anywidget(monkeypatch):
    """plotly's FigureWidget needs anywidget; without it the panel keeps a plain Figure."""
    import ipywidgets as w

    monkeypatch.setattr(W.base, "figure_widget_available", lambda: False)  # new_figure looks it up there
    p = W.privacy_panel(n_points=6)
    assert type(p.figure) is go.Figure
    assert any(isinstance(ch, w.Output) for ch in p.widget.children)
    y0 = np.array(p.figure.data[0].y)
    p.controls["sigma"].value = 3.0
    assert np.all(np.array(p.figure.data[0].y) < y0)


# --------------------------------------------------------------------------- results explorer
def _rows() -> pd.DataFrame:
    """A results table as train() + analyze_run() + an audit would leave it (two seeds)."""
    rows = []
    for variant, guarantee in (("dp", DP), ("dpflat-safe", DP), ("dpflat-paper", NOT_DP_PAPER)):
        for eps in (1.0, 3.0, 8.0):
            for seed in (0, 1):
                rows.append(dict(
                    run_id=f"{variant}_{eps:g}_{seed}", variant=variant, target_epsilon=eps, seed=seed,
                    guarantee=guarantee, epsilon=eps * 0.99 if guarantee == DP else None,
                    dpsgd_part_epsilon=None if guarantee == DP else eps * 0.99,
                    accuracy=0.5 + 0.02 * eps + 0.01 * seed + (0.05 if "flat" in variant else 0.0),
                    eval_loss=0.7 - 0.01 * eps, top_eigenvalue=10.0 / eps + seed, hessian_trace=100.0 / eps,
                    sam_sharpness=0.1 / eps, mia_auc=np.nan,
                ))
    for seed in (0, 1):
        rows.append(dict(run_id=f"np_{seed}", variant="nonprivate", target_epsilon=None, seed=seed,
                         guarantee=NOT_DP_NONPRIVATE, epsilon=None, dpsgd_part_epsilon=None, accuracy=0.9 + 0.01 * seed,
                         eval_loss=0.3, top_eigenvalue=1.0, hessian_trace=5.0, sam_sharpness=0.01, mia_auc=np.nan))
    return pd.DataFrame(rows)


def _by_name(fig) -> dict[str, object]:
    return {t.name: t for t in fig.data}


def test_explorer_labels_every_line_with_the_rows_guarantee():
    ex = W.explorer(_rows())
    names = set(_by_name(ex.figure))
    assert names == {f"dp · {DP}", f"dpflat-safe · {DP}", f"dpflat-paper · {NOT_DP_PAPER}",
                     f"nonprivate · {NOT_DP_NONPRIVATE}"}
    t = _by_name(ex.figure)
    # a paper-mode point says it claims nothing; a DP point shows its claimed ε (max over seeds)
    assert all("no ε claim" in str(cd[1]) for cd in t[f"dpflat-paper · {NOT_DP_PAPER}"].customdata)
    assert [cd[1] for cd in t[f"dp · {DP}"].customdata] == ["claimed ε = 0.99", "claimed ε = 2.97", "claimed ε = 7.92"]
    ref = t[f"nonprivate · {NOT_DP_NONPRIVATE}"]
    assert ref.line.dash == "dash" and list(ref.x) == [1.0, 8.0] and ref.y[0] == pytest.approx(0.905)


def test_explorer_metric_dropdown_changes_the_plotted_values():
    ex = W.explorer(_rows())
    dp_line = lambda: _by_name(ex.figure)[f"dp · {DP}"]  # noqa: E731
    assert list(dp_line().y) == pytest.approx([0.525, 0.565, 0.665])  # accuracy, mean of two seeds
    assert list(dp_line().error_y.array) == pytest.approx([np.std([0.52, 0.53], ddof=1)] * 3)
    assert "mia_auc" not in ex.controls["metric"].options  # an all-empty column is not offered
    ex.controls["metric"].value = "top_eigenvalue"
    assert list(dp_line().y) == pytest.approx([10.5, 10 / 3 + 0.5, 10 / 8 + 0.5])
    assert ex.figure.layout.yaxis.title.text == W.METRICS["top_eigenvalue"]
    # the linked per-run figure follows: y = the metric for every run, x = the "versus" column
    runs = _by_name(ex.figures["runs"])[f"dp · {DP}"]
    assert sorted(runs.y) == pytest.approx(sorted(_rows().query("variant == 'dp'")["top_eigenvalue"]))
    ex.controls["versus"].value = "hessian_trace"
    runs = _by_name(ex.figures["runs"])[f"dp · {DP}"]
    assert sorted(runs.x) == pytest.approx(sorted(_rows().query("variant == 'dp'")["hessian_trace"]))
    ex.controls["metric"].value = "hessian_trace"  # never plotted against itself
    assert ex.controls["versus"].value == "accuracy"
    runs = _by_name(ex.figures["runs"])[f"dp · {DP}"]
    assert sorted(runs.x) == pytest.approx(sorted(_rows().query("variant == 'dp'")["accuracy"]))


def test_explorer_bottom_figure_is_against_accuracy_until_the_user_picks():
    """The text says the bottom plot is against accuracy by default (it drifted to eval_loss)."""
    ex = W.explorer(_rows())
    ex.controls["metric"].value = "top_eigenvalue"
    assert ex.controls["versus"].value == "accuracy"
    ex.controls["versus"].value = "hessian_trace"  # a user choice is kept
    ex.controls["metric"].value = "sam_sharpness"
    assert ex.controls["versus"].value == "hessian_trace"


def test_explorer_summary_has_one_epsilon_column_and_nan_for_non_private():
    s = W.explorer(_rows()).summary()
    assert not any("spent" in c for c in s.columns)
    nonpriv = s[s["variant"] == "nonprivate"]
    assert nonpriv["target_epsilon"].isna().all() and not np.isinf(s["target_epsilon"].astype(float)).any()


def test_explorer_variant_toggles_and_epsilon_range_filter_traces():
    ex = W.explorer(_rows())
    ex.controls["variants"].value = ("dp", "nonprivate")
    assert set(_by_name(ex.figure)) == {f"dp · {DP}", f"nonprivate · {NOT_DP_NONPRIVATE}"}
    assert set(ex.selection["variant"]) == {"dp", "nonprivate"}
    ex.controls["eps_range"].value = (2.0, 8.0)
    dp_line = _by_name(ex.figure)[f"dp · {DP}"]
    assert list(dp_line.x) == [3.0, 8.0]
    assert list(_by_name(ex.figure)[f"nonprivate · {NOT_DP_NONPRIVATE}"].x) == [3.0, 8.0]  # spans what is shown
    summary = ex.summary()
    assert set(summary["variant"]) == {"dp", "nonprivate"} and 1.0 not in set(summary["target_epsilon"])
    assert list(summary["claimed_epsilon"].round(2)[:2]) == [2.97, 7.92] and summary["claimed_epsilon"].isna().iloc[2]
    ex.controls["variants"].value = ("dpflat-paper",)
    assert ex.summary()["claimed_epsilon"].isna().all()  # spent noise, claims nothing


def test_explorer_picks_up_new_rows_and_metric_columns():
    table = _rows()
    ex = W.explorer(table[table["variant"] != "dpflat-paper"])
    ex.controls["variants"].value = ("dp",)
    new = table.copy()
    new["mia_auc"] = 0.5 + 0.01 * new["target_epsilon"].fillna(20)  # an audit added a column
    ex.set_table(new, metric="mia_auc")
    assert "mia_auc" in ex.controls["metric"].options and ex.controls["metric"].value == "mia_auc"
    assert ex.controls["variants"].value == ("dp",)  # the selection survives a refresh
    assert list(_by_name(ex.figure)[f"dp · {DP}"].y) == pytest.approx([0.51, 0.53, 0.58])
    assert "dpflat-paper" in ex.controls["variants"].options


def test_explorer_on_an_empty_table_says_so():
    ex = W.explorer(pd.DataFrame())
    assert len(ex.figure.data) == 0 and "no results" in ex.figure.layout.title.text
    ex.set_table(_rows())
    assert len(ex.figure.data) == 4


def test_static_figures_and_tables_take_labels_from_the_rows():
    t = _rows()
    paper = t[t["variant"] == "dpflat-paper"].iloc[0].to_dict()
    dp_row = t[t["variant"] == "dp"].iloc[0].to_dict()
    table = W.comparison_table([dp_row, paper])
    assert table.loc[1, "guarantee"] == NOT_DP_PAPER and math.isnan(table.loc[1, "claimed ε"])  # NaN as elsewhere
    assert NOT_DP_PAPER in table.loc[1, "model"] and "ε=" not in table.loc[1, "model"]
    assert "ε=0.99" in table.loc[0, "model"] and DP in table.loc[0, "model"]
    bars = W.accuracy_bars([dp_row, paper])
    assert [b.x[0] for b in bars.data] == list(table["model"])
    fig = W.metric_vs_epsilon(t, "sam_sharpness")
    assert {tr.name for tr in fig.data} == set(_by_name(W.explorer(t).figure))


# --------------------------------------------------------------------------- ablations
def test_ablation_names_are_presets_or_spell_out_the_mix():
    d = FlatConfig()
    assert W.ablation_name({}) == "dp"
    assert W.ablation_name({"awp": True, "awp_mode": "safe", "awp_gamma": d.awp_gamma}) == "dp+awp-safe"
    assert W.ablation_name({"awp": True, "awp_mode": "paper", "awp_gamma": PAPER_AWP_GAMMA}) == "dp+awp-paper"
    every = {"awp": True, "layers": True, "distill": True, "awp_mode": "safe", "layers_mode": "safe",
             "distill_mode": "safe", "awp_gamma": d.awp_gamma, "n_drop": d.n_drop, "distill_lambda": d.distill_lambda}
    assert W.ablation_name(every) == "dpflat-safe"
    assert W.ablation_name({**every, "layers_mode": "paper"}) == "dp+awp.safe+layers.paper+distill.safe"
    assert W.ablation_name({**every, "awp_gamma": 0.05, "n_drop": 1}) == "dpflat-safe_g0.05_k1"
    assert W.ablation_name({"distill": True, "distill_lambda": 0.1}) == "dp+distill-safe_l0.1"


@pytest.fixture
def tiny_base(tmp_path, shared_data):
    return W.base_config(out_dir=tmp_path / "runs", backbone="tiny-bert", data_dir=str(shared_data), train_size=128,
                         eval_size=64, public_size=64, max_length=24, prefix_len=4, batch_size=32,
                         physical_batch_size=32, epochs=1.0, lr=0.05, epsilon=1.0, progress=False,
                         checkpoint_every=100, flat={"layers_warmup_steps": 2, "layers_examples": 32,
                                                     "layers_directions": 1, "teacher_epochs": 0.5})


def test_ablation_controls_build_the_config(tiny_base):
    p = W.ablation_panel(tiny_base, epsilon=2.0)
    c = p.controls
    assert p.config().variant == "dp" and p.config().privacy.epsilon == 2.0
    assert c["awp_gamma"].disabled and c["n_drop"].max == 2  # tiny-bert: 3 layers
    c["awp"].value = True
    assert not c["awp_gamma"].disabled and p.config().flat.awp and p.config().variant == "dp+awp-safe"
    c["awp_mode"].value = "paper"  # the paper's γ comes with the paper's mode
    assert c["awp_gamma"].value == pytest.approx(PAPER_AWP_GAMMA)
    assert p.config().flat.paper_levels == ["awp"] and "not DP" in c["name"].value
    c["awp_mode"].value = "safe"
    assert c["awp_gamma"].value == pytest.approx(FlatConfig().awp_gamma) and "not DP" not in c["name"].value
    c["layers"].value, c["n_drop"].value = True, 1
    c["distill"].value, c["distill_lambda"].value = True, 0.1
    cfg = p.config()
    assert (cfg.flat.layers, cfg.flat.n_drop, cfg.flat.distill) == (True, 1, True)
    assert cfg.flat.distill_lambda == pytest.approx(0.1) and cfg.variant == "dpflat-safe_k1_l0.1"
    assert cfg.privacy.enabled and cfg.model == tiny_base.model and cfg.train == tiny_base.train


def test_ablation_live_figure_follows_on_step(tiny_base):
    p = W.ablation_panel(tiny_base)
    p.on_step({"step": 1, "epoch": 0.25, "loss": 0.9, "epsilon": 0.4})
    p.on_step({"step": 2, "epoch": 0.5, "loss": 0.7, "eval_accuracy": 0.6, "epsilon": 0.6})
    loss, acc = p.figures["live"].data
    assert list(loss.x) == [1, 2] and list(loss.y) == [0.9, 0.7]
    assert list(acc.x) == [2] and list(acc.y) == [0.6]
    assert p.controls["progress"].max == 4 and p.controls["progress"].value == 2  # 2 steps = half an epoch
    assert "0.6" in p.controls["status"].value


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread; on a busy machine it costs ~2x."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_ablation_launch_trains_live_and_compares(tiny_base, one_thread):
    from dpflat.config import apply_variant
    from dpflat.train import train

    baseline = train(apply_variant(tiny_base, "nonprivate"))  # a run already in the results table
    p = W.ablation_panel(tiny_base.replace(train={"sharpness_every": 2, "sharpness_examples": 16}))
    assert [b.x[0] for b in p.figures["compare"].data] == [W.run_label(baseline)]
    p.controls["awp"].value = True
    p.controls["awp_mode"].value = "paper"
    row = p.launch()
    assert row["variant"] == "dp+awp-paper" and row["guarantee"] == NOT_DP_PAPER and row["epsilon"] is None
    assert p.controls["status"].value.startswith("done: ")
    assert p.figures["sharpness"].layout.yaxis2.title.text == "no ε: paper mode is not DP"  # why ε stays empty
    loss = p.figures["live"].data[0]
    assert list(loss.x) == list(range(1, row["steps"] + 1))  # one point per optimiser step, live
    assert p.figures["live"].layout.title.text.endswith(f"dp+awp-paper · {NOT_DP_PAPER}")
    assert p.controls["progress"].value == p.controls["progress"].max == row["steps"]
    bars = {b.x[0]: b for b in p.figures["compare"].data}
    assert set(bars) == {W.run_label(baseline), f"dp+awp-paper · {NOT_DP_PAPER}"}
    assert bars[f"dp+awp-paper · {NOT_DP_PAPER}"].marker.line.width > 0  # the new run is outlined
    assert bars[W.run_label(baseline)].marker.line.width == 0
    # the run recorded its sharpness trajectory: drawn beside ε
    lam = p.figures["sharpness"].data[0]
    assert len(lam.x) >= 1 and lam.x[-1] == row["steps"]
    # launching the same configuration again reads the run back, and still draws its stored curves
    again = p.launch()
    assert again["run_id"] == row["run_id"] and list(p.figures["live"].data[0].x) == list(loss.x)
    assert list(p.figures["sharpness"].data[0].x) == list(lam.x)
    # ... and says so: clicking Train on a finished configuration changes no figure, only the status
    assert p.controls["status"].value.startswith("already trained, read back from its folder")
    assert "change a control" in p.controls["status"].value


# --------------------------------------------------------------------------- sweep runner
def test_sweep_runner_trains_missing_cells_then_analyses(tiny_base, monkeypatch, one_thread):
    import importlib
    from pathlib import Path

    A = importlib.import_module("dpflat.analysis")
    analysed: list[str] = []

    def fake_analyze(run_dir, **kw):  # the real one is tested in test_analysis; here: who gets analysed
        analysed.append(str(run_dir))
        (Path(run_dir) / "landscape").mkdir(exist_ok=True)
        (Path(run_dir) / "landscape" / "landscape.json").write_text("{}")
        assert kw == {"top_k": 1}

    monkeypatch.setattr(A, "analyze_run", fake_analyze)
    seen: list[pd.DataFrame] = []
    # non-private cells: the runner's logic without the accountant's cost
    r = W.sweep_runner(tiny_base, ["nonprivate"], [1.0], [0, 1], analyze_kwargs={"top_k": 1}, on_done=seen.append)
    c = r.controls
    assert len(r.grid) == 2 and len(r.missing()) == 2 and c["progress"].value == 0
    table = r.run()
    assert r.missing() == [] and c["progress"].value == 2 and c["analysis"].value == 2
    assert sorted(table["seed"]) == [0, 1] and seen and seen[0] is table
    assert sorted(analysed) == sorted(map(str, r.run_dirs()))
    assert "2/2 runs finished, 2 analysed" in c["status"].value

    T = importlib.import_module("dpflat.train")
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("a finished cell was retrained"))
    again = r.run()  # nothing missing: no training, no re-analysis
    assert len(analysed) == 2 and list(again["run_id"]) == list(table["run_id"])


def test_sweep_runner_attack_records_mia_columns_the_explorer_offers(tiny_base, monkeypatch, one_thread):
    import importlib
    import json
    from types import SimpleNamespace

    M = importlib.import_module("dpflat.mia")
    calls: list[str] = []

    def fake_attack(run_dir, **kw):  # the attack itself is tested in test_mia
        calls.append(str(run_dir))
        assert kw == {"max_per_side": 8}
        loss = SimpleNamespace(auc=0.5 + 0.1 * len(calls), tpr_at_1_fpr=0.01, accuracy=0.55, advantage=0.1)
        return SimpleNamespace(run_dir=str(run_dir), loss=loss, calibrated=None, n_members=8, n_nonmembers=8)

    monkeypatch.setattr(M, "attack_run", fake_attack)
    monkeypatch.setattr(M, "save_result", lambda res, p: (p / "mia.json").write_text(
        json.dumps({"loss": {"auc": res.loss.auc, "advantage": res.loss.advantage}})))
    r = W.sweep_runner(tiny_base, ["nonprivate"], [1.0], [0, 1], analyze=False, attack=True,
                       attack_kwargs={"max_per_side": 8})
    table = r.run()
    assert len(calls) == 2 and sorted(table["mia_auc"]) == pytest.approx([0.6, 0.7])
    ex = W.explorer(table)
    assert "mia_auc" in ex.controls["metric"].options and "mia_advantage" in ex.controls["metric"].options
    assert "mia_per_side" not in ex.controls["metric"].options  # a count, not a metric
    r.run()  # attacked runs are not attacked again
    assert len(calls) == 2
    # an attack result written before the advantage was measured is redone (04's figure needs it)
    import pathlib

    pathlib.Path(calls[0], "mia.json").write_text(json.dumps({"loss": {"auc": 0.6}}))
    assert W.needs_attack(calls[0]) and not W.needs_attack(calls[1])
    r.run()
    assert len(calls) == 3 and calls[2] == calls[0]


def test_dp_roc_bound_is_the_hypothesis_testing_region():
    fpr, tpr = W.dp_roc_bound(1.0, 1e-5)
    assert tpr[0] == pytest.approx(1e-5) and tpr[-1] == 1.0 and np.all(np.diff(tpr) >= 0)
    i = np.searchsorted(fpr, 0.01)
    assert tpr[i] == pytest.approx(min(math.e * fpr[i] + 1e-5, 1 - (1 - 1e-5 - fpr[i]) / math.e))
    assert np.all(tpr >= fpr - 1e-12)  # never below chance


# --------------------------------------------------------------------------- surfaces
def _surface(scale: float, label: str):
    from landscape import Surface

    xs = np.linspace(-1, 1, 5)
    return Surface([xs, xs], scale * (1 + np.add.outer(xs**2, xs**2)), {"label": label})


def test_surface_panel_switches_model_view_and_scale():
    s = {"flat · (ε, δ)-DP": _surface(1.0, "a"), "sharp · not DP (paper mode)": _surface(10.0, "b")}
    p = W.surface_panel(s)
    c, z = p.controls, lambda: np.asarray(p.figure.data[0].z)
    assert p.figure.data[0].type == "contour" and z().max() == pytest.approx(3.0)
    assert "flat · (ε, δ)-DP" in p.figure.layout.title.text or "flat · (ε, δ)-DP" in str(p.figure.layout.annotations)
    c["model"].value = "sharp · not DP (paper mode)"
    assert z().max() == pytest.approx(30.0)
    c["log"].value = True
    assert z().max() == pytest.approx(math.log10(30.0))
    c["kind"].value = "3d"
    assert p.figure.data[0].type == "surface" and np.asarray(p.figure.data[0].z).max() == pytest.approx(math.log10(30.0))


def test_landscape_bars_one_bar_per_model_and_quantity():
    a = {"dp · ε=3 · (ε, δ)-DP": {"top_eigenvalue": 2.0, "hessian_trace": 9.0, "sam_sharpness": 0.1, "guarantee": DP},
         "nonprivate · not DP (non-private)": {"top_eigenvalue": 1.0, "hessian_trace": 4.0, "sam_sharpness": 0.05,
                                               "guarantee": NOT_DP_NONPRIVATE}}
    fig = W.landscape_bars(a)
    assert len(fig.data) == 6
    assert [t.y[0] for t in fig.data if t.xaxis == "x"] == [2.0, 1.0]
    assert [t.y[0] for t in fig.data if t.xaxis == "x2"] == [9.0, 4.0]
    assert {t.name for t in fig.data} == set(a)


# --------------------------------------------------------------------------- set-up
def test_setup_resolves_relative_output_dirs_from_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DPFLAT_DATA_DIR", raising=False)
    rel = "out/test-widgets-setup"
    out, data_dir = W.setup_notebook(rel, data_dir=str(tmp_path))
    try:
        assert out == W.project_root() / rel and out.is_dir() and data_dir == str(tmp_path)
    finally:
        out.rmdir()


# --------------------------------------------------------------------------- Notebooks II fixes
def test_roc_starts_at_the_attacks_resolution_so_no_dp_curve_crosses_its_claim():
    """With n non-members FPR moves in steps of 1/n; below that a curve says nothing and,
    drawn at FPR 0, it sat above the claim's limit (a learner read a broken guarantee)."""
    from types import SimpleNamespace

    n = 64
    fpr = np.concatenate([[0.0, 0.0], np.arange(1, n + 1) / n])
    tpr = np.concatenate([[0.0, 1 / n], np.minimum(1.0, np.arange(1, n + 1) / n + 1 / n)])
    res = SimpleNamespace(guarantee=DP, claimed_epsilon=1.0, delta=1e-5)
    fig = W.mia_roc_figure({"dp": (fpr, tpr)}, {"dp": res})
    curve, bound = fig.data[0], fig.data[1]
    assert min(curve.x) == pytest.approx(1 / n) and min(bound.x) >= 1 / n - 1e-12
    limit = lambda x: np.minimum(1.0, math.exp(1.0) * np.asarray(x) + 1e-5)  # noqa: E731
    assert np.all(np.asarray(curve.y) <= limit(curve.x) + 1e-9)
    assert fig.layout.xaxis.range[0] == pytest.approx(math.log10(1 / n))


def test_audit_bar_of_zero_is_labelled():
    from types import SimpleNamespace

    a = SimpleNamespace(variant="dp", claimed_epsilon=3.0, guarantee=DP, epsilon_lower_bound=0.0)
    fig = W.audit_bars([a])
    assert fig.data[0].y[0] == 0 and "0" in fig.data[0].text[0] and fig.data[0].textposition == "outside"


def test_noise_vs_batch_log_axis_labels_decades_and_batch_sizes():
    fig = W.noise_vs_batch(2000, 1.0, epsilon=3.0, delta=1e-4, batch_sizes=[16, 64, 256], clip=1.0)
    assert list(fig.layout.xaxis.tickvals) == [16, 64, 256] and fig.layout.yaxis2.dtick == 1
    assert "δ = 0.0001" in fig.layout.title.text


def test_run_mechanism_gives_the_runs_own_numbers():
    from dpflat.config import RunConfig

    cfg = RunConfig().replace(data={"train_size": 1000}, train={"batch_size": 64, "epochs": 2.0})
    m = W.run_mechanism(cfg)
    assert m["n"] == 1000 and m["q"] == pytest.approx(0.064) and m["steps"] == 32
    assert m["delta"] == pytest.approx(1000 ** -1.1) and m["delta_exp"] == -4


def test_sized_presets_fill_only_what_the_notebook_left_at_none():
    p = W.sized("quick", train_size=None, epochs=3.0, flat={"n_drop": 1})
    assert p["train_size"] == W.SIZES["quick"]["train_size"] and p["epochs"] == 3.0
    assert p["flat"]["n_drop"] == 1 and p["flat"]["layers_examples"] == W.SIZES["quick"]["flat"]["layers_examples"]
    cfg = W.base_config(out_dir="x", size="full", train_size=None, eval_size=None, public_size=None, max_length=None,
                        prefix_len=None, epochs=None, batch_size=None, physical_batch_size=None, lr=None, flat=None,
                        sharpness_every=0)
    assert cfg.data.train_size == 2000 and cfg.train.sharpness_every == 0
    from dpflat.config import ConfigError

    with pytest.raises(ConfigError, match="size must be"):
        W.sized("huge")


def test_ablation_legend_explains_the_name_suffixes(tiny_base):
    p = W.ablation_panel(tiny_base)
    legend = p.controls["legend"].value
    assert "_k" in legend and "n_drop" in legend and "_g" in legend and "_l" in legend
    assert tuple(p.figures["compare"].layout.yaxis.range) == (0, 1)
    assert tuple(p.figures["live"].layout.yaxis2.range) == (0, 1)
    # right-hand axes carry their own ticks: plotly.js's default for an overlaying axis ("sync")
    # put accuracy ticks at the loss axis's grid (0.174, 0.432, ...)
    y2 = p.figures["live"].layout.yaxis2
    assert y2.tickmode == "array" and list(y2.tickvals) == [0, 0.25, 0.5, 0.75, 1]
    assert p.figures["sharpness"].layout.yaxis2.tickmode == "auto"


def test_setup_status_names_each_setup_phase_through_the_library_callback(tiny_base):
    import inspect

    from dpflat.widgets import setup as setup_mod

    cfg = tiny_base.replace(flat={"distill": True}, variant="dp+distill-safe", train={"epochs": 0.25})
    with W.SetupStatus(enabled=False) as st:
        from dpflat.train import train

        train(cfg, on_phase=st.on_phase)
    phases = [p for p, _ in st.phases]
    assert phases == [W.SETUP_PHASES["data"], W.SETUP_PHASES["distill"]]
    assert st.texts[-1] == W.SETUP_PHASES["training"] and all(s >= 0 for _, s in st.phases)
    # the status line is told, never patched in: no widget module sets an attribute of the library
    src = inspect.getsource(setup_mod)
    assert "setattr(" not in src and "import_module" not in src


# --------------------------------------------------------------------------- report
def test_report_hover_shows_the_claimed_epsilon_and_unknown_guarantees():
    from dpflat.figures import sharpness_vs_epsilon
    from dpflat.privacy import UNKNOWN

    t = _rows()
    t = t[t["variant"].isin(["dp", "dpflat-paper"])].copy()
    fig = sharpness_vs_epsilon(t, ("accuracy",))
    dp_tr = next(tr for tr in fig.data if tr.name.startswith("dp ·"))
    assert [cd[1] for cd in dp_tr.customdata] == ["claimed ε = 0.99", "claimed ε = 2.97", "claimed ε = 7.92"]
    assert "customdata[1]" in dp_tr.hovertemplate and fig.layout.width is None  # fills the page
    paper = next(tr for tr in fig.data if tr.name.startswith("dpflat-paper"))
    # not DP as a whole: a band at its mean, never points on the ε axis; the hover says why
    assert paper.customdata is None and paper.line.dash == "dash"
    assert "no ε claimed (DP-SGD part only" in paper.hovertemplate
    old = t.drop(columns=["guarantee", "epsilon"])  # a table from before the ledger columns
    names = {tr.name for tr in sharpness_vs_epsilon(old, ("accuracy",)).data}
    assert all(UNKNOWN in n for n in names)


def test_report_text_avoids_glyphs_default_fonts_lack():
    from dpflat.figures import safe_text

    assert safe_text("SAM sharpness (ρ=0.05·‖θ‖)") == "SAM sharpness (ρ=0.05·||θ||)"


def test_widgets_package_keeps_the_notebooks_names_and_small_modules():
    """One module per notebook behind one namespace: every name the notebooks use resolves on ``W``
    (each notebook's ``W.xxx`` calls), and no module of the package grows past 700 lines."""
    import re
    from pathlib import Path

    root = Path(W.__file__).parent
    assert all(len(f.read_text().splitlines()) <= 700 for f in root.glob("*.py"))
    used = set()
    for nb in (root.parents[1] / "notebooks").glob("*.ipynb"):
        used |= set(re.findall(r"\bW\.([A-Za-z_]\w*)", nb.read_text()))
    assert used and not [n for n in used if not hasattr(W, n)]
    assert set(W.__all__) <= set(dir(W))


# --------------------------------------------------------------------------- Lessons III: colours, bars, legends
def _trace_color(t):
    """The colour a trace is drawn in (bars: their fill; lines and markers: their line, else marker)."""
    if t.type == "bar":
        return t.marker.color
    return (t.line.color if t.line is not None and t.line.color else None) or t.marker.color


def _run_traces(fig):
    """(variant, colour) of every trace that names a run (its name parses to a variant some row has)."""
    from dpflat.figures import label_variant

    known = {"nonprivate", "dp", "dpflat-safe", "dpflat-paper", "dpflat"}
    out = []
    for t in fig.data:
        v = label_variant(t.name or "")
        if v in known:
            out.append((v if v != "dpflat" else "dpflat-safe", _trace_color(t), t.name))
    return out


def _attacked(table):
    """The test rows with an attack's columns: advantage growing with ε, 200 examples per side."""
    return table.assign(mia_advantage=0.02 + 0.01 * table["target_epsilon"].fillna(20.0), mia_per_side=200,
                        delta=1e-5)


def _lesson_figures(tmp_path, tiny_base):
    """Every figure builder the lessons call on runs, fed the same four runs (names as the lessons label them)."""
    from types import SimpleNamespace

    import landscape.plots as plots
    from landscape import Surface

    from dpflat.figures import eigenvalue_bars, sharpness_vs_epsilon

    table = _rows()
    attacked = _attacked(table)
    runs = {"nonprivate": NOT_DP_NONPRIVATE, "dp": DP, "dpflat-safe": DP, "dpflat-paper": NOT_DP_PAPER}
    rows, run_dirs, analyses = [], {}, {}
    for i, (v, g) in enumerate(runs.items()):
        d = tmp_path / f"run_{v}"
        d.mkdir()
        (d / "sharpness.jsonl").write_text("".join(
            f'{{"step": {s}, "top_eigenvalue": {1.0 + i + s}, "sam_sharpness": {0.1 * (i + 1)}, "data": "public"}}\n'
            for s in (0, 8)))
        row = dict(variant=v, guarantee=g, epsilon=2.99 if g == DP else None, accuracy=0.7 + 0.01 * i,
                   eval_loss=0.6, run_dir=str(d), run_id=d.name)
        rows.append(row)
        run_dirs[W.run_label(row)] = str(d)
        analyses[W.run_label(row)] = {"top_eigenvalue": 1.0 + i, "hessian_trace": 3.0, "sam_sharpness": 0.2,
                                      "guarantee": g, "eigenvalues": [1.0 + i, 0.5]}
    xs = np.linspace(-1, 1, 5)
    mia = [SimpleNamespace(variant=r["variant"], claimed_epsilon=r["epsilon"], guarantee=r["guarantee"], delta=1e-5,
                           loss=SimpleNamespace(auc=0.55, auc_ci=(0.5, 0.6))) for r in rows]
    rocs = {W.mia_label(m): (np.array([0.0, 0.01, 0.5, 1.0]), np.array([0.0, 0.02, 0.6, 1.0])) for m in mia}
    panel = W.ablation_panel(tiny_base, epsilon=1.0)
    panel.results = lambda: table  # the compare chart of the results table the panel's folder would hold
    panel.refresh_compare()
    return {
        "01 accuracy bars": W.accuracy_bars(rows),
        "01 payoff": W.payoff_figure(rows),
        "01/03 trajectory": W.trajectory_figure(run_dirs),
        "03 landscape bars": W.landscape_bars(analyses),
        "03 eigenvalues": W.color_by_run(plots.plot_eigenvalues(
            {lab: SimpleNamespace(eigenvalues=np.array(a["eigenvalues"])) for lab, a in analyses.items()})),
        "03 loss line": W.color_by_run(plots.plot_1d(
            {lab: Surface([xs], xs ** 2 * (1 + k), {"label": lab}) for k, lab in enumerate(analyses)})),
        "report eigenvalue bars": eigenvalue_bars([(lab, a) for lab, a in analyses.items()]),
        "02/04 metric vs ε": W.metric_vs_epsilon(table, "accuracy"),
        "04 explorer": W.explorer(table).figures["epsilon"],
        "04 explorer runs": W.explorer(table).figures["runs"],
        "01/04 attack beside the cost": W.attack_cost_figure(attacked),
        "04 explorer attack": W.explorer(attacked).figures["attack"],
        "report sharpness vs ε": sharpness_vs_epsilon(table),
        "05 compare": panel.figures["compare"],
        "06 MIA bars": W.mia_bars(mia),
        "06 ROC": W.mia_roc_figure(rocs, {W.mia_label(m): m for m in mia}),
    }


def test_one_colour_per_run_label_across_every_figure_of_every_lesson(tmp_path, tiny_base):
    """01's payoff drew DP blue and DP-Flat green, the trajectory right below DP grey and DP-Flat blue. Now
    every builder takes a run's colour from ``figures.run_color`` of its label: one colour per variant,
    in every figure, and different variants differ within a figure."""
    from dpflat.figures import run_color

    seen: dict[str, set[str]] = {}
    for name, fig in _lesson_figures(tmp_path, tiny_base).items():
        traces = _run_traces(fig)
        assert traces, f"{name}: no trace names a run"
        by_variant: dict[str, set[str]] = {}
        for v, colour, label in traces:
            assert colour == run_color(label), f"{name}: {label!r} drawn in {colour}, its colour is {run_color(label)}"
            by_variant.setdefault(v, set()).add(colour)
            seen.setdefault(v, set()).add(colour)
        firsts = {v: next(iter(c)) for v, c in by_variant.items()}
        assert len(set(firsts.values())) == len(firsts), f"{name}: two variants share a colour: {firsts}"
    assert all(len(c) == 1 for c in seen.values()), seen
    assert {"nonprivate", "dp", "dpflat-safe", "dpflat-paper"} <= set(seen)


def test_a_single_seed_draws_no_error_bar(tiny_base):
    """The std of one value is 0: drawn, it read as an exact measurement ("error bars" of zero height)."""
    from dpflat.figures import sharpness_vs_epsilon

    t = _rows()
    t = t[(t["seed"] == 0) | (t["variant"] == "dpflat-safe")]  # dpflat-safe has two seeds, the others one
    traces = _by_name(W.metric_vs_epsilon(t, "accuracy"))
    one = traces["dp · (ε, δ)-DP"].error_y
    two = traces["dpflat-safe · (ε, δ)-DP"].error_y
    assert one.visible is False and all(v is None for v in one.array)  # JSON null: a FigureWidget can send it
    assert two.visible and all(v > 0 for v in two.array)
    for tr in sharpness_vs_epsilon(t).data:
        if tr.error_y is not None and tr.error_y.array is not None:
            assert bool(tr.error_y.visible) == ("dpflat-safe" in tr.name), tr.name
    panel = W.ablation_panel(tiny_base, epsilon=1.0)
    panel.results = lambda: t
    panel.refresh_compare()
    for bar in panel.figures["compare"].data:
        assert bool(bar.error_y.visible) == bar.name.startswith("dpflat-safe"), bar.name


def test_legends_sit_below_figures_with_a_right_hand_axis(tiny_base):
    """plotly's default legend sits just right of the plot, over a right axis's tick labels."""
    p = W.ablation_panel(tiny_base, epsilon=1.0)
    figs = {"05 live": p.figures["live"], "05 sharpness": p.figures["sharpness"],
            "02 noise vs batch": W.noise_vs_batch(1000, 2.0, epsilon=3.0, delta=1e-5, batch_sizes=[16, 64, 256])}
    for name, fig in figs.items():
        right = [k for k in fig.layout if k.startswith("yaxis") and fig.layout[k].side == "right"]
        assert right, f"{name} has no right-hand axis (the test would check nothing)"
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0, name


def test_the_training_loss_is_labelled_a_private_diagnostic_and_paper_mode_is_on_the_button(tiny_base):
    p = W.ablation_panel(tiny_base, epsilon=1.0)
    live = p.figures["live"]
    assert "private diagnostic" in live.data[0].name and "private diagnostic" in live.layout.yaxis.title.text
    assert live.layout.yaxis2.title.text == "val accuracy"  # the live accuracy is the val split's
    assert p.controls["launch"].description == "Train"
    p.controls["awp"].value = True
    p.controls["awp_mode"].value = "paper"
    assert "not DP" in p.controls["launch"].description
    p.controls["awp_mode"].value = "safe"
    assert p.controls["launch"].description == "Train" and p.config().variant == "dp+awp-safe"


def test_flatness_table_names_the_data_its_sharpness_was_measured_on(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "sharpness.jsonl").write_text('{"step": 8, "top_eigenvalue": 4.32, "sam_sharpness": 0.3, "data": "public"}\n')
    t = W.flatness_table([dict(variant="dp", guarantee=DP, epsilon=2.9929, accuracy=0.8, eval_loss=0.5, run_dir=str(d))])
    assert t.loc[0, "λ1 (end of training, public split)"] == pytest.approx(4.32)
    assert "test accuracy" in t.columns and "accuracy" not in t.columns
    assert W.comparison_table([dict(variant="dp", guarantee=DP, epsilon=2.9929)]).loc[0, "claimed ε"] == 2.99


def test_a_relative_data_dir_is_taken_from_the_project_root_or_refused_in_one_line(tmp_path, monkeypatch):
    """The kernel runs in notebooks/ (or the lab's copy): ``../shared/data`` meant another folder there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPFLAT_DATA_DIR", "tests")  # a folder of the project root, not of the working dir
    out, _ = W.setup_notebook(str(tmp_path / "out"))
    import os

    assert os.environ["DPFLAT_DATA_DIR"] == str(W.project_root() / "tests")
    monkeypatch.setenv("DPFLAT_DATA_DIR", "../no-such-data")
    with pytest.raises(W.LessonInputError) as e:
        W.setup_notebook(str(tmp_path / "out"))
    tried = str((W.project_root() / "../no-such-data").resolve())
    lines = e.value._render_traceback_()  # what IPython prints instead of a traceback
    assert len(lines) == 1 and "\n" not in lines[0] and tried in lines[0]
    with pytest.raises(W.LessonInputError, match="no such folder"):
        W.setup_notebook(str(tmp_path / "out"), data_dir="nowhere/data")
    with pytest.raises(W.LessonInputError, match="size must be"):
        W.setup_notebook(str(tmp_path / "out"), size="huge")


def test_analyze_runs_names_the_model_and_each_phase(tiny_base, one_thread):
    """03's Hessian analysis of three models took 29 min with nothing on screen."""
    from dpflat.train import train

    row = train(tiny_base)
    status = W.StatusLine(enabled=False)
    analyses, run_dirs = W.analyze_runs([row], top_k=1, grid=3, n_examples=8, trace_matvecs=3, density_iter=2,
                                        progress=False, status=status)
    label = W.run_label(row)
    assert list(analyses) == [label] and run_dirs[label] == row["run_dir"]
    said = [t for t in status.texts if t.startswith(f"model 1/1 · {label}: ")]
    for phase in ("spectrum", "trace", "density", "SAM", "surface"):
        assert any(W.ANALYSIS_PHASES[phase] in t for t in said), (phase, said)
    order = [next(i for i, t in enumerate(said) if W.ANALYSIS_PHASES[p] in t) for p in ("spectrum", "trace", "SAM")]
    assert order == sorted(order)


def test_surface_viewer_computes_only_the_model_it_shows_and_titles_its_colour_bar():
    calls = []

    def source(axes, label):
        calls.append((axes, label))
        return None if label.startswith("nonprivate") else _surface(2.0, label)

    s = {"nonprivate · not DP (non-private)": _surface(1.0, "a"), "dp · ε=3 · (ε, δ)-DP": _surface(3.0, "b")}
    p = W.surface_panel(s, surface_source=source)
    c = p.controls
    assert p.figure.data[0].colorbar.title.text == "loss"
    c["model"].value = "dp · ε=3 · (ε, δ)-DP"
    c["axes"].value = "top-2 eigenvectors"
    assert calls == [("top-2 eigenvectors", "dp · ε=3 · (ε, δ)-DP")]
    c["log"].value = True
    assert p.figure.data[0].colorbar.title.text == "log10 loss" and len(calls) == 1  # cached
    c["axes"].value = "towards non-private"
    c["model"].value = "nonprivate · not DP (non-private)"  # it has no such surface: asked once, then known
    c["kind"].value = "3d"
    assert calls[1:] == [("towards non-private", "dp · ε=3 · (ε, δ)-DP"),
                         ("towards non-private", "nonprivate · not DP (non-private)")]
    assert "no surface" in p.figure.layout.title.text


# --------------------------------------------------------------------------- 07: neighbouring datasets
def test_the_dp_band_is_the_definition_on_threshold_events():
    """A mechanism that is exactly ε-DP (Laplace noise of scale 1/ε on a count that differs by 1) stays in the
    band; the same mechanism with a third of the noise leaves it; at ε = 0, δ = 0 the band is the curve itself."""
    from scipy import stats

    t = np.linspace(-8, 9, 2001)
    eps = 1.0
    f_without = stats.laplace.cdf(t, loc=0.0, scale=1 / eps)
    lo, hi = W.dp_cdf_band(f_without, eps, 0.0)
    inside = stats.laplace.cdf(t, loc=1.0, scale=1 / eps)
    assert np.all(inside >= lo - 1e-12) and np.all(inside <= hi + 1e-12)
    too_little_noise = stats.laplace.cdf(t, loc=1.0, scale=1 / (3 * eps))
    assert np.any(too_little_noise < lo - 1e-3) or np.any(too_little_noise > hi + 1e-3)
    lo0, hi0 = W.dp_cdf_band(f_without, 0.0, 0.0)
    assert np.allclose(lo0, f_without) and np.allclose(hi0, f_without)
    lo2, hi2 = W.dp_cdf_band(f_without, 2.0, 1e-3)
    assert np.all(lo2 <= lo + 1e-12) and np.all(hi2 >= hi - 1e-12)  # a larger ε allows more


def test_epsilon_as_odds():
    t = W.epsilon_odds([3.0], priors=(0.5, 0.01)).iloc[0]
    assert t["odds change at most (e^ε)"] == "20.1x"
    assert t["belief 50% becomes at most"] == "95.3%" and t["belief 1% becomes at most"] == "16.9%"


def test_neighbour_config_gives_d_and_d_prime_one_mechanism(tiny_base):
    for n, b in ((64, 32), (63, 32), (128, 32), (1000, 64), (100, 7)):
        cfg, note = W.neighbour_config(tiny_base.replace(data={"train_size": n}, train={"batch_size": b}), delta=1e-3)
        m = cfg.data.train_size
        assert m <= n and -(-m // b) == -(-(m + 1) // b), (n, b, m)
        assert (m == n) == ("lowered" not in note)
        assert cfg.privacy.delta == 1e-3 and cfg.variant == "dp" and cfg.train.sharpness_every == 0
        assert cfg.train.output_dir.endswith("neighbours")
    cfg, _ = W.neighbour_config(tiny_base.replace(data={"train_size": 63}, train={"batch_size": 32}))
    assert cfg.privacy.delta == pytest.approx(1 / 64 ** 1.1)  # below 1/N for D (64) and D′ (63)


def _trials(eps=3.0):
    rng = np.random.default_rng(0)
    rows = []
    for variant, g, e in (("dp", DP, eps), ("nonprivate", NOT_DP_NONPRIVATE, None)):
        for key, shift in (("without", 0.0), ("attacker", 0.3)):
            for i in range(12 if g == DP else 2):
                loss = 1.0 + shift + (rng.normal(0, 0.5) if g == DP else 0.0)
                rows.append(dict(dataset=key, repeat=i, variant=variant, guarantee=g, epsilon=e,
                                 delta=1e-3 if g == DP else None, loss_attacker=loss, loss_typical=1.0))
    return pd.DataFrame(rows)


def test_neighbour_figure_draws_the_band_only_for_a_dp_run():
    t = _trials()
    fig = W.neighbour_figure(t, "attacker", variant="dp")
    band = [tr for tr in fig.data if tr.name and tr.name.startswith("where D's curve may lie")]
    assert len(band) == 1 and "3.00" in band[0].name and "20.1" in band[0].name
    assert [tr for tr in fig.data if tr.name and "sampling error (95%, 12 runs)" in tr.name]  # D's own uncertainty
    dots = [tr for tr in fig.data if tr.mode == "markers"]
    assert sorted(len(tr.x) for tr in dots) == [12, 12]
    assert not [tr for tr in W.neighbour_figure(t, "attacker", variant="nonprivate").data
                if tr.name and tr.name.startswith("where D's curve may lie")]
    with pytest.raises(ValueError, match="no runs"):
        W.neighbour_figure(t, "typical", variant="dp")
    sep = W.separation(t, "attacker").set_index("variant")["the two overlap"]
    assert sep["dp"] == "yes" and sep["nonprivate"].startswith("no")


def test_neighbour_runs_train_one_mechanism_with_fresh_noise(tiny_base, one_thread):
    cfg, _ = W.neighbour_config(tiny_base.replace(data={"train_size": 63}))
    records = W.neighbour_records(cfg)
    assert len(W.record_table(cfg, records)) == 2
    runs = W.neighbour_runs(cfg, records, 2, nonprivate_runs=2, progress=False)
    dp_runs = runs[runs["variant"] == "dp"]
    assert sorted(dp_runs["dataset"].value_counts().items()) == [("attacker", 2), ("typical", 2), ("without", 2)]
    assert dp_runs[["steps", "sample_rate", "sigma", "delta"]].nunique().max() == 1  # one mechanism on D and D′
    assert set(dp_runs["n_private"]) == {63, 64}
    # fresh secret noise: no two DP runs on the same dataset release the same model
    for _, same in dp_runs.groupby("dataset"):
        assert same["loss_attacker"].nunique() == len(same)
    # without noise the same data gives the same model, and the added record changes it
    np_runs = runs[runs["variant"] == "nonprivate"]
    per = np_runs.groupby("dataset")["loss_attacker"]
    assert (per.nunique() == 1).all() and per.first()["attacker"] != per.first()["without"]


def test_the_band_allows_for_the_sampling_error_and_still_catches_a_broken_claim():
    """The blue band is the definition around D′'s empirical curve widened by its DKW error; D's ribbon is its
    own. Two runs of a claim that holds stay in; runs 5 standard deviations apart at a claimed ε = 0.1 do not."""
    assert W.dkw_halfwidth(16) == pytest.approx(math.sqrt(math.log(40) / 32))
    rng = np.random.default_rng(1)

    def trials(shift, eps, n=40):
        rows = [dict(dataset=k, repeat=i, variant="dp", guarantee=DP, epsilon=eps, delta=1e-5,
                     loss_attacker=rng.normal(shift if k == "attacker" else 0.0, 1.0))
                for k in ("without", "attacker") for i in range(n)]
        return pd.DataFrame(rows)

    def leaves_band(t):
        data = W.neighbour_figure(t, "attacker", variant="dp").data
        # each filled area is its lower edge (named, fill="tonexty") drawn just after its upper edge
        b = next(i for i, tr in enumerate(data) if (tr.name or "").startswith("where D's curve may lie"))
        r = next(i for i, tr in enumerate(data) if (tr.name or "").startswith("D's curve ±"))
        lo, hi = np.array(data[b].y), np.array(data[b - 1].y)
        r_lo, r_hi = np.array(data[r].y), np.array(data[r - 1].y)
        return bool(np.any((r_lo > hi + 1e-9) | (r_hi < lo - 1e-9)))

    assert not leaves_band(trials(0.0, 1.0))
    assert leaves_band(trials(5.0, 0.1))


# --------------------------------------------------------------------------- the attacker beside the cost (issue 29)
def test_the_dp_advantage_bound_is_the_corner_of_the_roc_region():
    """(e^ε − 1 + 2δ)/(e^ε + 1) is the largest TPR − FPR on the ROC bound a claim implies (``dp_roc_bound``)."""
    from dpflat.mia import dp_advantage_bound

    for eps, delta in ((0.5, 0.0), (1.0, 1e-5), (3.0, 1e-5), (8.0, 1e-3)):
        fpr, tpr = W.dp_roc_bound(eps, delta, n=20000)
        fine = np.linspace(0, 1, 200001)
        e = math.exp(eps)
        tpr_f = np.clip(np.minimum.reduce([np.ones_like(fine), e * fine + delta, 1 - (1 - delta - fine) / e]), 0, 1)
        assert dp_advantage_bound(eps, delta) == pytest.approx(float(np.max(tpr_f - fine)), abs=1e-4)
        assert np.max(tpr - fpr) <= dp_advantage_bound(eps, delta) + 1e-9
    assert dp_advantage_bound(2.0) == pytest.approx(math.tanh(1.0))
    assert dp_advantage_bound(3.0, 1e-5) == pytest.approx(0.905, abs=1e-3)  # ε = 3 allows a strong attacker


def test_the_chance_level_is_what_a_useless_attack_shows():
    """Scores of one distribution on both sides: the best-threshold advantage is about 0.89/√n, not 0."""
    from dpflat.mia import advantage_chance_level, attack_point_metrics

    rng = np.random.default_rng(0)
    n = 200
    sim = np.array([attack_point_metrics(rng.normal(size=n), rng.normal(size=n))
                    ["advantage"] for _ in range(400)])
    assert advantage_chance_level(n) == pytest.approx(float(np.mean(sim)), rel=0.08)
    assert advantage_chance_level(n, quantile=0.95) == pytest.approx(float(np.quantile(sim, 0.95)), rel=0.12)
    assert advantage_chance_level(n) == advantage_chance_level(n)  # seeded: one number per n
    assert advantage_chance_level(20_000) == pytest.approx(0.886 / math.sqrt(20_000), rel=0.1)  # the KS limit


def test_attack_cost_figure_puts_accuracy_beside_the_advantage_and_its_bound():
    from dpflat.mia import advantage_chance_level, dp_advantage_bound

    t = _attacked(_rows())
    fig = W.attack_cost_figure(t)
    left = [tr for tr in fig.data if tr.xaxis in (None, "x")]
    right = [tr for tr in fig.data if tr.xaxis == "x2"]
    runs = {tr.name for tr in left}
    assert runs == {tr.name for tr in right if "·" in tr.name}  # every run on both sides
    assert all(tr.showlegend for tr in left) and not any(tr.showlegend for tr in right if "·" in tr.name)
    dp = next(tr for tr in right if tr.name == "dp · (ε, δ)-DP")
    assert list(dp.x) == [1.0, 3.0, 8.0] and list(dp.y) == pytest.approx([0.03, 0.05, 0.10])
    bound = next(tr for tr in right if tr.name.startswith("the most any attacker"))
    assert all(y == pytest.approx(dp_advantage_bound(x, 1e-5)) for x, y in zip(bound.x, bound.y))
    assert min(bound.x) <= 0.5 and max(bound.x) >= 8.0  # its whole shape, from near 0 to near 1
    assert "odds change at most e^ε" in bound.hovertemplate
    floor = next(tr for tr in right if "learn nothing" in tr.name)
    assert floor.y[0] == pytest.approx(advantage_chance_level(200, quantile=0.95))
    np_line = next(tr for tr in right if tr.name.startswith("nonprivate"))
    assert np_line.line.dash == "dash" and list(np_line.x) == [min(bound.x), max(bound.x)]
    # rows as dicts (01's two runs), and a table no attack has touched yet: the bound alone, said so
    two = W.attack_cost_figure(t[t["variant"].isin(["dp", "dpflat-safe"]) & (t["target_epsilon"] == 3.0)
                                 & (t["seed"] == 0)].to_dict("records"))
    assert {tr.name for tr in two.data if "·" in tr.name} == {"dp · (ε, δ)-DP", "dpflat-safe · (ε, δ)-DP"}
    bare = W.attack_cost_figure(_rows().drop(columns=["mia_auc"]))
    assert not [tr for tr in bare.data if tr.xaxis == "x2" and "·" in tr.name]
    assert any("no run attacked yet" in a.text for a in bare.layout.annotations)
    # the advantage reads the private split (members): a private diagnostic, said on the panel and in the
    # release boundary every DP run's ledger states
    from dpflat.privacy import RELEASE

    assert any("private diagnostic" in a.text for a in fig.layout.annotations if "attacker" in a.text)
    assert any("mia_*" in line for line in RELEASE["private_diagnostics_not_covered"])


def test_the_explorer_shows_the_attacker_beside_the_cost_for_its_selection():
    ex = W.explorer(_attacked(_rows()))
    names = lambda: {tr.name for tr in ex.figures["attack"].data if "·" in tr.name}  # noqa: E731
    assert {"dp · (ε, δ)-DP", "dpflat-safe · (ε, δ)-DP"} <= names()
    ex.controls["variants"].value = ("dp",)
    assert names() == {"dp · (ε, δ)-DP"}
    ex.controls["eps_range"].value = (3.0, 8.0)
    dp = [tr for tr in ex.figures["attack"].data if tr.name == "dp · (ε, δ)-DP" and tr.xaxis == "x2"]
    assert list(dp[0].x) == [3.0, 8.0]


def test_the_dp_vs_nonprivate_sharpness_line_says_which_evidence_the_run_agrees_with():
    t = _rows()  # dp's λ1 = 10/ε + seed, non-private 1.0: DP sharper at every ε
    line = W.dp_vs_nonprivate_sharpness(t)
    assert "DP sharper at every ε" in line and "non-private 1 (2 seed(s))" in line and "\n" not in line
    flat = t.assign(top_eigenvalue=np.where(t["variant"] == "dp", 0.5, t["top_eigenvalue"]))
    assert "DP flatter at every ε: as arXiv 2512.19019 reports" in W.dp_vs_nonprivate_sharpness(flat)
    mixed = t.assign(top_eigenvalue=np.where((t["variant"] == "dp") & (t["target_epsilon"] == 8.0), 0.5,
                                             t["top_eigenvalue"]))
    assert "mixed" in W.dp_vs_nonprivate_sharpness(mixed)
    assert "cannot compare" in W.dp_vs_nonprivate_sharpness(t[t["variant"] != "nonprivate"])
    assert "run the landscape analysis" in W.dp_vs_nonprivate_sharpness(t.drop(columns=["top_eigenvalue"]))


def test_live_figures_hold_no_nan_a_figure_widget_cannot_send():
    """jupyter_client refuses NaN in a widget message and prints a warning into the lesson (seen in 04's
    explorer, one per update): the explorer's figures carry None where a value is missing, never NaN."""
    import json

    t = _attacked(_rows())
    t = t[t["seed"] == 0]  # one seed: no error bars anywhere
    ex = W.explorer(t)
    for name, fig in ex.figures.items():
        json.dumps(fig.to_plotly_json()["data"], allow_nan=False, default=lambda o: o.tolist())  # raises on NaN
