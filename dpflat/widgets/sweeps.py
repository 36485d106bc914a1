"""Notebook 04 (sharpness vs ε): the results explorer and the "run missing cells" button.

The explorer plots any metric column of the results table against target ε, mean ± std
over seeds (``dpflat.figures.aggregate``), labelled with each row's own guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import RunConfig
from ..figures import METRICS, aggregate, eps_column, group_label, metric_label, metric_traces, run_color, run_label
from ..runs import RunDir, load_results
from .base import Panel, figure_widget_available, new_figure, replace_traces
from .setup import SetupStatus


#: ``mia_*`` columns that are counts, not metrics (never offered as one)
NOT_METRICS = frozenset({"mia_per_side"})


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Metrics the table can plot: the known ones and any ``mia_*`` column, with values."""
    cols = [m for m in METRICS if m in table.columns]
    cols += sorted(c for c in table.columns if c.startswith("mia_") and c not in cols and c not in NOT_METRICS)
    out = []
    for c in cols:
        vals = pd.to_numeric(table[c], errors="coerce")
        if vals.notna().any():
            out.append(c)
    return out


def run_points(table: pd.DataFrame, x: str, y: str, variants: Sequence[str] | None = None,
               eps_range: tuple[float, float] | None = None) -> list[Any]:
    """One marker per run (every seed), ``y`` against ``x``, a trace per variant."""
    import plotly.graph_objects as go

    t = table.copy()
    t["_eps"] = eps_column(t)
    if variants is not None:
        t = t[t["variant"].isin(list(variants))]
    if eps_range is not None:
        lo, hi = eps_range
        t = t[t["_eps"].isna() | ((t["_eps"] >= lo - 1e-9) & (t["_eps"] <= hi + 1e-9))]
    traces = []
    for v, rows in t.groupby("variant", sort=True):
        xs, ys = pd.to_numeric(rows[x], errors="coerce"), pd.to_numeric(rows[y], errors="coerce")
        ok = xs.notna() & ys.notna()
        if not ok.any():
            continue
        rows = rows[ok]
        text = [run_label(r) + f" · seed {r.get('seed')}" for r in rows.to_dict("records")]
        traces.append(go.Scatter(x=xs[ok].tolist(), y=ys[ok].tolist(), mode="markers", name=group_label(rows),
                                 marker=dict(color=run_color(v)),
                                 text=text, hovertemplate="%{text}<br>%{x:.4g}, %{y:.4g}<extra></extra>"))
    return traces


def metric_vs_epsilon(table: pd.DataFrame, metric: str = "accuracy", title: str | None = None):
    """Static version of the explorer's main figure (for reports and non-widget front ends)."""
    import plotly.graph_objects as go

    fig = go.Figure(metric_traces(table, metric))
    fig.update_layout(title=title or f"{metric_label(metric)} vs target ε (mean ± std over seeds)",
                      xaxis_title="target ε of the DP-SGD noise (a claim only for (ε, δ)-DP runs)",
                      yaxis_title=metric_label(metric), xaxis_type="log", height=450)
    return fig


def dp_vs_nonprivate_sharpness(table: pd.DataFrame, metric: str = "top_eigenvalue") -> str:
    """One line: is plain DP sharper than the non-private run in this table, at each target ε?

    Why: the evidence points both ways. This project measured DP models as sharper (SST-2 λ1 2.92
    vs 1.25 non-private, 5 seeds, older defaults; benchmarks/RESULTS.md), while a 2025 study (arXiv
    2512.19019) reports that DP generally *reduces* sharpness. The line compares the ``dp`` rows'
    mean ``metric`` per target ε with the ``nonprivate`` rows' mean, and says how many seeds each has.
    """
    name = metric_label(metric)
    if metric not in table.columns or "variant" not in table.columns:
        return f"no {name} in this table yet: run the landscape analysis (analyze = True) first"
    t = table.assign(_m=pd.to_numeric(table[metric], errors="coerce"), _eps=eps_column(table))
    ref = t[(t["variant"] == "nonprivate") & t["_m"].notna()]
    dp = t[(t["variant"] == "dp") & t["_m"].notna() & t["_eps"].notna()]
    if ref.empty or dp.empty:
        return (f"cannot compare: this table needs {name} of a nonprivate run and of dp runs "
                f"(has {len(ref)} and {len(dp)}); keep include_nonprivate = True and 'dp' in variants")
    r = float(ref["_m"].mean())
    parts, sharper = [], []
    for e, g in dp.groupby("_eps", sort=True):
        m = float(g["_m"].mean())
        sharper.append(m > r)
        parts.append(f"{m:.3g} at ε={e:g} ({len(g)} seed(s))")
    verdict = ("DP sharper at every ε: as this project measured" if all(sharper) else
               "DP flatter at every ε: as arXiv 2512.19019 reports" if not any(sharper) else
               "mixed: DP sharper at some ε, flatter at others")
    return (f"your runs, {name}: non-private {r:.3g} ({len(ref)} seed(s)) vs DP {', '.join(parts)} -> {verdict} "
            f"(one table, one task; seeds decide whether it holds)")


