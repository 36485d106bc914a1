"""Interactive panels and figures for the notebooks (ipywidgets + plotly).

Why a module and not notebook cells: the notebooks stay short lessons, and every
callback is a plain method that tests drive headlessly (set a control's ``value``,
read the figure's ``data``). Each panel builder returns an object with

* ``widget``: the box to ``display`` in a notebook,
* ``figure`` / ``figures``: the plotly figures it keeps up to date,
* ``controls``: its ipywidgets by name.

Figures are ``plotly.graph_objects.FigureWidget`` when ``anywidget`` is installed
(plotly >= 6 needs it); otherwise plain ``go.Figure`` objects re-drawn into an
``Output`` widget, with the same data, so a missing optional package degrades the
view, not the logic.

Labels: every model in a figure carries its guarantee exactly as its results row or
ledger states it (:func:`run_label`, :func:`ledger_label`); nothing here derives a
privacy claim, and a run that is not DP is never shown with an ε.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .analysis import run_label
from .config import PAPER_AWP_GAMMA, FlatConfig, RunConfig
from .privacy import DP, NOT_DP_NONPRIVATE, NOT_DP_PAPER, PrivacyLedger

# Metric columns of the results table the explorer can plot (label for axes); MIA
# columns (``mia_*``) are picked up as they appear.
METRICS: dict[str, str] = {
    "accuracy": "test accuracy",  # the test split (the task's eval file), checkpoint selected on val
    "eval_loss": "test loss",
    "val_accuracy": "val accuracy",  # absent from run folders older than the val split: offered only if present
    "top_eigenvalue": "top Hessian eigenvalue λ1",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness",
}
GUARANTEE_COLORS = {DP: "#1f77b4", NOT_DP_PAPER: "#d62728", NOT_DP_NONPRIVATE: "#7f7f7f"}


# --------------------------------------------------------------------------- set-up
def project_root() -> Path:
    """The checkout that holds this package (editable install), else the working dir."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def setup_notebook(out_dir: str | Path, data_dir: str | Path | None = None, threads: int | None = None
                   ) -> tuple[Path, str | None]:
    """Quiet library logs, set torch's threads, resolve the output and data folders.

    A relative ``out_dir`` is taken from the project root, so runs land in
    ``out/notebooks/NN`` whether Jupyter was started in the repo or in ``notebooks/``.
    With no ``data_dir`` and no ``$DPFLAT_DATA_DIR``, the offline data beside the
    checkout (``../shared/data``, as the Makefile uses) is picked when it exists.
    """
    from .cli import quiet_libraries

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    # Opacus' RDP hint that a larger order could tighten ε: true, repeated per call, not a lesson
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    out = Path(out_dir).expanduser()
    if not out.is_absolute():
        out = project_root() / out
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is None and not os.environ.get("DPFLAT_DATA_DIR"):
        beside = project_root().parent / "shared" / "data"
        if (beside / "MANIFEST.txt").is_file():
            data_dir = beside
    return out, (str(data_dir) if data_dir is not None else None)


def base_config(*, out_dir: str | Path, backbone: str = "minilm", task: str = "sst2", data_dir: str | None = None,
                train_size: int | None = 2000, eval_size: int | None = 500, public_size: float = 0.1,
                max_length: int = 40, prefix_len: int = 16, epochs: float = 2.0, batch_size: int = 128,
                physical_batch_size: int = 64, lr: float = 2e-2, epsilon: float = 3.0, seed: int = 0,
                device: str = "cpu", progress: bool = True, flat: Mapping[str, Any] | None = None,
                **train_extra: Any) -> RunConfig:
    """The notebooks' shared run config, from their ``parameters`` cell (one place, one meaning)."""
    from .config import DataConfig, ModelConfig, PrivacyConfig, TrainConfig

    cfg = RunConfig(
        data=DataConfig(task=task, data_dir=data_dir, max_length=max_length, train_size=train_size,
                        eval_size=eval_size, public_size=public_size),
        model=ModelConfig(backbone=backbone, prefix_len=prefix_len),
        privacy=PrivacyConfig(epsilon=epsilon),
        train=TrainConfig(epochs=epochs, batch_size=batch_size, physical_batch_size=physical_batch_size, lr=lr,
                          seed=seed, device=device, output_dir=str(out_dir), progress=progress, **train_extra),
        variant="dp",
    )
    return cfg.replace(flat=dict(flat)) if flat else cfg


# --------------------------------------------------------------------------- labels and tables
def ledger_label(ledger: Mapping[str, Any]) -> str:
    """The ledger's own guarantee text, e.g. "(ε, δ)-DP, ε=2.98, δ=1.2e-04" or "not DP (paper mode)"."""
    return PrivacyLedger.from_dict(dict(ledger)).label()


def _is_missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _row(row: Any) -> dict[str, Any]:
    return row.to_dict() if isinstance(row, pd.Series) else dict(row)


def group_label(rows: pd.DataFrame, claimed_epsilon: float | None = None) -> str:
    """Label of several runs of one variant (seeds, or several ε), in ``run_label``'s format.

    Guarantees are the rows' strings, joined when a group mixes them; ``claimed_epsilon``
    (the rows' own claimed ε, e.g. the largest over seeds) is shown only when given and
    every row is DP; otherwise the ε is left to the axis.
    """
    variant = str(rows["variant"].iloc[0])
    guarantees = sorted(set(rows["guarantee"].astype(str)))
    parts = [variant]
    if not _is_missing(claimed_epsilon) and guarantees == [DP]:
        parts.append(f"ε={float(claimed_epsilon):.2g}")
    parts.append(" / ".join(guarantees))
    return " · ".join(parts)


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One line per run: label, accuracy and the privacy numbers its ledger recorded.

    ``claimed ε`` is the row's ``epsilon`` (set only when the whole run is DP): a
    paper-mode run spends noise but claims nothing, so its cell says "none".
    """
    out = []
    for r in map(_row, rows):
        claim = r.get("epsilon")
        out.append({
            "model": run_label(r),
            "guarantee": r.get("guarantee"),
            "accuracy": r.get("accuracy"),
            "claimed ε": "none" if _is_missing(claim) else float(claim),
            "δ": r.get("delta"),
            "σ (noise multiplier)": r.get("sigma"),
            "q (sampling rate)": r.get("sample_rate"),
            "steps": r.get("steps"),
            "kept prefix layers": r.get("keep_layers"),
        })
    return pd.DataFrame(out)


def ledger_reads(ledger: Mapping[str, Any]) -> pd.DataFrame:
    """Every recorded access to the private split: who, how, DP-accounted or not, how often."""
    reads = ledger.get("reads", [])
    cols = ["who", "how", "accounted", "count", "examples"]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in reads], columns=cols)


def load_ledger(run_dir: str | Path) -> dict[str, Any]:
    import json

    return json.loads((Path(run_dir) / "ledger.json").read_text())


# --------------------------------------------------------------------------- figure plumbing
def figure_widget_available() -> bool:
    """plotly's FigureWidget needs ``anywidget`` (plotly >= 6)."""
    try:
        import anywidget  # noqa: F401
    except ImportError:
        return False
    return True


