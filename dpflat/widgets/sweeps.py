"""Notebook 04 (sharpness vs ε): the results explorer and the "run missing cells" button.

The explorer plots any metric column of the results table against target ε, mean ± std
over seeds (``dpflat.figures.aggregate``), labelled with each row's own guarantee.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import RunConfig
from ..figures import (METRICS, aggregate, eps_column, error_bars, group_label, is_missing, metric_label, run_color,
                       run_label)
from ..runs import RunDir, load_results
from .base import Panel, new_figure, replace_traces
from .setup import SetupStatus


def metric_columns(table: pd.DataFrame) -> list[str]:
    """Metrics the table can plot: the known ones and any ``mia_*`` column, with values."""
    cols = [m for m in METRICS if m in table.columns]
    cols += sorted(c for c in table.columns if c.startswith("mia_") and c not in cols)
    out = []
    for c in cols:
        vals = pd.to_numeric(table[c], errors="coerce")
        if vals.notna().any():
            out.append(c)
    return out


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


class Explorer(Panel):
    """Results table -> linked figures, filtered by ε range, variants and metric.

    ``figures["epsilon"]``: the metric against target ε, mean ± std over seeds;
    ``figures["runs"]``: every run, the metric against a second column (``versus``);
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
        self._muted = False
        self._versus_chosen = False  # True once the user picks "versus": then it is kept
        self.set_table(table, metric)
        c["metric"].observe(self._metric_changed, names="value")
        c["versus"].observe(self._versus_changed, names="value")
        for k in ("versus", "variants", "eps_range"):
            c[k].observe(lambda _ch: self.update(), names="value")
        self.widget = w.VBox([w.HBox([c["metric"], c["versus"]]), w.HBox([c["variants"], c["eps_range"]]),
                              v_e, v_r, c["summary"]])

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

                    for p in self.run_dirs():
                        if RunDir(p).done and not RunDir(p).mia_file.is_file():
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