class Explorer(Panel):
    """Results table -> linked figures, filtered by ε range, variants and metric.

    ``figures["epsilon"]``: the metric against target ε, mean ± std over seeds;
    ``figures["runs"]``: every run, the metric against a second column (``versus``);
    ``figures["attack"]``: accuracy against ε beside the membership advantage against ε, with the bound
    the DP claim implies (``attack_cost_figure``), for the same selection;
    ``controls["summary"]``: the selection as a table (mean ± std, guarantees).
    """

    def __init__(self, table: pd.DataFrame, metric: str = "accuracy"):
        super().__init__()
        import ipywidgets as w

        c = self.controls
        c["metric"] = w.Dropdown(description="metric")
        c["versus"] = w.Dropdown(description="versus")
        c["variants"] = w.SelectMultiple(description="variants", rows=6)
        c["eps_range"] = w.FloatRangeSlider(description="target ε", step=0.1, continuous_update=False,
                                            readout_format=".1f")
        c["summary"] = w.Output()
        fig_e = new_figure(height=430, xaxis_type="log",
                           xaxis_title="target ε of the DP-SGD noise (a claim only for (ε, δ)-DP runs)")
        fig_r = new_figure(height=430)
        v_e = self._add_figure("epsilon", fig_e)
        v_r = self._add_figure("runs", fig_r)
        import plotly.graph_objects as go

        from .privacy_audit import attack_cost_figure

        start = attack_cost_figure(table if table is not None else pd.DataFrame())
        v_a = self._add_figure("attack", go.FigureWidget(start) if figure_widget_available() else start)
        self._muted = False
        self._versus_chosen = False  # True once the user picks "versus": then it is kept
        self.set_table(table, metric)
        c["metric"].observe(self._metric_changed, names="value")
        c["versus"].observe(self._versus_changed, names="value")
        for k in ("versus", "variants", "eps_range"):
            c[k].observe(lambda _ch: self.update(), names="value")
        self.widget = w.VBox([w.HBox([c["metric"], c["versus"]]), w.HBox([c["variants"], c["eps_range"]]),
                              v_e, v_r, v_a, c["summary"]])

    def set_table(self, table: pd.DataFrame, metric: str | None = None) -> None:
        """Load a (new) results table: refresh the options, keep the selection where possible."""
        c = self.controls
        self.table = table.reset_index(drop=True) if table is not None else pd.DataFrame()
        self._muted = True
        try:
            metrics = metric_columns(self.table) if len(self.table) else []
            keep = metric or c["metric"].value
            c["metric"].options = metrics
            if metrics:
                c["metric"].value = keep if keep in metrics else metrics[0]
            old_versus = c["versus"].value
            c["versus"].options = metrics
            if metrics:  # keep the old choice unless it now equals the metric; else accuracy (or the next one)
                others = [m for m in metrics if m != c["metric"].value] or metrics
                c["versus"].value = old_versus if old_versus in others else ("accuracy" if "accuracy" in others else others[0])
            variants = sorted(self.table["variant"].astype(str).unique()) if len(self.table) else []
            old = set(c["variants"].value)
            c["variants"].options = variants
            c["variants"].value = tuple(v for v in variants if v in old) or tuple(variants)
            eps = eps_column(self.table).dropna() if len(self.table) else pd.Series(dtype=float)
            lo, hi = (float(eps.min()), float(eps.max())) if len(eps) else (1.0, 10.0)
            hi = hi if hi > lo else lo + 1.0
            s = c["eps_range"]
            s.min, s.max = -1e9, 1e9  # widen first so setting min/max never conflicts with the old range
            s.value = (lo, hi)
            s.min, s.max = lo, hi
        finally:
            self._muted = False
        self.update()

    def _versus_changed(self, change: dict[str, Any]) -> None:
        if not self._muted:
            self._versus_chosen = True

    def _metric_changed(self, change: dict[str, Any]) -> None:
        """A metric plotted against itself says nothing: move "versus" off it first; until
        the user picks one, "versus" is accuracy whenever the metric is not (as the text says)."""
        c = self.controls
        if (change["new"] not in (None, "accuracy") and not self._versus_chosen and c["versus"].value != "accuracy"
                and "accuracy" in c["versus"].options):
            self._muted = True
            try:
                c["versus"].value = "accuracy"
            finally:
                self._muted = False
        elif change["new"] is not None and c["versus"].value == change["new"]:
            others = [m for m in c["versus"].options if m != change["new"]]
            if others:
                self._muted = True
                try:
                    c["versus"].value = "accuracy" if "accuracy" in others else others[0]
                finally:
                    self._muted = False
        self.update()

    @property
    def selection(self) -> pd.DataFrame:
        """The rows the controls select (non-private rows pass the ε filter: they have no ε)."""
        c = self.controls
        t = self.table
        if t.empty:
            return t
        eps = eps_column(t)
        lo, hi = c["eps_range"].value
        in_range = eps.isna() | ((eps >= lo - 1e-9) & (eps <= hi + 1e-9))
        return t[t["variant"].isin(list(c["variants"].value)) & in_range]

    def update(self) -> None:
        """Redraw both figures and the summary for the current control values."""
        if self._muted:
            return
        c = self.controls
        metric, versus = c["metric"].value, c["versus"].value
        if not metric or self.table.empty:
            replace_traces(self.figures["epsilon"], [], title="no results yet: run the sweep first")
            replace_traces(self.figures["runs"], [])
            self._refresh()
            return
        variants, rng = list(c["variants"].value), tuple(c["eps_range"].value)
        name = metric_label(metric)
        replace_traces(self.figures["epsilon"], metric_traces(self.table, metric, variants, rng),
                       title=f"{name} vs target ε (mean ± std over seeds)", yaxis_title=name)
        if versus:
            replace_traces(self.figures["runs"], run_points(self.table, versus, metric, variants, rng),
                           title=f"every run: {name} vs {metric_label(versus)}",
                           xaxis_title=metric_label(versus), yaxis_title=name)
        from .privacy_audit import attack_cost_figure

        built = attack_cost_figure(self.table, variants, rng)
        replace_traces(self.figures["attack"], built.data)
        self.figures["attack"].update_layout(built.layout.to_plotly_json())
        self._refresh()
        self._show_summary(metric)

    def summary(self, metric: str | None = None) -> pd.DataFrame:
        """Mean ± std per (variant, target ε) of the selection, with guarantees (dpflat.sweep.summarize).

        ``summarize`` reports the claimed ε (DP runs) and the DP-SGD part's ε of runs that are
        not DP; next to it goes ``claimed_epsilon`` (the rows' own claim, empty unless DP), so a
        paper-mode line cannot be read as having an ε.
        """
        from ..sweep import summarize

        sel = self.selection
        metric = metric or self.controls["metric"].value
        if not len(sel) or not metric:
            return pd.DataFrame()
        out = summarize(sel, metric)
        claims = aggregate(sel, metric)[["variant", "target_epsilon", "claimed_epsilon"]]
        key = out["target_epsilon"].astype(float).replace(math.inf, math.nan)  # non-private: no ε (NaN)
        out = out.assign(target_epsilon=key)
        out = out.merge(claims, on=["variant", "target_epsilon"], how="left")
        # one claimed-ε column (NaN unless the run is DP as a whole); the accountant's number of a noisy
        # non-DP run (paper mode) is not a claim and appears only as the DP-SGD part's
        out = out.drop(columns=[c for c in ("epsilon_spent", "epsilon") if c in out.columns])
        return out.rename(columns={"dpsgd_part_epsilon": "DP-SGD part ε (run not DP)"})

    def _show_summary(self, metric: str) -> None:
        out = self.controls["summary"]
        try:
            from IPython import get_ipython
            from IPython.display import clear_output, display
        except ImportError:  # pragma: no cover
            return
        if get_ipython() is None:
            return
        with out:
            clear_output(wait=True)
            display(self.summary(metric))


