"""Figures, labels and tables shared by the notebook panels (``widgets``), the HTML report
(``report``) and the sweep summary (``sweep.summarize``).

Why a module: they show the same numbers in different pages; a metric's name, the
mean ± std over seeds, a run's label or a layout fix (a fixed width that cut off a
panel, a glyph missing from default fonts) belongs in one place.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .privacy import DP, NOT_DP_NONPRIVATE, NOT_DP_PAPER, UNKNOWN

# Metric columns of the results table and their axis labels; MIA columns (``mia_*``) are
# plotted under their own names as they appear.
METRICS: dict[str, str] = {
    "accuracy": "test accuracy",  # the test split (the task's eval file), checkpoint selected on val
    "eval_loss": "test loss",
    "val_accuracy": "val accuracy",  # absent from run folders older than the val split: offered only if present
    "top_eigenvalue": "top Hessian eigenvalue λ1",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness",
}
GUARANTEE_COLORS = {DP: "#1f77b4", NOT_DP_PAPER: "#d62728", NOT_DP_NONPRIVATE: "#7f7f7f"}

#: where a legend goes when the figure has a right-hand axis: below the plot, clear of both axes' ticks
#: (plotly's default legend sits just right of the plot, over a right axis's tick labels)
LEGEND_BELOW = dict(orientation="h", xanchor="left", x=0.0, yanchor="top", y=-0.22)

# --------------------------------------------------------------------------- one colour per run
# The lessons' variants keep one colour in every figure of every lesson (a learner follows "the green
# model" from 01's payoff to 03's spectrum to 06's ROC); any other variant gets a colour from its name.
VARIANT_COLORS: dict[str, str] = {
    "nonprivate": "#7f7f7f",      # grey: no guarantee, the reference
    "dp": "#1f77b4",              # blue: plain DP-SGD
    "dpflat-safe": "#2ca02c",     # green: DP-Flat, safe mode (DP)
    "dpflat-paper": "#d62728",    # red: DP-Flat, paper mode (not DP)
    "dp+awp-safe": "#ff7f0e",
    "dp+awp-paper": "#8c564b",
    "dp+layers-safe": "#9467bd",
    "dp+layers-paper": "#e377c2",
    "dp+distill-safe": "#17becf",
    "dp+distill-paper": "#bcbd22",
    "bb-nonprivate": "#525252",
    "bb-dp": "#6baed6",
    "bb-dpflat-safe": "#74c476",
    "bb-dpflat-paper": "#fb6a4a",
}
# for variants outside the table (ablation mixes such as "dp+awp+layers-safe_k1"): picked by a stable
# checksum of the name, so the same name gets the same colour in every process
_EXTRA_COLORS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                 "#756bb1", "#636363", "#a55194", "#ce6dbd", "#de9ed6", "#9c9ede", "#cedb9c", "#e7cb94")
#: variants named without their mode mean the default (safe) mode, as ``apply_variant`` does
_DEFAULT_MODE = {"dpflat": "dpflat-safe", "dp+awp": "dp+awp-safe", "dp+layers": "dp+layers-safe",
                 "dp+distill": "dp+distill-safe", "bb-dpflat": "bb-dpflat-safe"}


def label_variant(label: str | Mapping[str, Any]) -> str:
    """The variant a figure label names: its first part ("dp · ε=3 · (ε, δ)-DP" -> "dp"), or a row's."""
    if isinstance(label, Mapping):
        return str(label.get("variant", "?"))
    return str(label).split(" · ")[0].strip()


def run_color(label: str | Mapping[str, Any]) -> str:
    """The one colour of a run in every figure: a function of its variant only.

    ``label`` is a figure label (``run_label``, ``group_label``, "variant · guarantee"), a
    variant name, or a results row. The same variant keeps its colour across figures and lessons;
    its guarantee is in the label's text, never in the colour alone.
    """
    import zlib

    v = label_variant(label)
    v = _DEFAULT_MODE.get(v, v)
    if v in VARIANT_COLORS:
        return VARIANT_COLORS[v]
    return _EXTRA_COLORS[zlib.crc32(v.encode("utf-8")) % len(_EXTRA_COLORS)]