def new_figure(**layout: Any):
    """A FigureWidget when possible (live updates in place), else a plain Figure."""
    import plotly.graph_objects as go

    fig = go.FigureWidget() if figure_widget_available() else go.Figure()
    if layout:
        fig.update_layout(**layout)
    return fig


def replace_traces(fig, traces: Sequence[Any], **layout: Any) -> None:
    """Swap all traces of ``fig`` (works the same for Figure and FigureWidget)."""
    fig.data = []
    if traces:
        fig.add_traces(list(traces))
    if layout:
        fig.update_layout(**layout)


def snapshot(fig):
    """A static ``go.Figure`` copy of a (Figure)Widget's current state.

    Why: widget views need a live kernel (or saved widget state) to render; a snapshot
    is ordinary plotly output that any notebook viewer shows.
    """
    import plotly.graph_objects as go

    return go.Figure(fig)


class _View:
    """What to display for a figure: the FigureWidget itself, or an Output re-drawn on refresh."""

    def __init__(self, fig):
        import ipywidgets as w
        import plotly.graph_objects as go

        self.fig = fig
        self.live = isinstance(fig, go.FigureWidget)
        self.widget = fig if self.live else w.Output()
        self.refresh()

    def refresh(self) -> None:
        if self.live:
            return
        try:
            from IPython import get_ipython
            from IPython.display import clear_output, display
        except ImportError:  # pragma: no cover - ipython ships with ipykernel/ipywidgets
            return
        if get_ipython() is None:  # headless (tests): nothing to draw into
            return
        with self.widget:
            clear_output(wait=True)
            display(self.fig)


class Panel:
    """Controls + figures + the callback logic, displayable in a notebook."""

    def __init__(self) -> None:
        self.controls: dict[str, Any] = {}
        self.figures: dict[str, Any] = {}
        self._views: dict[str, _View] = {}
        self.widget: Any = None

    @property
    def figure(self):
        return next(iter(self.figures.values()))

    def _add_figure(self, name: str, fig) -> Any:
        self.figures[name] = fig
        self._views[name] = _View(fig)
        return self._views[name].widget

    def _refresh(self) -> None:
        for v in self._views.values():
            v.refresh()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


# --------------------------------------------------------------------------- static figures
def accuracy_bars(rows: Sequence[Mapping[str, Any]], metric: str = "accuracy", title: str | None = None):
    """One bar per run, x = its label with the guarantee, colour = the guarantee."""
    import plotly.graph_objects as go

    rows = [_row(r) for r in rows]
    fig = go.Figure()
    for r in rows:
        g = str(r.get("guarantee"))
        fig.add_trace(go.Bar(x=[run_label(r)], y=[r.get(metric)], name=run_label(r),
                             marker_color=GUARANTEE_COLORS.get(g, "#2ca02c"),
                             text=[f"{r.get(metric):.3f}" if not _is_missing(r.get(metric)) else ""],
                             textposition="outside"))
    fig.update_layout(title=title or f"{METRICS.get(metric, metric)} per model (label = variant · ε · guarantee)",
                      yaxis_title=METRICS.get(metric, metric), showlegend=False, height=420)
    return fig


def epsilon_curve(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp",
                  n_points: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """ε after t steps, t from 1 to ``steps`` (log-spaced), by the accountant training uses.

    RDP composes linearly in the number of steps, so the Rényi divergences of one step
    are computed once (Opacus' own ``compute_rdp`` with the accountant's orders) and
    scaled: the same numbers as ``epsilon_for`` at every t, ~30x faster, which keeps
    the sliders live. Other accountants are asked point by point (``epsilon_for``).
    """
    from .privacy import epsilon_for

    ts = np.unique(np.geomspace(1, max(int(steps), 1), num=n_points).round().astype(int))
    if accountant != "rdp":
        return ts, np.array([epsilon_for(accountant, sample_rate, sigma, int(t), delta) for t in ts])
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    one = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=orders))
    eps = np.array([float(get_privacy_spent(orders=orders, rdp=one * int(t), delta=delta)[0]) for t in ts])
    return ts, eps


