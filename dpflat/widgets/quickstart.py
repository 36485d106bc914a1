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

from ..figures import guarantee_pattern, is_missing, metric_label, run_color, run_label
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
            # two decimals: the accountant's 2.9929 is "2.99" (four digits suggest a precision no claim has);
            # NaN (not "inf"/"none"): no claim
            "claimed ε": math.nan if is_missing(claim) else round(float(claim), 2),
            "δ": r.get("delta"),
            "σ (noise multiplier)": r.get("sigma"),
            "q (sampling rate)": r.get("sample_rate"),
            "steps": r.get("steps"),
            "kept prefix layers": r.get("keep_layers"),
        })
    return pd.DataFrame(out)


#: what the ``count`` column of the ledger's reads counts (it is not the number of steps)
COUNT_NOTE = ("count: how many times this reader drew private batches, which is not the number of training "
              "steps. AWP's paper-mode ascent reads one raw micro-batch per step while it is active (its warm-up, "
              "awp_epochs), so its count is at most the steps of that window; the paper-mode layer scorer and teacher "
              "read many batches before training starts. Empty for DP-accounted reads: their counts follow the "
              "secret sampling and stay in private_diagnostics.json.")


def ledger_reads(ledger: Mapping[str, Any]) -> pd.DataFrame:
    """Every recorded access to the private split: who, how, DP-accounted or not, how often.

    The counts of DP-accounted reads are private (functions of the Poisson batch sizes): ledger.json
    leaves them out (empty cells here); they are in the run's private_diagnostics.json. The table's
    ``attrs["note"]`` (and its caption where pandas styles it) says what ``count`` counts.
    """
    reads = ledger.get("reads", [])
    cols = ["who", "how", "accounted", "count", "examples"]
    out = pd.DataFrame([{c: r.get(c) for c in cols} for r in reads], columns=cols)
    out.attrs["note"] = COUNT_NOTE
    return out


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
                             marker=dict(color=run_color(r), pattern_shape=guarantee_pattern(g)),
                             text=[f"{r.get(metric):.3f}" if not is_missing(r.get(metric)) else ""],
                             textposition="outside"))
    fig.update_layout(title=title or f"{metric_label(metric)} per model (label = variant · ε · guarantee)",
                      yaxis_title=metric_label(metric), showlegend=False, height=420)
    return fig


#: the columns of ``flatness_table`` that come from the sharpness trajectory: measured on the data its
#: rows name (the public split in the lessons), so not comparable with 03's λ1 on the eval split
TRAJECTORY_END = {"top_eigenvalue": "λ1 (end of training)", "sam_sharpness": "SAM sharpness (end)"}


def flatness_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Test accuracy and loss, and the last trajectory point (λ1, SAM) per run, side by side.

    The sharpness columns say the data they were measured on ("λ1 (end of training, public split)"):
    λ1 depends on the examples it is computed on, so 01's value (public split) and 03's (eval split)
    of the same model differ and are not comparable.
    """
    out, data = [], set()
    for r in map(as_row, rows):
        tr = trajectories({"x": r["run_dir"]}).get("x")
        last = tr.iloc[-1] if tr is not None else {}
        if tr is not None and "data" in tr:
            data.add(str(tr["data"].iloc[-1]))
        row = {"model": run_label(r), "test accuracy": r.get("accuracy"), "test loss": r.get("eval_loss")}
        for k, name in TRAJECTORY_END.items():
            row[name] = last.get(k, math.nan) if len(last) else math.nan
        out.append(row)
    where = " / ".join(sorted(data)) or "no trajectory"
    t = pd.DataFrame(out).rename(columns={n: f"{n[:-1]}, {where} split)" if n.endswith(")") else n
                                          for n in TRAJECTORY_END.values()})
    t.attrs["data"] = where
    return t


def payoff_figure(rows: Sequence[Mapping[str, Any]], title: str | None = None):
    """Accuracy, eval loss, λ1 and SAM sharpness per model in four panels: "flatter" and
    "as accurate" are separate questions, answered side by side."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = flatness_table(rows)
    keys = list(t.columns[1:])
    fig = make_subplots(rows=1, cols=4, subplot_titles=[k.replace(", ", ",<br>", 1) if "(" in k else k for k in keys])
    for j, k in enumerate(keys, start=1):
        for i, r in t.iterrows():
            fig.add_trace(go.Bar(x=[r["model"]], y=[r[k]], name=r["model"], legendgroup=r["model"],
                                 showlegend=(j == 1), marker_color=run_color(r["model"]),
                                 text=[f"{r[k]:.3g}" if not is_missing(r[k]) else "n/a"], textposition="outside"),
                          row=1, col=j)
        fig.update_xaxes(showticklabels=False, row=1, col=j)
    fig.update_yaxes(range=[0, 1.08], row=1, col=1)
    fig.update_layout(title=title or f"Accurate and flat? (sharpness on the {t.attrs['data']} split at the end of "
                                     "training; lower = flatter)",
                      height=440, legend=dict(orientation="h", y=-0.12), margin=dict(t=110))
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