def guarantee_pattern(guarantee: Any) -> str:
    """A bar's fill pattern from its guarantee: hatched when the run is not DP because of paper mode,
    crossed when its guarantee is unknown, plain otherwise (DP, or non-private: grey by its colour)."""
    return {NOT_DP_PAPER: "/", UNKNOWN: "x"}.get(str(guarantee), "")


def color_by_run(fig: Any) -> Any:
    """Recolour the traces of a figure built elsewhere (``landscape.plots``) by ``run_color`` of their name,
    so its models keep the colours they have in the lessons' other figures. Returns the figure."""
    for tr in fig.data:
        name = getattr(tr, "name", None)
        if not name:
            continue
        kind = getattr(tr, "type", "")
        if kind in ("bar", "histogram"):
            tr.marker.color = run_color(name)
        elif kind in ("scatter", "scattergl"):
            tr.line.color = tr.marker.color = run_color(name)
    return fig


def error_bars(std: Any, n: Any) -> dict[str, Any]:
    """``error_y`` of mean ± std bars or points: drawn only where there are several values (seeds).

    Why: the std of one value is 0, and a zero-height "error bar" reads as a measured, exact value.
    A point from one run gets no bar at all (None: JSON null, which a live FigureWidget can send; a NaN
    made every explorer update print jupyter_client's "Out of range float values are not JSON compliant"
    warning into the lesson), and the trace none when no point has two.
    """
    std, n = np.atleast_1d(np.asarray(std, dtype=float)), np.atleast_1d(np.asarray(n, dtype=float))
    arr = [float(s) if k > 1 else None for s, k in zip(std, n)]
    return dict(type="data", array=arr, visible=bool((n > 1).any()))


def metric_label(metric: str) -> str:
    return METRICS.get(metric, metric)