def epsilon_vs_steps(sigmas: Sequence[float], sample_rate: float, steps: int, delta: float,
                     accountant: str = "rdp", n_points: int = 30):
    """Privacy spent as training goes on, one curve per noise multiplier σ."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for s in sigmas:
        ts, eps = epsilon_curve(s, sample_rate, steps, delta, accountant, n_points)
        fig.add_trace(go.Scatter(x=ts, y=eps, mode="lines", name=f"σ = {s:g}"))
    fig.update_layout(title=f"ε after t steps (q = {sample_rate:g}, δ = {delta:.0e}, {accountant.upper()} accountant)",
                      xaxis_title="steps t", yaxis_title="ε", xaxis_type="log", yaxis_type="log", height=420)
    return fig


def noise_vs_batch(n: int, epochs: float, epsilon: float, delta: float, batch_sizes: Sequence[int],
                   clip: float = 1.0, accountant: str = "rdp"):
    """σ needed for a target ε at each batch size, and the noise left on the *averaged* gradient.

    Why batch size matters: q = B/N and T = epochs·N/B both change with B; σ grows with
    B, but the noise on the mean gradient is σ·C/B and falls: large batches are cheap
    in privacy (the paper uses B = 1024).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from .config import PrivacyConfig
    from .privacy import noise_for_target

    sig, per = [], []
    for b in batch_sizes:
        q = b / n
        t = max(1, int(round(epochs * n / b)))
        s = noise_for_target(PrivacyConfig(epsilon=epsilon, accountant=accountant), q, t, delta)
        sig.append(s)
        per.append(s * clip / b)
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=list(batch_sizes), y=sig, mode="lines+markers", name="σ (noise multiplier)"), secondary_y=False)
    fig.add_trace(go.Scatter(x=list(batch_sizes), y=per, mode="lines+markers", name="noise std on the mean gradient σ·C/B"),
                  secondary_y=True)
    fig.update_layout(title=f"Target ε = {epsilon:g}, δ = {delta:.0e}, N = {n}, {epochs:g} epochs, C = {clip:g}",
                      xaxis_title="batch size B", xaxis_type="log", height=420)
    fig.update_yaxes(title_text="σ", secondary_y=False)
    fig.update_yaxes(title_text="σ·C/B", type="log", secondary_y=True)
    return fig


# --------------------------------------------------------------------------- 02: privacy sliders
class PrivacyPanel(Panel):
    """Sliders for σ, q, steps, δ (and C) that recompute the ε curve live.

    C does not enter ε (it scales the signal and the noise together); the readout shows
    what it changes: the noise std added to each summed gradient, σ·C.
    """

    def __init__(self, sigma: float = 1.0, sample_rate: float = 0.01, steps: int = 1000, delta_exp: int = -5,
                 clip: float = 1.0, accountant: str = "rdp", n_points: int = 30):
        super().__init__()
        import ipywidgets as w

        self.n_points = n_points
        c = self.controls
        c["sigma"] = w.FloatSlider(value=sigma, min=0.3, max=5.0, step=0.05, description="σ", continuous_update=False)
        c["sample_rate"] = w.FloatLogSlider(value=sample_rate, base=10, min=-4, max=0, step=0.05, description="q",
                                            readout_format=".4f", continuous_update=False)
        c["steps"] = w.IntSlider(value=steps, min=10, max=20000, step=10, description="steps", continuous_update=False)
        c["delta_exp"] = w.IntSlider(value=delta_exp, min=-10, max=-3, description="log10 δ", continuous_update=False)
        c["clip"] = w.FloatSlider(value=clip, min=0.1, max=10.0, step=0.1, description="C", continuous_update=False)
        c["accountant"] = w.Dropdown(options=["rdp", "prv"], value=accountant, description="accountant")
        c["readout"] = w.HTML()
        fig = new_figure(xaxis_title="steps t", yaxis_title="ε", xaxis_type="log", height=380,
                         title="ε spent after t steps")
        view = self._add_figure("epsilon", fig)
        for k in ("sigma", "sample_rate", "steps", "delta_exp", "clip", "accountant"):
            c[k].observe(lambda _ch: self.update(), names="value")
        left = w.VBox([c[k] for k in ("sigma", "sample_rate", "steps", "delta_exp", "clip", "accountant")] + [c["readout"]])
        self.widget = w.HBox([left, view])
        self.epsilon: float = math.nan
        self.update()

    @property
    def delta(self) -> float:
        return 10.0 ** self.controls["delta_exp"].value

    def update(self) -> float:
        """Recompute the curve for the current slider values; returns the final ε."""
        import plotly.graph_objects as go

        c = self.controls
        sigma, q, steps, acc = c["sigma"].value, c["sample_rate"].value, c["steps"].value, c["accountant"].value
        try:
            ts, eps = epsilon_curve(sigma, q, steps, self.delta, acc, self.n_points)
        except Exception as e:  # noqa: BLE001 - accountant refusals (e.g. PRV out of range) shown, not raised
            c["readout"].value = f"<b>accountant error:</b> {str(e).splitlines()[0]}"
            return math.nan
        self.epsilon = float(eps[-1])
        replace_traces(self.figures["epsilon"], [
            go.Scatter(x=ts, y=eps, mode="lines", name="ε(t)"),
            go.Scatter(x=[ts[-1]], y=[eps[-1]], mode="markers", marker=dict(size=10), name=f"after {steps} steps"),
        ], title=f"ε after t steps: σ={sigma:.2f}, q={q:.4g}, δ=1e{c['delta_exp'].value}, {acc.upper()}")
        epochs = steps * q
        c["readout"].value = (f"<b>ε = {self.epsilon:.3g}</b> at δ = 1e{c['delta_exp'].value}<br>"
                              f"≈ {epochs:.3g} epochs (steps × q)<br>"
                              f"noise std on each summed gradient: σ·C = {sigma * c['clip'].value:.3g}")
        self._refresh()
        return self.epsilon


def privacy_panel(**kw: Any) -> PrivacyPanel:
    """Build the σ/q/steps/δ explorer of notebook 02."""
    return PrivacyPanel(**kw)


# --------------------------------------------------------------------------- 04: results explorer
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


