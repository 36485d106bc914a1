"""A self-contained HTML report of a sweep: sharpness vs ε, accuracy, surfaces, spectra.

One file (plotly inlined once) that opens offline in any browser. Every model is
labelled with the guarantee from its ledger, never with a claim computed here.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis import load_analysis, load_density, load_surface, run_label
from .figures import responsive, safe_text
from .privacy import DP, UNKNOWN, ledger_guarantee
from .runs import load_results

METRICS = {
    "top_eigenvalue": "top Hessian eigenvalue (λ_max)",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness (relative ρ=0.05)",
    "accuracy": "test accuracy (checkpoint selected on val)",
}


def checked_guarantees(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    """The table with each row's guarantee re-read from its run folder's ledger.

    A run without a valid ledger.json is "unknown guarantee" and claims no ε, whatever
    its results row says; a run that is not DP shows no ε either.
    """
    t = table.copy()
    dirs = [Path(r.get("run_dir") or out / r["run_id"]) for r in t.to_dict("records")]
    dirs = [d if d.is_dir() else out / d.name for d in dirs]
    t["guarantee"] = [ledger_guarantee(d) for d in dirs]
    if "epsilon" in t:
        t["epsilon"] = t["epsilon"].where(t["guarantee"] == DP)
    return t


def _series_name(variant: str, guarantee: str) -> str:
    return f"{variant} · {guarantee}"


def _guarantees(sub: pd.DataFrame) -> str:
    g = sub["guarantee"] if "guarantee" in sub.columns else pd.Series([None] * len(sub), dtype=object)
    return " / ".join(sorted({UNKNOWN if (x is None or (isinstance(x, float) and np.isnan(x)) or x == "") else str(x)
                              for x in g}))


def _claim_text(sub: pd.DataFrame) -> list[str]:
    """Per target ε: the claimed ε of the rows (their ``epsilon``: set only for DP runs), else why none."""
    out = []
    for _eps, rows in sub.groupby("target_epsilon"):
        claimed = pd.to_numeric(rows["epsilon"], errors="coerce").dropna() if "epsilon" in rows.columns else pd.Series([], dtype=float)
        if len(claimed):
            out.append(f"claimed ε = {claimed.max():.4g}")
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
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    g = table["guarantee"] if "guarantee" in table.columns else pd.Series(UNKNOWN, index=table.index)
    table = table.assign(guarantee=g.fillna(UNKNOWN).replace("", UNKNOWN))  # old tables: no ledger column
    metrics = tuple(m for m in metrics if m in table.columns and table[m].notna().any())
    if not metrics:
        raise ValueError("the results table has none of the requested metric columns; run the landscape analysis first")
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[METRICS.get(m, m) for m in metrics])
    colors = qualitative.Plotly
    variants = sorted(table["variant"].unique(), key=lambda v: (v != "nonprivate", v))
    eps_all = table.loc[table["guarantee"] == DP, "target_epsilon"].dropna()
    x_lo, x_hi = (float(eps_all.min()), float(eps_all.max())) if len(eps_all) else (0.0, 1.0)
    for vi, v in enumerate(variants):
        sub = table[table["variant"] == v]
        name = _series_name(v, _guarantees(sub))
        color = colors[vi % len(colors)]
        for mi, m in enumerate(metrics, start=1):
            if (sub["guarantee"] != DP).any() or sub["target_epsilon"].isna().all():
                mu, sd = float(sub[m].mean()), float(sub[m].std(ddof=1)) if len(sub) > 1 else 0.0
                why = "; ".join(sorted(set(_claim_text(sub)))) or "no ε claimed"  # paper mode: its DP-SGD part's
                fig.add_trace(go.Scatter(x=[x_lo, x_hi], y=[mu, mu], mode="lines", name=name, legendgroup=name,
                                         showlegend=mi == 1, line=dict(color=color, dash="dash"),
                                         hovertemplate=f"{name}<br>{why}<br>{m}={mu:.4g} ± {sd:.2g}<extra></extra>"),
                              row=1, col=mi)
                continue
            g = sub.groupby("target_epsilon")[m].agg(["mean", "std", "count"]).reset_index().sort_values("target_epsilon")
            claims = _claim_text(sub)  # groupby sorts by target ε too: the same order as g
            fig.add_trace(go.Scatter(
                x=g["target_epsilon"], y=g["mean"], error_y=dict(type="data", array=g["std"].fillna(0.0)),
                mode="lines+markers", name=name, legendgroup=name, showlegend=mi == 1,
                line=dict(color=color, dash="solid" if DP in name else "dot"),
                marker=dict(symbol="circle" if DP in name else "circle-open", size=9),
                customdata=np.stack([g["count"].astype(str), np.array(claims, dtype=object)], axis=-1),
                hovertemplate=(f"{name}<br>%{{customdata[1]}} (target %{{x:g}})<br>{m}=%{{y:.4g}} "
                               "(n=%{customdata[0]})<extra></extra>"),
            ), row=1, col=mi)
        for mi in range(1, len(metrics) + 1):
            fig.update_xaxes(title_text="target ε", row=1, col=mi)
    fig.update_layout(title="Sharpness and accuracy against the privacy budget ε (mean ± std over seeds)",
                      height=430, legend=dict(orientation="h", y=-0.25))
    return responsive(fig)


def _table_html(table: pd.DataFrame) -> str:
    cols = [c for c in ["variant", "guarantee", "target_epsilon", "epsilon", "seed", "accuracy", "val_accuracy", "top_eigenvalue",
                        "hessian_trace", "sam_sharpness", "sigma", "steps", "keep_layers", "run_id"] if c in table.columns]
    t = table[cols].sort_values([c for c in ("variant", "target_epsilon", "seed") if c in cols])
    t = t.rename(columns={"epsilon": "ε claimed", "target_epsilon": "target ε", "accuracy": "test accuracy",
                          "val_accuracy": "val accuracy"})
    return t.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="—", border=0, classes="results")


def _paired_html(table: pd.DataFrame, baseline: str = "dp") -> str:
    """Paired differences of test accuracy to ``baseline`` (dpflat.stats), or nothing without one."""
    from .stats import paired_differences

    p = paired_differences(table, baseline)
    if p.empty:
        return ""
    p = p.rename(columns={"target_epsilon": "target ε", "mean_diff": f"Δ test acc vs {baseline}",
                          "ci_low": "95% CI low", "ci_high": "95% CI high", "crosses_zero": "CI crosses 0",
                          "gap_closed": "gap closed", "n_pairs": "pairs"})
    html_t = p.drop(columns=["baseline", "gap_ci_low", "gap_ci_high"]).to_html(
        index=False, float_format=lambda x: f"{x:.4g}", na_rep="—", border=0, classes="results")
    return (f"<h2>Paired differences vs {html.escape(baseline)}</h2><p>Same task, ε and seed; 95% bootstrap "
            f"interval over seeds and test examples; gap closed = Δ / (nonprivate − {html.escape(baseline)}).</p>{html_t}")


def build_report(output_dir: str | Path, title: str = "dpflat report", notes: list[str] | None = None,
                 path: str | Path | None = None) -> Path:
    """Write ``report.html`` for the runs of ``output_dir`` (analysed ones get surfaces and spectra)."""
    import landscape.plots as lp

    out = Path(output_dir)
    table = load_results(out)
    if table.empty:
        raise FileNotFoundError(f"no results table in {out}: train some runs first")
    table = table[table.get("finished", True) == True]  # noqa: E712
    table = checked_guarantees(table, out)
    parts: list[str] = []
    first = True

    def add(fig) -> None:
        nonlocal first
        responsive(fig)  # fills the page; 3D scenes keep room for their axis titles
        parts.append(fig.to_html(full_html=False, include_plotlyjs="inline" if first else False))
        first = False

    if any(c in table.columns for c in ("top_eigenvalue", "sam_sharpness")):
        add(sharpness_vs_epsilon(table))
    else:
        add(sharpness_vs_epsilon(table, ("accuracy",)))

    surfaces, densities, spectra = [], [], []
    order = table.sort_values(["variant", "target_epsilon", "seed"], na_position="first")
    for row in order.to_dict("records"):
        run_dir = out / row["run_id"]
        lab = run_label(row) + f" · seed {row['seed']}"
        try:
            a = load_analysis(run_dir)
        except FileNotFoundError:
            continue
        spectra.append((lab, a))
        if a.get("surface_path"):
            surfaces.append((lab, load_surface(run_dir)))
        if a.get("density"):
            densities.append((lab, load_density(run_dir)))
    if surfaces:
        for i in range(0, len(surfaces), 3):  # three panels per row keep the contours legible
            chunk = surfaces[i : i + 3]
            add(lp.plot_contour([s for _, s in chunk], labels=[l for l, _ in chunk],
                                title="2D loss contours (filter-normalised random directions, eval subset)"))
        pick = [surfaces[0]] + ([surfaces[-1]] if len(surfaces) > 1 else [])
        add(lp.plot_surface_3d([s for _, s in pick], labels=[l for l, _ in pick], title="Loss surfaces in 3D"))
    if densities:
        add(lp.plot_density([d for _, d in densities], labels=[l for l, _ in densities],
                            title="Hessian eigenvalue density (SLQ)"))
    if spectra:
        import plotly.graph_objects as go

        fig = go.Figure()
        for lab, a in spectra:
            ev = a["eigenvalues"]
            fig.add_trace(go.Bar(x=[f"λ{i + 1}" for i in range(len(ev))], y=ev, name=lab))
        fig.update_layout(title="Top Hessian eigenvalues (Lanczos)", barmode="group", yaxis_title="eigenvalue",
                          legend=dict(orientation="h", y=-0.3), height=450)
        add(fig)

    n_dp = int((table["guarantee"] == DP).sum())
    notes = [safe_text(n) for n in (notes or [])]
    notes.append(f"{len(table)} runs, {n_dp} of them (ε, δ)-DP by their ledgers. A run labelled \"not DP\" or "
                 "\"unknown guarantee\" (no valid ledger.json) claims no ε and is drawn as a band, not on the ε axis.")
    notes.append("Covered by a DP run's guarantee: its model and eval-split metrics. Private diagnostics (training "
                 "loss, checkpoints, private-split landscapes, MIA reads) are not (see each run's ledger.json "
                 "\"release\").")
    body = "\n".join(f"<div class='fig'>{p}</div>" for p in parts)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1500px}} table.results{{border-collapse:collapse;font-size:13px}}
table.results td,table.results th{{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}} .fig{{margin:1.5em 0}}</style>
</head><body><h1>{html.escape(title)}</h1>
<ul>{''.join(f'<li>{html.escape(n)}</li>' for n in notes)}</ul>
{body}
{_paired_html(table)}
<h2>Results table</h2>{_table_html(table)}
</body></html>"""
    target = Path(path) if path else out / "report.html"
    target.write_text(doc, encoding="utf-8")
    return target


__all__ = ["build_report", "sharpness_vs_epsilon"]