def is_missing(x: Any) -> bool:
    """None or NaN: a cell with no value (a run that claims no ε, a metric not measured)."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def run_label(row: Mapping[str, Any]) -> str:
    """Plot label of a results row: variant, claimed ε (only when DP) and the guarantee."""
    eps = row.get("epsilon") if row.get("guarantee") == DP else None
    parts = [str(row.get("variant", "?"))]
    if eps is not None and not (isinstance(eps, float) and np.isnan(eps)):
        parts.append(f"ε={float(eps):.2g}")
    parts.append(str(row.get("guarantee", "?")))
    return " · ".join(parts)


def join_guarantees(values: Any) -> str:
    """The guarantees of a group of rows as one string ("(ε, δ)-DP / not DP (paper mode)")."""
    return " / ".join(sorted(set(map(str, values))))


def group_label(rows: pd.DataFrame, claimed_epsilon: float | None = None) -> str:
    """Label of several runs of one variant (seeds, or several ε), in ``run_label``'s format.

    Guarantees are the rows' strings, joined when a group mixes them; ``claimed_epsilon``
    (the rows' own claimed ε, e.g. the largest over seeds) is shown only when given and
    every row is DP; otherwise the ε is left to the axis.
    """
    variant = str(rows["variant"].iloc[0])
    guarantees = sorted(set(rows["guarantee"].astype(str)))
    parts = [variant]
    if not is_missing(claimed_epsilon) and guarantees == [DP]:
        parts.append(f"ε={float(claimed_epsilon):.2g}")
    parts.append(" / ".join(guarantees))
    return " · ".join(parts)


def mean_std(table: pd.DataFrame, keys: Any, metric: str, n: str | None = "n", **extra: Any) -> pd.DataFrame:
    """Mean and std (ddof 1; 0 for a single seed) of ``metric`` per group of ``keys``, with
    ``n`` the number of values and ``extra`` more named aggregations (pandas ``agg`` syntax)."""
    aggs: dict[str, Any] = dict(mean=(metric, "mean"), std=(metric, "std"))
    if n:
        aggs[n] = (metric, "count")
    out = table.groupby(keys, sort=True, dropna=False).agg(**aggs, **extra).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def eps_column(table: pd.DataFrame) -> pd.Series:
    """Target ε as numbers (NaN for runs without DP noise)."""
    if "target_epsilon" not in table:
        return pd.Series(np.nan, index=table.index)
    return pd.to_numeric(table["target_epsilon"], errors="coerce")


def aggregate(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std and count over seeds per (variant, target ε); keeps the rows' guarantees
    and the largest claimed ε (NaN for runs that claim none)."""
    t = table.copy()
    t["_eps"] = eps_column(t).fillna(-1.0)
    t["_m"] = pd.to_numeric(t[metric], errors="coerce")
    t["_claim"] = pd.to_numeric(t["epsilon"], errors="coerce") if "epsilon" in t else np.nan
    t = t[t["_m"].notna()]
    if t.empty:
        return pd.DataFrame(columns=["variant", "target_epsilon", "mean", "std", "n", "guarantee", "claimed_epsilon"])
    out = mean_std(t, ["variant", "_eps"], "_m", guarantee=("guarantee", join_guarantees),
                   claimed_epsilon=("_claim", "max"))
    out = out.rename(columns={"_eps": "target_epsilon"})
    out["target_epsilon"] = out["target_epsilon"].where(out["target_epsilon"] >= 0)
    return out


# --------------------------------------------------------------------------- metric vs ε (04's explorer, 01/04's attack figure)
def metric_traces(table: pd.DataFrame, metric: str, variants: Sequence[str] | None = None,
                  eps_range: tuple[float, float] | None = None) -> list[Any]:
    """Traces of ``metric`` against target ε, mean ± std over seeds, one per variant.

    Variants without ε (non-private) become a dashed horizontal reference line over the
    shown ε range. Names are ``variant · guarantee`` from the rows; the hover of each
    point gives the claimed ε, or says that the run makes no ε claim.
    """
    import plotly.graph_objects as go

    agg = aggregate(table, metric)
    if variants is not None:
        agg = agg[agg["variant"].isin(list(variants))]
    dp_pts = agg[agg["target_epsilon"].notna()]
    if eps_range is not None:
        lo, hi = eps_range
        dp_pts = dp_pts[(dp_pts["target_epsilon"] >= lo - 1e-9) & (dp_pts["target_epsilon"] <= hi + 1e-9)]
    if not dp_pts.empty:
        xlo, xhi = float(dp_pts["target_epsilon"].min()), float(dp_pts["target_epsilon"].max())
    elif eps_range is not None:
        xlo, xhi = eps_range
    else:
        xlo, xhi = 1.0, 10.0
    traces = []
    for v, pts in dp_pts.groupby("variant", sort=True):
        pts = pts.sort_values("target_epsilon")
        rows = table[table["variant"] == v]
        claims = [f"claimed ε = {c:.2f}" if not is_missing(c) else "no ε claim: " + g
                  for c, g in zip(pts["claimed_epsilon"], pts["guarantee"])]
        traces.append(go.Scatter(
            x=pts["target_epsilon"].tolist(), y=pts["mean"].tolist(), mode="lines+markers",
            error_y=error_bars(pts["std"], pts["n"]), line=dict(color=run_color(v)), marker=dict(color=run_color(v)),
            name=group_label(rows), customdata=np.stack([pts["n"].to_numpy(), np.array(claims, dtype=object)], axis=1),
            hovertemplate="target ε=%{x}<br>" + metric_label(metric) + "=%{y:.4g}"
                          "<br>%{customdata[0]} seed(s)<br>%{customdata[1]}<extra>%{fullData.name}</extra>",
        ))
    for v, pts in agg[agg["target_epsilon"].isna()].groupby("variant", sort=True):
        m, s, n = float(pts["mean"].iloc[0]), float(pts["std"].iloc[0]), int(pts["n"].iloc[0])
        traces.append(go.Scatter(
            x=[xlo, xhi], y=[m, m], mode="lines", line=dict(dash="dash", color=run_color(v)),
            name=group_label(table[table["variant"] == v]),
            hovertemplate=f"{metric_label(metric)}={m:.4g}" + (f" ± {s:.2g}" if n > 1 else "") + f" ({n} seed(s)), no ε<extra>%{{fullData.name}}</extra>",
        ))
    return traces


# --------------------------------------------------------------------------- sharpness vs ε
def checked_guarantees(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The table with each row's guarantee derived from its run folder (``verify.derive_run``).

    The folder is ``out / run_id``, beside the table: never the absolute ``run_dir`` stored at
    training time (a copied output folder would show the original's ledgers). A run without a
    valid ledger.json is "unknown guarantee"; the guarantee follows from the config, the reads
    and the recorded mechanism, and ``epsilon`` is the ε that mechanism gives (DP runs only).
    """
    from .verify import derive_run

    t = table.copy()
    derived = [derive_run(Path(out) / str(r)) for r in t["run_id"]] if "run_id" in t else []
    t["guarantee"] = [d.guarantee for d in derived]
    t["epsilon"] = [d.epsilon if d.guarantee == DP else np.nan for d in derived]
    return t


def _series_name(variant: str, guarantee: str) -> str:
    return f"{variant} · {guarantee}"


def _guarantees(sub: pd.DataFrame) -> str:
    g = sub["guarantee"] if "guarantee" in sub.columns else pd.Series([None] * len(sub), dtype=object)
    return join_guarantees(UNKNOWN if (is_missing(x) or x == "") else x for x in g)


def _claim_text(sub: pd.DataFrame) -> list[str]:
    """Per target ε: the claimed ε of the rows (their ``epsilon``: set only for DP runs), else why none."""
    out = []
    for _eps, rows in sub.groupby("target_epsilon"):
        claimed = pd.to_numeric(rows["epsilon"], errors="coerce").dropna() if "epsilon" in rows.columns else pd.Series([], dtype=float)
        if len(claimed):
            out.append(f"claimed ε = {claimed.max():.2f}")
        else:
            part = rows.get("dpsgd_part_epsilon", rows.get("epsilon_spent"))
            part = pd.to_numeric(part, errors="coerce").dropna() if part is not None else pd.Series([], dtype=float)
            out.append("no ε claimed" + (f" (DP-SGD part only: {part.max():.3g})" if len(part) else ""))
    return out


def sharpness_vs_epsilon(table: pd.DataFrame, metrics: tuple[str, ...] = ("top_eigenvalue", "sam_sharpness", "accuracy")):
    """Metric (mean ± std over seeds) against target ε, one line per variant.

    Runs that are not (ε, δ)-DP (non-private, paper mode, unknown guarantee) have no ε:
    they are a dashed horizontal band at their mean, never points on the ε axis.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    g = table["guarantee"] if "guarantee" in table.columns else pd.Series(UNKNOWN, index=table.index)
    table = table.assign(guarantee=g.fillna(UNKNOWN).replace("", UNKNOWN))  # old tables: no ledger column
    metrics = tuple(m for m in metrics if m in table.columns and table[m].notna().any())
    if not metrics:
        raise ValueError("the results table has none of the requested metric columns; run the landscape analysis first")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[metric_label(m) for m in metrics])
    variants = sorted(table["variant"].unique(), key=lambda v: (v != "nonprivate", v))
    eps_all = table.loc[table["guarantee"] == DP, "target_epsilon"].dropna()
    x_lo, x_hi = (float(eps_all.min()), float(eps_all.max())) if len(eps_all) else (0.0, 1.0)
    for v in variants:
        sub = table[table["variant"] == v]
        name = _series_name(v, _guarantees(sub))
        color = run_color(v)
        for mi, m in enumerate(metrics, start=1):
            if (sub["guarantee"] != DP).any() or sub["target_epsilon"].isna().all():
                mu, sd = float(sub[m].mean()), float(sub[m].std(ddof=1)) if len(sub) > 1 else 0.0
                why = "; ".join(sorted(set(_claim_text(sub)))) or "no ε claimed"  # paper mode: its DP-SGD part's
                fig.add_trace(go.Scatter(x=[x_lo, x_hi], y=[mu, mu], mode="lines", name=name, legendgroup=name,
                                         showlegend=mi == 1, line=dict(color=color, dash="dash"),
                                         hovertemplate=f"{name}<br>{why}<br>{m}={mu:.4g} ± {sd:.2g}<extra></extra>"),
                              row=1, col=mi)
                continue
            g = mean_std(sub, "target_epsilon", m)
            claims = _claim_text(sub)  # groupby sorts by target ε too: the same order as g
            fig.add_trace(go.Scatter(
                x=g["target_epsilon"], y=g["mean"], error_y=error_bars(g["std"], g["n"]),
                mode="lines+markers", name=name, legendgroup=name, showlegend=mi == 1,
                line=dict(color=color, dash="solid" if DP in name else "dot"),
                marker=dict(symbol="circle" if DP in name else "circle-open", size=9),
                customdata=np.stack([g["n"].astype(str), np.array(claims, dtype=object)], axis=-1),
                hovertemplate=(f"{name}<br>%{{customdata[1]}} (target %{{x:g}})<br>{m}=%{{y:.4g}} "
                               "(n=%{customdata[0]})<extra></extra>"),
            ), row=1, col=mi)
        for mi in range(1, len(metrics) + 1):
            fig.update_xaxes(title_text="target ε", row=1, col=mi)
    fig.update_layout(title="Sharpness and accuracy against the privacy budget ε (mean ± std over seeds; "
                            "no bar: one seed)",
                      height=430, legend=dict(orientation="h", y=-0.25))
    return responsive(fig)


def eigenvalue_bars(spectra: list[tuple[str, Mapping[str, Any]]]):
    """The stored top-k Hessian eigenvalues of analysed runs, grouped bars per (label, analysis)."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for lab, a in spectra:
        ev = a["eigenvalues"]
        fig.add_trace(go.Bar(x=[f"λ{i + 1}" for i in range(len(ev))], y=ev, name=lab, marker_color=run_color(lab)))
    fig.update_layout(title="Top Hessian eigenvalues (Lanczos)", barmode="group", yaxis_title="eigenvalue",
                      legend=dict(orientation="h", y=-0.3), height=450)
    return fig


# --------------------------------------------------------------------------- layout
# Characters some default font sets lack (a box is drawn instead) -> what renders everywhere.
_GLYPHS = {"‖": "||"}


def safe_text(text: str) -> str:
    """``text`` with glyphs that default fonts may lack replaced (e.g. "‖θ‖" -> "||θ||")."""
    for a, b in _GLYPHS.items():
        text = text.replace(a, b)
    return text


def responsive(fig: Any) -> Any:
    """Drop a fixed pixel width so the figure fills its container (``landscape.plots`` sizes
    multi-panel figures for a wide screen; in a notebook the last panel was cut off), and give
    3D scenes room for their axis titles (the z title read "ss" instead of "loss")."""
    fig.update_layout(width=None, autosize=True, margin=dict(l=10, r=10, t=70, b=10))
    for key in fig.layout:
        if key.startswith("scene"):
            fig.layout[key].update(aspectmode="cube", xaxis=dict(title=dict(font=dict(size=11))),
                                   yaxis=dict(title=dict(font=dict(size=11))),
                                   zaxis=dict(title=dict(font=dict(size=11))))
    return fig


__all__ = ["GUARANTEE_COLORS", "LEGEND_BELOW", "METRICS", "VARIANT_COLORS", "aggregate", "checked_guarantees",
           "color_by_run", "eigenvalue_bars", "eps_column", "error_bars", "group_label", "guarantee_pattern",
           "is_missing", "join_guarantees", "label_variant", "mean_std", "metric_label", "metric_traces", "responsive",
           "run_color", "run_label", "safe_text", "sharpness_vs_epsilon"]
