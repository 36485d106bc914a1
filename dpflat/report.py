"""A self-contained HTML report of a sweep: sharpness vs ε, accuracy, surfaces, spectra.

One file (plotly inlined once) that opens offline in any browser. Every model is
labelled with the guarantee derived from its run folder beside the table (``dpflat.verify``:
config, ledger reads and the recorded mechanism), never with its results row's claim. The
figures come from ``dpflat.figures`` (shared with the notebooks); this module writes HTML.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from .analysis import load_analysis, load_density, load_surface
from .figures import checked_guarantees, eigenvalue_bars, responsive, run_label, safe_text, sharpness_vs_epsilon
from .privacy import DP
from .runs import load_results


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
        add(eigenvalue_bars(spectra))

    n_dp = int((table["guarantee"] == DP).sum())
    notes = [safe_text(n) for n in (notes or [])]
    notes.append(f"{len(table)} runs, {n_dp} of them (ε, δ)-DP as derived from their folders (config, ledger reads, "
                 "recorded mechanism; ε recomputed). A run labelled \"not DP\" or \"unknown guarantee\" (no valid or "
                 "no consistent ledger.json) claims no ε and is drawn as a band, not on the ε axis.")
    notes.append("Covered by a DP run's guarantee: its model and eval-split metrics. Private diagnostics (training "
                 "loss, private_diagnostics.json, checkpoints, private-split landscapes, MIA reads) are not (see each "
                 "run's ledger.json \"release\").")
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


__all__ = ["build_report", "checked_guarantees", "sharpness_vs_epsilon"]