def _eps_col(table: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(table["target_epsilon"], errors="coerce") if "target_epsilon" in table else pd.Series(np.nan, index=table.index)


def aggregate(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, std and count over seeds per (variant, target ε); keeps the rows' guarantees
    and the largest claimed ε (NaN for runs that claim none)."""
    t = table.copy()
    t["_eps"] = _eps_col(t)
    t["_m"] = pd.to_numeric(t[metric], errors="coerce")
    t["_claim"] = pd.to_numeric(t["epsilon"], errors="coerce") if "epsilon" in t else np.nan
    t = t[t["_m"].notna()]
    if t.empty:
        return pd.DataFrame(columns=["variant", "target_epsilon", "mean", "std", "n", "guarantee", "claimed_epsilon"])
    g = t.groupby(["variant", t["_eps"].fillna(-1.0)], sort=True)
    out = g.agg(mean=("_m", "mean"), std=("_m", "std"), n=("_m", "size"),
                guarantee=("guarantee", lambda s: " / ".join(sorted(set(map(str, s))))),
                claimed_epsilon=("_claim", "max")).reset_index()
    out = out.rename(columns={"_eps": "target_epsilon"})
    out["target_epsilon"] = out["target_epsilon"].where(out["target_epsilon"] >= 0)
    out["std"] = out["std"].fillna(0.0)
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
        claims = [f"claimed ε = {c:.3g}" if not _is_missing(c) else "no ε claim: " + g
                  for c, g in zip(pts["claimed_epsilon"], pts["guarantee"])]
        traces.append(go.Scatter(
            x=pts["target_epsilon"].tolist(), y=pts["mean"].tolist(), mode="lines+markers",
            error_y=dict(type="data", array=pts["std"].tolist(), visible=True),
            name=group_label(rows), customdata=np.stack([pts["n"].to_numpy(), np.array(claims, dtype=object)], axis=1),
            hovertemplate="target ε=%{x}<br>" + METRICS.get(metric, metric) + "=%{y:.4g} ± %{error_y.array:.2g}"
                          "<br>%{customdata[0]} seed(s)<br>%{customdata[1]}<extra>%{fullData.name}</extra>",
        ))
    for v, pts in agg[agg["target_epsilon"].isna()].groupby("variant", sort=True):
        m, s, n = float(pts["mean"].iloc[0]), float(pts["std"].iloc[0]), int(pts["n"].iloc[0])
        traces.append(go.Scatter(
            x=[xlo, xhi], y=[m, m], mode="lines", line=dict(dash="dash", color="gray"),
            name=group_label(table[table["variant"] == v]),
            hovertemplate=f"{METRICS.get(metric, metric)}={m:.4g} ± {s:.2g} ({n} seed(s)), no ε<extra>%{{fullData.name}}</extra>",
        ))
    return traces


def run_points(table: pd.DataFrame, x: str, y: str, variants: Sequence[str] | None = None,
               eps_range: tuple[float, float] | None = None) -> list[Any]:
    """One marker per run (every seed), ``y`` against ``x``, a trace per variant."""
    import plotly.graph_objects as go

    t = table.copy()
    t["_eps"] = _eps_col(t)
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
                                 text=text, hovertemplate="%{text}<br>%{x:.4g}, %{y:.4g}<extra></extra>"))
    return traces


def metric_vs_epsilon(table: pd.DataFrame, metric: str = "accuracy", title: str | None = None):
    """Static version of the explorer's main figure (for reports and non-widget front ends)."""
    import plotly.graph_objects as go

    fig = go.Figure(metric_traces(table, metric))
    fig.update_layout(title=title or f"{METRICS.get(metric, metric)} vs target ε (mean ± std over seeds)",
                      xaxis_title="target ε of the DP-SGD noise (a claim only for (ε, δ)-DP runs)",
                      yaxis_title=METRICS.get(metric, metric), xaxis_type="log", height=450)
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
        self.set_table(table, metric)
        c["metric"].observe(self._metric_changed, names="value")
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
            eps = _eps_col(self.table).dropna() if len(self.table) else pd.Series(dtype=float)
            lo, hi = (float(eps.min()), float(eps.max())) if len(eps) else (1.0, 10.0)
            hi = hi if hi > lo else lo + 1.0
            s = c["eps_range"]
            s.min, s.max = -1e9, 1e9  # widen first so setting min/max never conflicts with the old range
            s.value = (lo, hi)
            s.min, s.max = lo, hi
        finally:
            self._muted = False
        self.update()

    def _metric_changed(self, change: dict[str, Any]) -> None:
        """A metric plotted against itself says nothing: move "versus" off it first."""
        c = self.controls
        if change["new"] is not None and c["versus"].value == change["new"]:
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
        eps = _eps_col(t)
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
        name = METRICS.get(metric, metric)
        replace_traces(self.figures["epsilon"], metric_traces(self.table, metric, variants, rng),
                       title=f"{name} vs target ε (mean ± std over seeds)", yaxis_title=name)
        if versus:
            replace_traces(self.figures["runs"], run_points(self.table, versus, metric, variants, rng),
                           title=f"every run: {name} vs {METRICS.get(versus, versus)}",
                           xaxis_title=METRICS.get(versus, versus), yaxis_title=name)
        self._refresh()
        self._show_summary(metric)

    def summary(self, metric: str | None = None) -> pd.DataFrame:
        """Mean ± std per (variant, target ε) of the selection, with guarantees (dpflat.sweep.summarize).

        ``summarize`` reports the accountant's ``epsilon_spent`` for every noisy run; next to
        it goes ``claimed_epsilon`` (the rows' own claim, empty unless DP), so a paper-mode
        line cannot be read as having an ε.
        """
        from .sweep import summarize

        sel = self.selection
        metric = metric or self.controls["metric"].value
        if not len(sel) or not metric:
            return pd.DataFrame()
        out = summarize(sel, metric)
        claims = aggregate(sel, metric)[["variant", "target_epsilon", "claimed_epsilon"]]
        claims = claims.assign(target_epsilon=claims["target_epsilon"].fillna(float("inf")))
        out = out.merge(claims, on=["variant", "target_epsilon"], how="left")
        return out.rename(columns={"epsilon_spent": "ε spent by DP-SGD (a claim only if DP)"})

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


# --------------------------------------------------------------------------- 04: sweep runner
def analysis_done(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "landscape" / "landscape.json").is_file()


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

        from .sweep import cells

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
        from .runs import RunDir

        return [cfg for cfg in self.grid if not RunDir.for_config(cfg).done]

    def run_dirs(self) -> list[Path]:
        from .runs import RunDir

        return [RunDir.for_config(cfg).path for cfg in self.grid]

    def _update_status(self, note: str = "") -> None:
        from .runs import RunDir

        done = sum(RunDir.for_config(cfg).done for cfg in self.grid)
        analysed = sum(analysis_done(p) for p in self.run_dirs())
        c = self.controls
        c["progress"].value, c["analysis"].value = done, analysed
        c["status"].value = f"{done}/{len(self.grid)} runs finished, {analysed} analysed {note}"

    def run(self) -> pd.DataFrame:
        """Train the missing cells, then (``analyze``) the landscape of every unanalysed run;
        returns the grid's rows of the results table and calls ``on_done`` with them."""
        from .runs import RunDir, load_results
        from .sweep import sweep

        c = self.controls
        c["button"].disabled = True
        try:
            with c["log"]:
                if self.missing():
                    self._update_status(f"· training {len(self.missing())} missing cell(s)")
                    variants, epsilons, seeds, modes = self.spec
                    sweep(self.base, variants, epsilons, seeds, modes, progress=self.base.train.progress,
                          on_cell=lambda _row: self._update_status("· training"))
                    self._update_status()
                if self.analyze:
                    from .analysis import analyze_run

                    for p in self.run_dirs():
                        if RunDir(p).done and not analysis_done(p):
                            self._update_status(f"· analysing {p.name}")
                            analyze_run(p, **self.analyze_kwargs)
                            self._update_status()
                if self.attack:
                    from .mia import MIA_FILE, attack_run, save_result

                    for p in self.run_dirs():
                        if RunDir(p).done and not (p / MIA_FILE).is_file():
                            self._update_status(f"· membership inference on {p.name}")
                            res = attack_run(p, **self.attack_kwargs)
                            save_result(res, p)
                            record_mia(res)
                    self._update_status()
        finally:
            c["button"].disabled = False
        self._update_status("· done")
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


# --------------------------------------------------------------------------- 05: ablations
LEVELS = ("awp", "layers", "distill")


def n_layers(backbone: str) -> int:
    """Encoder depth of a backbone (bounds the number of prefix layers one can drop)."""
    from .models import TINY, resolve_backbone, tiny_config

    if backbone in TINY:
        return int(tiny_config(backbone).num_hidden_layers)
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(resolve_backbone(backbone)).num_hidden_layers)
    except Exception:  # noqa: BLE001 - only bounds a slider
        return 12


def ablation_name(flat: Mapping[str, Any]) -> str:
    """A readable, distinct variant name for a combination of levels, modes and settings.

    Presets keep their names ("dp", "dp+awp-safe", "dpflat-paper"); other mixes list
    each level with its mode; settings off their defaults are appended (``_g`` γ,
    ``_l`` λ, ``_k`` dropped layers), so two ablations never share a name.
    """
    on = [lv for lv in LEVELS if flat.get(lv)]
    if not on:
        return "dp"
    modes = {lv: flat.get(f"{lv}_mode", "safe") for lv in on}
    if len(set(modes.values())) == 1:
        mode = next(iter(modes.values()))
        name = ("dpflat" if len(on) == 3 else "dp+" + "+".join(on)) + f"-{mode}"
    else:
        name = "dp+" + "+".join(f"{lv}.{modes[lv]}" for lv in on)
    d = FlatConfig()
    if "awp" in on:
        default_g = PAPER_AWP_GAMMA if modes["awp"] == "paper" else d.awp_gamma
        if not math.isclose(float(flat.get("awp_gamma", default_g)), default_g, rel_tol=1e-9):
            name += f"_g{float(flat['awp_gamma']):.3g}"
    if "layers" in on and int(flat.get("n_drop", d.n_drop)) != d.n_drop:
        name += f"_k{int(flat['n_drop'])}"
    if "distill" in on and not math.isclose(float(flat.get("distill_lambda", d.distill_lambda)), d.distill_lambda, rel_tol=1e-9):
        name += f"_l{float(flat['distill_lambda']):.3g}"
    return name


class AblationPanel(Panel):
    """Switch each flattening level and its mode, set γ, λ, n_drop and ε, train, compare.

    ``launch`` trains the chosen configuration with live progress (``train(on_step=...)``
    feeds ``figures["live"]``) and then redraws ``figures["compare"]``: every run of the
    results table, labelled with its guarantee, the new one outlined.
    """

    def __init__(self, base: RunConfig, epsilon: float | None = None):
        super().__init__()
        import ipywidgets as w

        self.base = base
        d = base.flat
        depth = n_layers(base.model.backbone)
        c = self.controls
        style = {"description_width": "initial"}
        c["epsilon"] = w.FloatLogSlider(value=epsilon or base.privacy.epsilon, base=10, min=-0.5, max=1.5, step=0.05,
                                        description="target ε", continuous_update=False)
        c["awp"] = w.Checkbox(value=d.awp, description="within-layer: AWP", style=style)
        c["awp_mode"] = w.ToggleButtons(options=["safe", "paper"], value=d.awp_mode)
        c["awp_gamma"] = w.FloatLogSlider(value=d.awp_gamma, base=10, min=-5, max=-0.5, step=0.1, description="γ",
                                          readout_format=".1e", continuous_update=False)
        c["layers"] = w.Checkbox(value=d.layers, description="cross-layer: drop prefix layers", style=style)
        c["layers_mode"] = w.ToggleButtons(options=["safe", "paper"], value=d.layers_mode)
        c["n_drop"] = w.IntSlider(value=min(d.n_drop, depth - 1), min=0, max=max(depth - 1, 0), description="n_drop")
        c["distill"] = w.Checkbox(value=d.distill, description="cross-model: distill", style=style)
        c["distill_mode"] = w.ToggleButtons(options=["safe", "paper"], value=d.distill_mode)
        c["distill_lambda"] = w.FloatLogSlider(value=d.distill_lambda, base=10, min=-4, max=0, step=0.1, description="λ",
                                               readout_format=".1e", continuous_update=False)
        c["name"] = w.HTML()
        c["launch"] = w.Button(description="Train", button_style="primary", icon="play")
        c["progress"] = w.IntProgress(value=0, min=0, max=1, description="steps")
        c["status"] = w.HTML()
        c["log"] = w.Output()
        c["awp_mode"].observe(self._on_awp_mode, names="value")
        for k in ("epsilon", "awp", "awp_mode", "awp_gamma", "layers", "layers_mode", "n_drop", "distill",
                  "distill_mode", "distill_lambda"):
            c[k].observe(lambda _ch: self._sync(), names="value")
        c["launch"].on_click(lambda _b: self.launch())
        live = new_figure(title="live: training loss and eval accuracy", xaxis_title="step", yaxis_title="train loss",
                          yaxis2=dict(title="eval accuracy", overlaying="y", side="right"), height=350)
        live.add_scatter(x=[], y=[], mode="lines", name="train loss")
        live.add_scatter(x=[], y=[], mode="lines+markers", name="eval accuracy", yaxis="y2")
        v_live = self._add_figure("live", live)
        v_cmp = self._add_figure("compare", new_figure(height=420))
        self.last: dict[str, Any] | None = None
        self._epochs = base.train.epochs
        levels = w.VBox([
            w.HBox([c["awp"], c["awp_mode"], c["awp_gamma"]]),
            w.HBox([c["layers"], c["layers_mode"], c["n_drop"]]),
            w.HBox([c["distill"], c["distill_mode"], c["distill_lambda"]]),
        ])
        self.widget = w.VBox([c["epsilon"], levels, w.HBox([c["launch"], c["name"]]), c["progress"], c["status"],
                              v_live, v_cmp, c["log"]])
        self._sync()
        self.refresh_compare()

    def _on_awp_mode(self, change: dict[str, Any]) -> None:
        """Each mode has its own γ default (apply_variant's rule): switch γ with the mode."""
        self.controls["awp_gamma"].value = PAPER_AWP_GAMMA if change["new"] == "paper" else FlatConfig().awp_gamma

    def flat_settings(self) -> dict[str, Any]:
        c = self.controls
        return {k: c[k].value for k in ("awp", "awp_mode", "awp_gamma", "layers", "layers_mode", "n_drop",
                                        "distill", "distill_mode", "distill_lambda")}

    def config(self) -> RunConfig:
        """The run config the controls describe (DP always on: this is an ablation of DP-Flat)."""
        flat = self.flat_settings()
        return self.base.replace(privacy={"enabled": True, "epsilon": round(float(self.controls["epsilon"].value), 3)},
                                 flat=flat, variant=ablation_name(flat))

    def _sync(self) -> None:
        c = self.controls
        for lv, params in (("awp", ("awp_mode", "awp_gamma")), ("layers", ("layers_mode", "n_drop")),
                           ("distill", ("distill_mode", "distill_lambda"))):
            for p in params:
                c[p].disabled = not c[lv].value
        paper = self.config().flat.paper_levels
        note = (f" · <span style='color:#d62728'>paper mode ({', '.join(paper)}) reads private data outside "
                "the accountant: the run will be labelled not DP</span>") if paper else ""
        c["name"].value = f"variant <code>{self.config().variant}</code>{note}"

    def on_step(self, row: Mapping[str, Any]) -> None:
        """``train(on_step=...)`` callback: extend the live curves and the progress bar."""
        c = self.controls
        live = self.figures["live"]
        step = int(row["step"])
        if row.get("epoch"):
            c["progress"].max = max(c["progress"].max, int(round(step / float(row["epoch"]) * self._epochs)))
        c["progress"].value = min(step, c["progress"].max)
        loss_t, acc_t = live.data[0], live.data[1]
        loss_t.x, loss_t.y = tuple(loss_t.x or ()) + (step,), tuple(loss_t.y or ()) + (float(row["loss"]),)
        if "eval_accuracy" in row:
            acc_t.x, acc_t.y = tuple(acc_t.x or ()) + (step,), tuple(acc_t.y or ()) + (float(row["eval_accuracy"]),)
        eps = f", ε spent so far {row['epsilon']:.3g}" if "epsilon" in row else ""
        c["status"].value = f"step {step}{eps}"
        self._refresh()

    def launch(self) -> dict[str, Any]:
        """Train the configured run (a finished one is loaded from its folder) and compare it."""
        from .train import train

        cfg = self.config()
        self._epochs = cfg.train.epochs
        c = self.controls
        live = self.figures["live"]
        for t in live.data:
            t.x, t.y = (), ()
        c["progress"].value, c["progress"].max = 0, 1
        c["launch"].disabled = True
        c["status"].value = f"training {cfg.variant} at target ε={cfg.privacy.epsilon:g} ..."
        live.update_layout(title=f"live: {cfg.variant} (its guarantee is the ledger's, once it finishes)")
        try:
            with c["log"]:
                row = train(cfg, on_step=self.on_step)
        finally:
            c["launch"].disabled = False
        c["progress"].value = c["progress"].max
        self.last = row
        live.update_layout(title=f"training loss and eval accuracy: {run_label(row)}")
        c["status"].value = f"done: <b>{run_label(row)}</b>, accuracy {row['accuracy']:.3f} (run {row['run_id']})"
        self.refresh_compare()
        return row

    def results(self) -> pd.DataFrame:
        from .runs import load_results

        return load_results(self.base.train.output_dir)

    def refresh_compare(self) -> None:
        """Bars of accuracy per (variant, target ε), mean ± std over seeds, with guarantees."""
        import plotly.graph_objects as go

        table = self.results()
        traces = []
        if len(table):
            key = table["variant"].astype(str) + "|" + _eps_col(table).fillna(-1.0).map("{:g}".format)
            last_id = (self.last or {}).get("run_id")
            for k, rows in table.groupby(key, sort=True):
                a = aggregate(rows, "accuracy")
                if a.empty:
                    continue
                r = a.iloc[0]
                label = group_label(rows, r.claimed_epsilon)
                is_last = last_id is not None and last_id in set(rows["run_id"])
                traces.append(go.Bar(
                    x=[label], y=[r["mean"]], error_y=dict(type="data", array=[r["std"]], visible=True), name=label,
                    marker=dict(color=GUARANTEE_COLORS.get(r.guarantee, "#2ca02c"),
                                line=dict(width=4 if is_last else 0, color="black")),
                ))
        replace_traces(self.figures["compare"], traces,
                       title="eval accuracy of every run in this results table (outlined: the last one trained)",
                       yaxis_title="eval accuracy", showlegend=False)
        self._refresh()


def ablation_panel(base: RunConfig, **kw: Any) -> AblationPanel:
    """Build the level/mode/γ/λ/n_drop panel of notebook 05."""
    return AblationPanel(base, **kw)


# --------------------------------------------------------------------------- 06: privacy audit
def variant_config(base: RunConfig, name: str) -> RunConfig:
    """Config of a display name as ``variant_name`` writes it ("dp", "dpflat-paper", "dp+awp-safe")."""
    from .config import VARIANTS, apply_variant

    if name in VARIANTS:
        return apply_variant(base, name)
    variant, _, mode = name.rpartition("-")
    return apply_variant(base, variant, mode)


def mia_label(result: Any) -> str:
    """``run_label`` of an attacked run, from the guarantee and claimed ε its ledger recorded."""
    return run_label({"variant": result.variant, "epsilon": result.claimed_epsilon, "guarantee": result.guarantee})


def mia_roc(run_dir: str | Path, *, max_per_side: int | None = None, seed: int = 0,
            device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """ROC (fpr, tpr) of ``dpflat.mia``'s loss-threshold attack on a run.

    Built from the same public pieces ``attack_run`` uses (same member / non-member
    sets for the same ``max_per_side`` and ``seed``), because its result keeps the
    metrics but not the per-example scores a ROC curve needs.
    """
    from .mia import example_losses, load_run_model, membership_sets, roc_points

    cfg, model = load_run_model(run_dir, device)
    members, nonmembers, _src = membership_sets(cfg, max_per_side=max_per_side, seed=seed)
    bs = cfg.train.eval_batch_size
    lm = example_losses(model, members, bs, device)["loss"]
    ln = example_losses(model, nonmembers, bs, device)["loss"]
    return roc_points(-lm, -ln)


def dp_roc_bound(epsilon: float, delta: float, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """The highest TPR any membership test can reach at each FPR against an (ε, δ)-DP run.

    TPR <= min(1, e^ε·FPR + δ, 1 - e^-ε·(1 - δ - FPR)) (Kairouz, Oh & Viswanath 2015):
    the region a claimed guarantee allows; an attack above it refutes the claim.
    """
    fpr = np.concatenate([[0.0], np.geomspace(1e-5, 1.0, n)])
    e = math.exp(epsilon)
    tpr = np.minimum.reduce([np.ones_like(fpr), e * fpr + delta, 1.0 - (1.0 - delta - fpr) / e])
    return fpr, np.clip(tpr, 0.0, 1.0)


def mia_table(results: Sequence[Any]) -> pd.DataFrame:
    """The attacks next to each run's guarantee: point estimates with their bootstrap CIs.

    "ε spent by DP-SGD" is the accountant's number for the noisy steps; for a run that
    is not DP it describes only those steps, which is why "claimed ε" stays "none".
    """
    fmt = lambda v, ci: f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"  # noqa: E731
    out = []
    for r in results:
        a = r.loss
        row = {
            "model": mia_label(r),
            "guarantee": r.guarantee,
            "claimed ε": "none" if _is_missing(r.claimed_epsilon) else round(float(r.claimed_epsilon), 3),
            "δ": r.delta,
            "ε spent by DP-SGD": "—" if _is_missing(r.epsilon_spent) else round(float(r.epsilon_spent), 3),
            "AUC": fmt(a.auc, a.auc_ci),
            "TPR@1%FPR": fmt(a.tpr_at_1_fpr, a.tpr_at_1_fpr_ci),
            "TPR@0.1%FPR": fmt(a.tpr_at_0_1_fpr, a.tpr_at_0_1_fpr_ci),
            "attack accuracy": fmt(a.accuracy, a.accuracy_ci),
            "members / non-members": f"{r.n_members} / {r.n_nonmembers} ({r.nonmember_source})",
            "task acc. members / non-members": f"{r.member_accuracy:.3f} / {r.nonmember_accuracy:.3f}",
        }
        if r.calibrated is not None:
            row["calibrated AUC"] = fmt(r.calibrated.auc, r.calibrated.auc_ci)
        out.append(row)
    return pd.DataFrame(out)


def mia_roc_figure(rocs: Mapping[str, tuple[np.ndarray, np.ndarray]], results: Mapping[str, Any] | None = None,
                   log: bool = True):
    """ROC curves of the attack per model; for every (ε, δ)-DP model, the bound its claim implies.

    Log-log axes (Carlini et al. 2022): what matters is TPR at *low* FPR, where a few
    confidently identified members are a real breach.
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    lo = 1e-3
    for i, (label, (fpr, tpr)) in enumerate(rocs.items()):
        color = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=np.maximum(fpr, lo) if log else fpr, y=np.maximum(tpr, lo) if log else tpr,
                                 mode="lines", name=label, line=dict(color=color, shape="hv")))
        r = (results or {}).get(label)
        if r is not None and r.guarantee == DP and not _is_missing(r.claimed_epsilon):
            bf, bt = dp_roc_bound(float(r.claimed_epsilon), float(r.delta or 0.0))
            fig.add_trace(go.Scatter(x=np.maximum(bf, lo) if log else bf, y=np.maximum(bt, lo) if log else bt,
                                     mode="lines", line=dict(color=color, dash="dot"),
                                     name=f"limit of its claim ({label})"))
    grid = np.geomspace(lo, 1, 50) if log else np.linspace(0, 1, 50)
    fig.add_trace(go.Scatter(x=grid, y=grid, mode="lines", line=dict(color="gray", dash="dash"), name="chance"))
    kind = "log" if log else "linear"
    fig.update_layout(title="Membership inference (loss threshold): ROC per model",
                      xaxis_title="false positive rate", yaxis_title="true positive rate",
                      xaxis_type=kind, yaxis_type=kind, height=480)
    return fig


def mia_bars(results: Sequence[Any]):
    """AUC with its bootstrap interval, one bar per model; 0.5 = the attacker learns nothing."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for r in results:
        a = r.loss
        fig.add_trace(go.Bar(x=[mia_label(r)], y=[a.auc], name=mia_label(r),
                             error_y=dict(type="data", symmetric=False, array=[a.auc_ci[1] - a.auc],
                                          arrayminus=[a.auc - a.auc_ci[0]]),
                             marker_color=GUARANTEE_COLORS.get(r.guarantee, "#2ca02c")))
    fig.add_hline(y=0.5, line_dash="dash", line_color="gray", annotation_text="chance")
    fig.update_layout(title="Attack AUC with 95% bootstrap interval", yaxis_title="AUC", showlegend=False, height=420)
    return fig


def record_mia(result: Any) -> dict[str, Any] | None:
    """Add the attack's numbers as ``mia_*`` columns to the run's row of its results table.

    Why: the explorer (notebook 04) offers every ``mia_*`` column as a metric, so an
    audited sweep can plot leakage against ε next to accuracy and sharpness.
    """
    from .runs import RESULTS, append_result

    run_dir = Path(result.run_dir)
    path = run_dir.parent / RESULTS
    if not path.is_file():
        return None
    table = pd.read_parquet(path)
    hit = table[table["run_id"] == run_dir.name]
    if hit.empty:
        return None
    row = hit.iloc[0].to_dict()
    row.update(mia_auc=result.loss.auc, mia_tpr_at_1_fpr=result.loss.tpr_at_1_fpr,
               mia_accuracy=result.loss.accuracy)
    if result.calibrated is not None:
        row["mia_calibrated_auc"] = result.calibrated.auc
    append_result(run_dir.parent, row)
    return row


def audit_bars(audits: Sequence[Any]):
    """Claimed ε (where there is one) next to the canary audit's empirical lower bound."""
    import plotly.graph_objects as go

    labels = [run_label({"variant": a.variant, "epsilon": a.claimed_epsilon, "guarantee": a.guarantee}) for a in audits]
    fig = go.Figure([
        go.Bar(x=labels, y=[a.epsilon_lower_bound for a in audits], name="empirical ε lower bound (canary audit)"),
        go.Bar(x=labels, y=[None if _is_missing(a.claimed_epsilon) else a.claimed_epsilon for a in audits],
               name="claimed ε (ledger; none for a run that is not DP)"),
    ])
    fig.update_layout(barmode="group", yaxis_title="ε", height=420,
                      title="A claim is refuted only if the lower bound rises above it")
    return fig


# --------------------------------------------------------------------------- 03: landscapes
def landscape_bars(analyses: Mapping[str, Mapping[str, Any]],
                   keys: Sequence[str] = ("top_eigenvalue", "hessian_trace", "sam_sharpness")):
    """One panel per curvature number (they have different scales), one bar per model label."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[METRICS.get(k, k) for k in keys])
    for j, k in enumerate(keys, start=1):
        for i, (label, a) in enumerate(analyses.items()):
            fig.add_trace(go.Bar(x=[label], y=[a.get(k)], name=label, showlegend=(j == 1),
                                 marker_color=GUARANTEE_COLORS.get(str(a.get("guarantee")), None)), row=1, col=j)
        fig.update_xaxes(showticklabels=False, row=1, col=j)
    fig.update_layout(title="Curvature of each model's loss at its trained parameters (lower = flatter)",
                      height=420, legend=dict(orientation="h", y=-0.15))
    return fig


def eigen_result(analysis: Mapping[str, Any]):
    """The stored top-k spectrum of an analysed run as a ``landscape.EigenResult`` (for ``plots``)."""
    from landscape.spectrum import Convergence, EigenResult, SpectrumSettings

    s = analysis["spectrum"]
    return EigenResult(np.asarray(s["eigenvalues"]), None, SpectrumSettings(**s["settings"]),
                       Convergence(**s["convergence"]))


class SurfacePanel(Panel):
    """Pick a model and a view (contour or 3D, linear or log loss) of its 2D loss surface."""

    def __init__(self, surfaces: Mapping[str, Any], kind: str = "contour"):
        super().__init__()
        import ipywidgets as w

        if not surfaces:
            raise ValueError("no surfaces to show")
        self.surfaces = dict(surfaces)
        c = self.controls
        c["model"] = w.Dropdown(options=list(self.surfaces), description="model", layout=w.Layout(width="60%"))
        c["kind"] = w.ToggleButtons(options=["contour", "3d"], value=kind)
        c["log"] = w.Checkbox(value=False, description="log10 loss")
        for k in ("model", "kind", "log"):
            c[k].observe(lambda _ch: self.update(), names="value")
        view = self._add_figure("surface", new_figure())
        self.widget = w.VBox([w.HBox([c["model"], c["kind"], c["log"]]), view])
        self.update()

    def update(self) -> None:
        from landscape import plots

        c = self.controls
        label = c["model"].value
        s = self.surfaces[label]
        src = (plots.plot_contour if c["kind"].value == "contour" else plots.plot_surface_3d)(s, labels=label, log=c["log"].value)
        fig = self.figures["surface"]
        replace_traces(fig, src.data)
        fig.layout = src.layout
        self._refresh()


def surface_panel(surfaces: Mapping[str, Any], **kw: Any) -> SurfacePanel:
    """Build the surface viewer of notebook 03 from ``{label: landscape.Surface}``."""
    return SurfacePanel(surfaces, **kw)


__all__ = [
    "METRICS",
    "audit_bars",
    "dp_roc_bound",
    "mia_bars",
    "mia_label",
    "mia_roc",
    "mia_roc_figure",
    "mia_table",
    "record_mia",
    "variant_config",
    "AblationPanel",
    "Explorer",
    "Panel",
    "PrivacyPanel",
    "SurfacePanel",
    "SweepRunner",
    "ablation_name",
    "ablation_panel",
    "accuracy_bars",
    "aggregate",
    "base_config",
    "comparison_table",
    "eigen_result",
    "epsilon_curve",
    "epsilon_vs_steps",
    "explorer",
    "figure_widget_available",
    "group_label",
    "landscape_bars",
    "ledger_label",
    "ledger_reads",
    "load_ledger",
    "metric_columns",
    "metric_traces",
    "metric_vs_epsilon",
    "new_figure",
    "noise_vs_batch",
    "privacy_panel",
    "project_root",
    "run_label",
    "run_points",
    "setup_notebook",
    "snapshot",
    "surface_panel",
    "sweep_runner",
]
