"""Notebook 01 (quickstart): a few runs side by side, each with the guarantee its ledger states.

Nothing here derives a privacy claim: labels and ε come from the results row or the
ledger, and a run that is not DP is never shown with an ε.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..figures import GUARANTEE_COLORS, is_missing, metric_label, run_label
from ..privacy import PrivacyLedger
from ..runs import RunDir
from .base import as_row
from .landscapes import trajectories


def ledger_label(ledger: Mapping[str, Any]) -> str:
    """The ledger's own guarantee text, e.g. "(ε, δ)-DP, ε=2.98, δ=1.2e-04" or "not DP (paper mode)"."""
    return PrivacyLedger.from_dict(dict(ledger)).label()


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One line per run: label, accuracy and the privacy numbers its ledger recorded.

    ``claimed ε`` is the row's ``epsilon`` (set only when the whole run is DP): a
    paper-mode or non-private run claims nothing, so its cell is NaN, as in every table.
    """
    out = []
    for r in map(as_row, rows):
        claim = r.get("epsilon")
        out.append({
            "model": run_label(r),
            "guarantee": r.get("guarantee"),
            "accuracy": r.get("accuracy"),
            "claimed ε": math.nan if is_missing(claim) else float(claim),  # NaN (not "inf"/"none"): no claim
            "δ": r.get("delta"),
            "σ (noise multiplier)": r.get("sigma"),
            "q (sampling rate)": r.get("sample_rate"),
            "steps": r.get("steps"),
            "kept prefix layers": r.get("keep_layers"),
        })
    return pd.DataFrame(out)


def ledger_reads(ledger: Mapping[str, Any]) -> pd.DataFrame:
    """Every recorded access to the private split: who, how, DP-accounted or not, how often.

    The counts of DP-accounted reads are private (functions of the Poisson batch sizes): ledger.json
    leaves them out (empty cells here); they are in the run's private_diagnostics.json.
    """
    reads = ledger.get("reads", [])
    cols = ["who", "how", "accounted", "count", "examples"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in reads], columns=cols)


def load_ledger(run_dir: str | Path) -> dict[str, Any]:
    """A run's ledger (through ``RunDir``: a missing or hand-edited one is refused, not shown)."""
    led = RunDir(run_dir).ledger()
    if led is None:
        raise FileNotFoundError(f"{run_dir} has no valid ledger.json (unfinished run?)")
    return led


def accuracy_bars(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy", title: str | None = None):
    """One bar per run, x = its label with the guarantee, colour = the guarantee."""
    import plotly.graph_objects as go

    rows = [as_row(r) for r in rows]
    fig = go.Figure()
    for r in rows:
        g = str(r.get("guarantee"))
        fig.add_trace(go.Bar(x=[run_label(r)], y=[r.get(metric)], name=run_label(r),
                             marker_color=GUARANTEE_COLORS.get(g, "#2ca02c"),
                             text=[f"{r.get(metric):.3f}" if not is_missing(r.get(metric)) else ""],
                             textposition="outside"))
    fig.update_layout(title=title or f"{metric_label(metric)} per model (label = variant · ε · guarantee)",
                      yaxis_title=metric_label(metric), showlegend=False, height=420)
    return fig


def flatness_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Accuracy, eval loss and the last trajectory point (λ1, SAM) per run, side by side."""
    out = []
    for r in map(as_row, rows):
        tr = trajectories({"x": r["run_dir"]}).get("x")
        last = tr.iloc[-1] if tr is not None else {}
        out.append({"model": run_label(r), "accuracy": r.get("accuracy"), "eval loss": r.get("eval_loss"),
                    "λ1 (end of training)": last.get("top_eigenvalue", math.nan) if len(last) else math.nan,
                    "SAM sharpness (end)": last.get("sam_sharpness", math.nan) if len(last) else math.nan})
    return pd.DataFrame(out)


def payoff_figure(rows: Sequence[Mapping[str, Any]], title: str | None = None):
    """Accuracy, eval loss, λ1 and SAM sharpness per model in four panels: "flatter" and
    "as accurate" are separate questions, answered side by side."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = flatness_table(rows)
    keys = ["accuracy", "eval loss", "λ1 (end of training)", "SAM sharpness (end)"]
    fig = make_subplots(rows=1, cols=4, subplot_titles=keys)
    palette = ["#1f77b4", "#2ca02c", "#7f7f7f", "#ff7f0e", "#9467bd"]
    for j, k in enumerate(keys, start=1):
        for i, r in t.iterrows():
            fig.add_trace(go.Bar(x=[r["model"]], y=[r[k]], name=r["model"], legendgroup=r["model"],
                                 showlegend=(j == 1), marker_color=palette[i % len(palette)],
                                 text=[f"{r[k]:.3g}" if not is_missing(r[k]) else "n/a"], textposition="outside"),
                          row=1, col=j)
        fig.update_xaxes(showticklabels=False, row=1, col=j)
    fig.update_yaxes(range=[0, 1.08], row=1, col=1)
    fig.update_layout(title=title or "Accurate and flat? (sharpness on public data at the end of training; lower = flatter)",
                      height=420, legend=dict(orientation="h", y=-0.12))
    return fig


def paired_accuracy_difference(run_a: str | Path, run_b: str | Path, n_boot: int = 2000, seed: int = 0,
                               split: str = "eval") -> dict[str, Any]:
    """Held-out accuracy of B minus A on the same examples, with a paired 95% bootstrap interval.

    Why paired: both models answer the same examples, so resampling examples (not models)
    removes the between-example variance that two separate intervals would double count.
    It is the interval of one seed's difference; run-to-run (seed) variance comes on top
    (``dpflat.stats.paired_differences`` adds it over several seeds).
    """
    from ..analysis import example_correct
    from ..stats import paired_interval

    a, b = example_correct(run_a, split), example_correct(run_b, split)
    lo, hi = paired_interval(b - a, n_boot=n_boot, seed=seed)
    return {"difference": float((b - a).mean()), "ci_low": lo, "ci_high": hi, "n": int(len(a)),
            "accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()), "split": split}