def explorer(table: pd.DataFrame, metric: str = "accuracy") -> Explorer:
    """Build the ε/variant/metric explorer of notebook 04 over a results table."""
    return Explorer(table, metric)


def analysis_done(run_dir: str | Path) -> bool:
    return RunDir(run_dir).landscape_file.is_file()


class SweepRunner(Panel):
    """A button that trains the missing cells of a sweep grid, then analyses new runs.

    Finished cells are skipped (``dpflat.sweep`` semantics: a done run folder is
    reused), so pressing it again after an interruption continues the grid. With
    ``attack``, every run without a ``mia.json`` is also attacked (``dpflat.mia``) and
    its ``mia_*`` columns join the results table.
    """

    def __init__(self, base: RunConfig, variants: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
                 modes: Sequence[str] = ("safe",), analyze: bool = True, analyze_kwargs: Mapping[str, Any] | None = None,
                 on_done: Callable[[pd.DataFrame], None] | None = None, attack: bool = False,
                 attack_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        import ipywidgets as w

        from ..sweep import cells

        self.base = base
        self.spec = (list(variants), list(epsilons), list(seeds), list(modes))
        self.grid = cells(base, *self.spec[:3], modes=self.spec[3])
        self.analyze = analyze
        self.analyze_kwargs = dict(analyze_kwargs or {})
        self.attack = attack
        self.attack_kwargs = dict(attack_kwargs or {})
        self.on_done = on_done
        c = self.controls
        c["button"] = w.Button(description="Run missing cells", button_style="primary", icon="play")
        c["progress"] = w.IntProgress(value=0, min=0, max=max(1, len(self.grid)), description="runs")
        c["analysis"] = w.IntProgress(value=0, min=0, max=max(1, len(self.grid)), description="landscape")
        c["status"] = w.HTML()
        c["log"] = w.Output()
        c["button"].on_click(lambda _b: self.run())
        self.widget = w.VBox([w.HBox([c["button"], c["status"]]), c["progress"], c["analysis"], c["log"]])
        self._update_status()

    def missing(self) -> list[RunConfig]:
        """Grid cells without a finished run folder."""
        return [cfg for cfg in self.grid if not RunDir.for_config(cfg).done]

    def run_dirs(self) -> list[Path]:
        return [RunDir.for_config(cfg).path for cfg in self.grid]

    def _update_status(self, note: str = "") -> None:
        done = sum(RunDir.for_config(cfg).done for cfg in self.grid)
        analysed = sum(analysis_done(p) for p in self.run_dirs())
        c = self.controls
        c["progress"].value, c["analysis"].value = done, analysed
        c["status"].value = f"{done}/{len(self.grid)} runs finished, {analysed} analysed {note}"

    def run(self) -> pd.DataFrame:
        """Train the missing cells, then (``analyze``) the landscape of every unanalysed run;
        returns the grid's rows of the results table and calls ``on_done`` with them."""
        from ..sweep import sweep

        c = self.controls
        c["button"].disabled = True
        nothing = not self.missing() and not (self.analyze and any(
            RunDir(p).done and not analysis_done(p) for p in self.run_dirs()))
        try:
            with c["log"]:
                if self.missing():
                    self._update_status(f"· training {len(self.missing())} missing cell(s)")
                    variants, epsilons, seeds, modes = self.spec
                    with SetupStatus(enabled=self.base.train.progress) as status:
                        sweep(self.base, variants, epsilons, seeds, modes, progress=self.base.train.progress,
                              on_cell=lambda _row: self._update_status("· training"), on_phase=status.on_phase)
                    self._update_status()
                if self.analyze:
                    from ..analysis import analyze_run

                    for p in self.run_dirs():
                        if RunDir(p).done and not analysis_done(p):
                            self._update_status(f"· analysing {p.name}")
                            analyze_run(p, **self.analyze_kwargs)
                            self._update_status()
                if self.attack:
                    from ..mia import attack_run, record_result, save_result
                    from .privacy_audit import needs_attack

                    for p in self.run_dirs():
                        if RunDir(p).done and needs_attack(p):
                            self._update_status(f"· membership inference on {p.name}")
                            res = attack_run(p, **self.attack_kwargs)
                            save_result(res, p)
                            record_result(res)
                    self._update_status()
        finally:
            c["button"].disabled = False
        self._update_status("· nothing was missing: every cell was already trained"
                            + (" and analysed" if self.analyze else "") if nothing else "· done")
        table = load_results(self.base.train.output_dir)
        ids = {p.name for p in self.run_dirs()}
        table = table[table["run_id"].isin(ids)].reset_index(drop=True) if len(table) else table
        if self.on_done:
            self.on_done(table)
        return table


def sweep_runner(base: RunConfig, variants: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
                 **kw: Any) -> SweepRunner:
    """Build the "run missing cells" button panel of notebook 04."""
    return SweepRunner(base, variants, epsilons, seeds, **kw)

