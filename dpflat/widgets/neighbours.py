"""Notebook 07 (neighbouring datasets): the definition of (ε, δ)-DP, made concrete.

A training algorithm M is (ε, δ)-DP when, for any two datasets D and D′ that differ in one
record and any set S of outcomes, P[M(D) ∈ S] ≤ e^ε · P[M(D′) ∈ S] + δ. Here M is
``dpflat.train.train`` itself: the lesson trains it many times on D′ (a small private split)
and on D = D′ plus one record, each run with fresh secret noise (the library's default: OS
entropy), and compares the distributions of a statistic of the released model. Everything
trained or measured goes through the library (``train``, ``audit.make_canaries``,
``mia.load_run_model``, ``mia.example_losses``); this module orders the runs and draws them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import RunConfig, apply_variant
from ..figures import LEGEND_BELOW
from .base import fmt_delta

#: the datasets of the lesson: D′ (the private split), and D′ plus one record, two ways
DATASETS = {
    "without": "D′: the private split",
    "typical": "D = D′ + r (a typical record)",
    "attacker": "D = D′ + r* (the attacker's record)",
}
#: one colour per dataset in every figure of the lesson (datasets, not runs: not the run palette)
DATASET_COLORS = {"without": "#7f7f7f", "typical": "#1f77b4", "attacker": "#d62728"}


def epsilon_odds(epsilons: Sequence[float], priors: Sequence[float] = (0.5, 0.01)) -> pd.DataFrame:
    """ε as odds: how much one released output can move an attacker's belief that a record was in D.

    For an (ε, 0)-DP release, the likelihood ratio of any output under D and D′ is at most e^ε, so by
    Bayes the attacker's odds (in / out) are multiplied by at most e^ε: a prior p becomes at most
    p·e^ε / (p·e^ε + 1 − p). (δ is the probability that this factor does not hold.)
    """
    rows = []
    for e in epsilons:
        f = math.exp(float(e))
        row: dict[str, Any] = {"ε": float(e), "odds change at most (e^ε)": f"{f:.3g}x"}
        for p in priors:
            post = p * f / (p * f + 1 - p)
            row[f"belief {p:.0%} becomes at most"] = f"{post:.1%}"
        rows.append(row)
    return pd.DataFrame(rows)


def neighbour_config(base: RunConfig, delta: float | None = None, subfolder: str = "neighbours") -> tuple[RunConfig, str]:
    """The lesson's run config, with D′ (``train_size`` records) and D (one more) trained by the same mechanism.

    Why: the library derives the number of steps T = epochs · ⌈N/B⌉, the sampling rate q = 1/⌈N/B⌉ and the
    default δ = 1/N^1.1 from the private split's size N. If D and D′ differed in any of them, the released
    step count (or σ) alone would tell them apart, and the comparison would not be of one mechanism on two
    datasets. So N is lowered (by as little as needed) until N and N + 1 give the same ⌈N/B⌉, and δ is fixed
    (``delta``, else 1/(N + 1)^1.1, below 1/N for both). Runs go to ``<output_dir>/<subfolder>``, apart from the
    other lessons' results table. Returns ``(config, a sentence saying what was set)``.
    """
    n, b = int(base.data.train_size or 0), int(base.train.batch_size)
    if n < 2:
        raise ValueError(f"train_size must be at least 2 here (D′ has train_size records), got {n}")
    n0 = n
    while n > 1 and -(-n // b) != -(-(n + 1) // b):
        n -= 1
    d = float(delta) if delta is not None else 1.0 / (n + 1) ** 1.1
    out = Path(base.train.output_dir) / subfolder
    cfg = apply_variant(base, "dp").replace(data={"train_size": n}, privacy={"delta": d},
                                            train={"output_dir": str(out), "sharpness_every": 0})
    steps = max(1, int(round(cfg.train.epochs * -(-n // b))))
    note = (f"D′ has N = {n} records and D has {n + 1}" + (f" (train_size {n0} lowered to {n}: {n0} and {n0 + 1} "
                                                          f"records would take different numbers of steps)"
                                                          if n != n0 else "")
            + f"; both: batch {b}, q = 1/{-(-n // b)}, {steps} steps, δ = {fmt_delta(d)} (fixed), target ε = "
            f"{cfg.privacy.epsilon:g}")
    return cfg, note


def neighbour_records(cfg: RunConfig, seed: int = 0):
    """Two records outside the run's splits (rows of the train file no split uses): a typical one, with
    its true label, and the one an attacker picks, mislabelled (``dpflat.audit.make_canaries``'s
    canary: a record the model can only fit by memorising it, so its presence shows most).

    Returns ``{"typical": Dataset, "attacker": Dataset}``, one row each (the task's columns + ``idx``).
    """
    from datasets import Dataset

    from ..audit import make_canaries

    rows, _included, true = make_canaries(cfg, 2, seed)
    d = rows.select([0]).to_dict()
    d["label"] = [int(true[0])]  # the typical record keeps its true label
    typical = Dataset.from_dict(d, features=rows.features)
    return {"typical": typical, "attacker": rows.select([1])}


def record_table(cfg: RunConfig, records: Mapping[str, Any]) -> pd.DataFrame:
    """The records as a learner reads them: text, label, and whether the label is the true one."""
    from ..data import get_task

    card = get_task(cfg.data.task)
    out = []
    for key, ds in records.items():
        r = ds[0]
        out.append({"record": "r (typical)" if key == "typical" else "r* (the attacker's pick)",
                    "text": " / ".join(str(r[c]) for c in ("text_a", "text_b") if r.get(c)),
                    "label": card.label_names[int(r["label"])] if int(r["label"]) < len(card.label_names)
                    else r["label"],
                    "label is": "its true label" if key == "typical" else "wrong (flipped): an outlier",
                    "train-file row": int(r["idx"])})
    return pd.DataFrame(out)


def _record_losses(run_dir: str | Path, tokenised: Mapping[str, Any]) -> dict[str, float]:
    """The released model's loss on each record (a function of the released model: post-processing)."""
    from ..mia import example_losses, load_run_model

    _cfg, model = load_run_model(run_dir)
    return {k: float(example_losses(model, ds)["loss"][0]) for k, ds in tokenised.items()}


def neighbour_runs(cfg: RunConfig, records: Mapping[str, Any], runs: int, *, nonprivate_runs: int = 2,
                   progress: bool = True) -> pd.DataFrame:
    """Train ``cfg`` ``runs`` times on each of D′ and D′ + each record, and read the released models.

    Each run is a separate ``train`` call with its own run folder (``run_name`` names the dataset, the
    record and the repeat, so a finished run is read back, never confused with another) and fresh secret
    noise (no ``noise_seed``: OS entropy). ``nonprivate_runs`` more runs per dataset train the same
    prefix without DP, for contrast. Returns one row per run: dataset, repeat, guarantee, ε, test
    accuracy and the released model's loss on each record.
    """
    from ..models import load_tokenizer
    from ..runs import run_id
    from ..sweep import trainer
    from ..tokens import tokenize
    from .setup import StatusLine

    tok = load_tokenizer(cfg.model)
    tokenised = {k: tokenize(ds, tok, cfg.data.max_length, cfg.data.cache_dir) for k, ds in records.items()}
    ids = {k: int(ds[0]["idx"]) for k, ds in records.items()}
    plan = []
    for private, n in ((True, runs), (False, nonprivate_runs)):
        c = cfg if private else apply_variant(cfg, "nonprivate")
        for i in range(n):
            for key in DATASETS:
                if key != "without" and key not in records:
                    continue
                if not private and key == "typical":
                    continue  # the contrast needs one pair: D′ and the attacker's D
                tag = "without" if key == "without" else f"{key}-r{ids[key]}"
                # the config's own id first: a changed setting never reads back a run of the old one
                plan.append((key, i, c.replace(train={"run_name": f"{run_id(c)}_{tag}_{i:03d}", "progress": False})))
    len_private = int(cfg.data.train_size or 0)
    out = []
    with StatusLine(enabled=progress) as status:
        for j, (key, i, c) in enumerate(plan, start=1):
            status.set(f"run {j}/{len(plan)}: {c.variant} on {DATASETS[key]} (repeat {i + 1})")
            extra = None if key == "without" else records[key]
            row = trainer(c)(c, extra_private=extra)  # noise_seed=None: fresh secret noise for every run
            losses = _record_losses(row["run_dir"], tokenised)
            out.append({"dataset": key, "repeat": i, "variant": c.variant, "guarantee": row.get("guarantee"),
                        "n_private": len_private + (0 if extra is None else len(extra)),
                        "steps": row.get("steps"), "sample_rate": row.get("sample_rate"), "sigma": row.get("sigma"),
                        "epsilon": row.get("epsilon"), "delta": row.get("delta"), "accuracy": row.get("accuracy"),
                        **{f"loss_{k}": v for k, v in losses.items()}, "run_dir": row["run_dir"]})
    return pd.DataFrame(out)


def dp_cdf_band(cdf: np.ndarray, epsilon: float, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Where P[statistic ≤ t] under D may lie, given its value ``cdf`` under D′, if the training is (ε, δ)-DP.

    The definition, applied to the event {statistic ≤ t} and to its complement, both ways round:
    max(e^-ε(F′ − δ), 1 − e^ε(1 − F′) − δ) ≤ F ≤ min(e^ε F′ + δ, 1 − e^-ε(1 − F′ − δ)).
    """
    f = np.asarray(cdf, dtype=float)
    e = math.exp(epsilon)
    hi = np.minimum.reduce([np.ones_like(f), e * f + delta, 1.0 - (1.0 - f - delta) / e])
    lo = np.maximum.reduce([np.zeros_like(f), (f - delta) / e, 1.0 - e * (1.0 - f) - delta])
    return np.clip(lo, 0.0, 1.0), np.clip(hi, 0.0, 1.0)


def dkw_halfwidth(n: int, level: float = 0.95) -> float:
    """Half-width of the Dvoretzky–Kiefer–Wolfowitz band: with probability ``level`` an empirical CDF of
    ``n`` runs lies within this distance of the true one, at every threshold at once."""
    return math.sqrt(math.log(2.0 / (1.0 - level)) / (2.0 * max(int(n), 1)))


def _cdf(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    v = np.sort(np.asarray(values, dtype=float))
    return np.searchsorted(v, grid, side="right") / max(len(v), 1)


def neighbour_figure(runs: pd.DataFrame, record: str, *, variant: str | None = None, title: str | None = None):
    """The distribution of the released model's loss on ``record`` ("typical" or "attacker") under D′ and
    under D = D′ + that record: the values of every run (left), and P[loss ≤ t] under both (right).

    The blue band is where D's curve may lie if the runs are (ε, δ)-DP: the definition (``dp_cdf_band``)
    applied around D′'s curve, widened by that curve's own sampling error (``dkw_halfwidth``: a few dozen
    runs estimate a distribution only roughly). D's curve carries its sampling error too (a ribbon in its
    colour). Both hold with 95% each, so if the claim is true, D's ribbon meets the blue band at every
    threshold with at least 90% probability: a ribbon entirely outside it somewhere contradicts the claim.
    A run that is not DP has no band.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from ..privacy import DP

    t = runs if variant is None else runs[runs["variant"] == variant]
    stat = f"loss_{record}"
    a, b = t[t["dataset"] == record], t[t["dataset"] == "without"]
    if a.empty or b.empty:
        raise ValueError(f"no runs on both D′ and D = D′ + {record} to compare")
    va, vb = a[stat].to_numpy(float), b[stat].to_numpy(float)
    name = "r" if record == "typical" else "r*"
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.1,
                        subplot_titles=[f"released model's loss on {name}, one dot per run",
                                        f"P[loss on {name} ≤ t] under D and D′"])
    for key, vals, y in (("without", vb, 0), (record, va, 1)):
        jitter = np.random.default_rng(y).uniform(-0.15, 0.15, len(vals))  # display only: dots side by side
        fig.add_trace(go.Scatter(x=vals, y=y + jitter, mode="markers", name=f"{DATASETS[key]} ({len(vals)} runs)",
                                 legendgroup=key, marker=dict(color=DATASET_COLORS[key], size=8, opacity=0.7)),
                      row=1, col=1)
    fig.update_yaxes(tickvals=[0, 1], ticktext=["D′", "D"], range=[-0.6, 1.6], row=1, col=1)
    lo_x, hi_x = float(min(va.min(), vb.min())), float(max(va.max(), vb.max()))
    pad = 0.05 * (hi_x - lo_x) or 0.05 * max(abs(hi_x), 1e-3)
    grid = np.linspace(lo_x - pad, hi_x + pad, 400)
    guarantee = set(t["guarantee"].astype(str))
    eps = pd.to_numeric(t["epsilon"], errors="coerce").max()
    delta = pd.to_numeric(t["delta"], errors="coerce").max()
    fb, fa = _cdf(vb, grid), _cdf(va, grid)
    cb, ca = dkw_halfwidth(len(vb)), dkw_halfwidth(len(va))
    if guarantee == {DP} and not math.isnan(eps):
        lo = dp_cdf_band(np.clip(fb - cb, 0, 1), float(eps), float(delta))[0]
        hi = dp_cdf_band(np.clip(fb + cb, 0, 1), float(eps), float(delta))[1]
        fig.add_trace(go.Scatter(x=grid, y=hi, mode="lines", line=dict(width=0), showlegend=False, hoverinfo="skip"),
                      row=1, col=2)
        fig.add_trace(go.Scatter(x=grid, y=lo, mode="lines", line=dict(width=0), fill="tonexty",
                                 fillcolor="rgba(31,119,180,0.15)", hoverinfo="skip",
                                 name=f"where D's curve may lie if the runs are ({eps:.2f}, {fmt_delta(delta)})-DP "
                                      f"(factor e^ε = {math.exp(eps):.3g}; widened by D′'s sampling error)"),
                      row=1, col=2)
        band = f"ε = {eps:.2f}, δ = {fmt_delta(delta)}"
    else:
        band = "no ε: " + " / ".join(sorted(guarantee))
    # D's sampling error: a ribbon of ± its DKW half-width around its curve
    fig.add_trace(go.Scatter(x=grid, y=np.clip(fa + ca, 0, 1), mode="lines", line=dict(width=0, shape="hv"),
                             showlegend=False, hoverinfo="skip"), row=1, col=2)
    fig.add_trace(go.Scatter(x=grid, y=np.clip(fa - ca, 0, 1), mode="lines", line=dict(width=0, shape="hv"),
                             fill="tonexty", fillcolor=_rgba(DATASET_COLORS[record], 0.12), hoverinfo="skip",
                             name=f"D's curve ± its sampling error (95%, {len(va)} runs)"), row=1, col=2)
    for key, f in (("without", fb), (record, fa)):
        fig.add_trace(go.Scatter(x=grid, y=f, mode="lines", line=dict(color=DATASET_COLORS[key], shape="hv", width=2),
                                 name=f"P[loss ≤ t] on {DATASETS[key].split(':')[0].split(' (')[0]}",
                                 legendgroup=key), row=1, col=2)
    fig.update_xaxes(title_text=f"loss on {name}", row=1, col=1)
    fig.update_xaxes(title_text="threshold t", row=1, col=2)
    fig.update_yaxes(title_text="probability", range=[-0.02, 1.02], row=1, col=2)
    v = t["variant"].iloc[0] if t["variant"].nunique() == 1 else " / ".join(sorted(set(t["variant"])))
    fig.update_layout(title=title or f"{v}: D′ vs D = D′ + {name} ({band})", height=460, legend=LEGEND_BELOW,
                      margin=dict(b=150))
    return fig


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)},{int(h[2:4], 16)},{int(h[4:6], 16)},{alpha})"


def separation(runs: pd.DataFrame, record: str) -> pd.DataFrame:
    """Per variant: the loss on ``record`` under D′ and under D (mean, min, max over runs), and whether the
    two sets of runs overlap at all (without overlap one observation tells D from D′ for sure)."""
    out = []
    stat = f"loss_{record}"
    for v, t in runs.groupby("variant", sort=False):
        a, b = t[t["dataset"] == record][stat], t[t["dataset"] == "without"][stat]
        if a.empty or b.empty:
            continue
        overlap = not (a.min() > b.max() or b.min() > a.max())
        out.append({"variant": v, "guarantee": t["guarantee"].iloc[0], "runs per dataset": f"{len(b)} / {len(a)}",
                    "D′: mean [min, max]": f"{b.mean():.4f} [{b.min():.4f}, {b.max():.4f}]",
                    "D: mean [min, max]": f"{a.mean():.4f} [{a.min():.4f}, {a.max():.4f}]",
                    "the two overlap": "yes" if overlap else "no: one run tells D from D′"})
    return pd.DataFrame(out)
