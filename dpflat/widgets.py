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
from .figures import responsive
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


# The lessons' sizes. "quick": the default path of every notebook in <= 10 min on 2 CPU cores
# (benchmarks/bench_notebooks.py measures it); "full": the earlier CPU setting (2-4x longer,
# smaller run-to-run noise). A notebook parameter left at None takes its value from here;
# the paper's GPU scale is in each parameters cell. Sharpness trajectories are on in both,
# on the public split (a diagnostic: the private split is never read for it).
SIZES: dict[str, dict[str, Any]] = {
    "quick": dict(train_size=1000, eval_size=300, public_size=200, max_length=32, prefix_len=8, epochs=2.0,
                  batch_size=64, physical_batch_size=64, lr=0.05,
                  flat={"layers_warmup_steps": 8, "layers_examples": 64, "layers_directions": 1,
                        "teacher_epochs": 2.0},
                  sharpness_every=8, sharpness_examples=32),
    "full": dict(train_size=2000, eval_size=500, public_size=0.1, max_length=40, prefix_len=16, epochs=2.0,
                 batch_size=128, physical_batch_size=64, lr=0.02, flat={}, sharpness_every=8, sharpness_examples=64),
}


def sized(size: str, **given: Any) -> dict[str, Any]:
    """The size preset with every parameter the notebook gave (not None) on top.

    Why None means "from the preset": the lessons share one run cache, so a run is reused
    only when its config is identical; one preset name keeps the six notebooks in step.
    """
    from .config import ConfigError

    if size not in SIZES:
        raise ConfigError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    out = dict(SIZES[size])
    for k, v in given.items():
        if v is None:
            continue
        out[k] = ({**out.get("flat", {}), **v} if k == "flat" else v)
    return out


def default_out_dir(size: str) -> str:
    """One folder per size, shared by all six notebooks (their one run cache)."""
    return f"out/notebooks/{size}"


def setup_notebook(out_dir: str | Path | None, data_dir: str | Path | None = None, threads: int | None = None,
                   size: str = "quick") -> tuple[Path, str | None]:
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
    out = Path(out_dir if out_dir is not None else default_out_dir(size)).expanduser()
    if not out.is_absolute():
        out = project_root() / out
    out.mkdir(parents=True, exist_ok=True)
    if data_dir is None and not os.environ.get("DPFLAT_DATA_DIR"):
        beside = project_root().parent / "shared" / "data"
        if (beside / "MANIFEST.txt").is_file():
            data_dir = beside
    return out, (str(data_dir) if data_dir is not None else None)


def base_config(*, out_dir: str | Path, backbone: str = "minilm", task: str = "sst2", data_dir: str | None = None,
                size: str | None = None, train_size: int | None = 2000, eval_size: int | None = 500,
                public_size: float = 0.1, max_length: int = 40, prefix_len: int = 16, epochs: float = 2.0,
                batch_size: int = 128, physical_batch_size: int = 64, lr: float = 2e-2, epsilon: float = 3.0,
                seed: int = 0, device: str = "cpu", progress: bool = True, flat: Mapping[str, Any] | None = None,
                **train_extra: Any) -> RunConfig:
    """The notebooks' shared run config, from their ``parameters`` cell (one place, one meaning).

    With ``size`` ("quick" or "full", see :data:`SIZES`) every parameter passed as None
    takes the preset's value; ``train_size=0`` means all of the private split.
    """
    from .config import DataConfig, ModelConfig, PrivacyConfig, TrainConfig

    if size is not None:
        given = dict(train_size=train_size, eval_size=eval_size, public_size=public_size, max_length=max_length,
                     prefix_len=prefix_len, epochs=epochs, batch_size=batch_size,
                     physical_batch_size=physical_batch_size, lr=lr, flat=flat, **train_extra)
        p = sized(size, **given)
        train_size, eval_size, public_size = p.pop("train_size"), p.pop("eval_size"), p.pop("public_size")
        max_length, prefix_len, epochs = p.pop("max_length"), p.pop("prefix_len"), p.pop("epochs")
        batch_size, physical_batch_size, lr = p.pop("batch_size"), p.pop("physical_batch_size"), p.pop("lr")
        flat = p.pop("flat")
        train_extra = p

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


# --------------------------------------------------------------------------- set-up status
# What each slow step before a run's first training step is doing (the training loop's own
# bar starts only after them): level class -> the line shown while its ``setup`` runs.
SETUP_PHASES = {
    "LayerSelection": "cross-layer level: warming up a prefix and scoring each layer's sharpness on the public split",
    "Distillation": "cross-model level: training the teacher on the public split",
    "SharpnessTrajectory": "sharpness trajectory: preparing its public/eval batches",
}


class SetupStatus:
    """A live status line (tqdm, elapsed seconds) for the set-up phases of ``train``/``sweep``.

    Why here and not in the levels: the levels' code stays free of display concerns. The
    context wraps ``prepare_data`` and each level class's ``setup`` for its duration only,
    and a small thread refreshes the elapsed time, so a 10-minute teacher never looks hung.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.phase = ""
        self.phases: list[tuple[str, float]] = []  # (phase, seconds), for tests and summaries
        self._patched: list[tuple[Any, str, Any]] = []
        self._bar = None
        self._stop = None

    def _set(self, phase: str) -> None:
        import time

        self.phase = phase
        self._t0 = time.monotonic()
        if self._bar is not None:
            self._bar.reset()
            self._bar.set_description_str(phase, refresh=True)

    def _wrap(self, owner: Any, attr: str, phase: str) -> None:
        import functools
        import time

        orig = getattr(owner, attr)
        status = self

        @functools.wraps(orig)
        def wrapped(*a: Any, **kw: Any) -> Any:
            status._set(phase)
            t0 = time.monotonic()
            try:
                return orig(*a, **kw)
            finally:
                status.phases.append((phase, time.monotonic() - t0))
                status._set("training (the run's own progress bar)")

        self._patched.append((owner, attr, orig))
        setattr(owner, attr, wrapped)

    def __enter__(self) -> "SetupStatus":
        import importlib
        import threading

        from . import session as train_mod

        self._wrap(train_mod, "prepare_data", "loading and tokenising the data")
        for mod, cls in (("layers", "LayerSelection"), ("distill", "Distillation"),
                         ("trajectory", "SharpnessTrajectory")):
            self._wrap(getattr(importlib.import_module(f"dpflat.flat.{mod}"), cls), "setup", SETUP_PHASES[cls])
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, bar_format="{desc} · {elapsed}", leave=False)
            self._stop = threading.Event()

            def tick() -> None:
                while not self._stop.wait(1.0):
                    self._bar.refresh()

            threading.Thread(target=tick, daemon=True).start()
        self._set("starting")
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, attr, orig in reversed(self._patched):
            setattr(owner, attr, orig)
        self._patched.clear()
        if self._stop is not None:
            self._stop.set()
        if self._bar is not None:
            self._bar.close()


def train_run(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    """``dpflat.train.train`` with a status line for every set-up step (see :class:`SetupStatus`)."""
    from .sweep import trainer

    with SetupStatus(enabled=cfg.train.progress):
        return trainer(cfg)(cfg, **kw)


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
    paper-mode or non-private run claims nothing, so its cell is NaN, as in every table.
    """
    out = []
    for r in map(_row, rows):
        claim = r.get("epsilon")
        out.append({
            "model": run_label(r),
            "guarantee": r.get("guarantee"),
            "accuracy": r.get("accuracy"),
            "claimed ε": math.nan if _is_missing(claim) else float(claim),  # NaN (not "inf"/"none"): no claim
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
    from .engine import epsilon_for

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
    fig.update_layout(title=f"ε after t steps (q = {sample_rate:.3g}, δ = {fmt_delta(delta)}, {accountant.upper()} accountant)",
                      xaxis_title="steps t", yaxis_title="ε", height=420)
    _log_ticks(fig, "x")
    _log_ticks(fig, "y")
    return fig


def fmt_delta(delta: float) -> str:
    """δ as every figure and printout of the lessons writes it (two significant digits)."""
    return f"{delta:.2g}"


def _log_ticks(fig, axis: str = "y", **sel: Any) -> None:
    """Label a log axis at powers of ten only (plotly's default labels minor ticks "2, 5")."""
    upd = dict(type="log", dtick=1, exponentformat="power", showexponent="all", minor=dict(showgrid=True))
    (fig.update_yaxes if axis == "y" else fig.update_xaxes)(**upd, **sel)


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
    from .engine import noise_for_target

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
    fig.update_layout(title=f"Target ε = {epsilon:g}, δ = {fmt_delta(delta)}, N = {n}, {epochs:g} epochs, C = {clip:g}",
                      xaxis_title="batch size B", height=420)
    fig.update_xaxes(type="log", tickvals=list(batch_sizes), ticktext=[str(b) for b in batch_sizes])
    fig.update_yaxes(title_text="σ", secondary_y=False)
    fig.update_yaxes(title_text="σ·C/B (log)", secondary_y=True)
    _log_ticks(fig, secondary_y=True)
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
        c["delta_exp"] = w.IntSlider(value=delta_exp, min=-10, max=-2, description="log10 δ", continuous_update=False)
        c["clip"] = w.FloatSlider(value=clip, min=0.1, max=10.0, step=0.1, description="C", continuous_update=False)
        c["accountant"] = w.Dropdown(options=["rdp", "prv"], value=accountant, description="accountant")
        c["readout"] = w.HTML()
        fig = new_figure(xaxis_title="steps t", yaxis_title="ε", xaxis_type="log", height=380,
                         title="ε spent after t steps")
        view = self._add_figure("epsilon", fig)
        for k in ("sigma", "sample_rate", "steps", "delta_exp", "clip", "accountant"):
            c[k].observe(lambda _ch: self.update(), names="value")
        left = w.VBox([c[k] for k in ("sigma", "sample_rate", "steps", "delta_exp", "clip", "accountant")] + [c["readout"]],
                      layout=w.Layout(min_width="330px"))  # room for the sliders and the readout
        self.widget = w.HBox([left, view], layout=w.Layout(flex_flow="row wrap"))
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
        ], title=f"ε after t steps: σ={sigma:.2f}, q={q:.4g}, δ={fmt_delta(self.delta)}, {acc.upper()}")
        epochs = steps * q
        c["readout"].value = (f"<b>ε = {self.epsilon:.3g}</b> at δ = {fmt_delta(self.delta)}<br>"
                              f"≈ {epochs:.3g} epochs (steps × q)<br>"
                              f"noise std on each summed gradient: σ·C = {sigma * c['clip'].value:.3g}")
        self._refresh()
        return self.epsilon


def privacy_panel(**kw: Any) -> PrivacyPanel:
    """Build the σ/q/steps/δ explorer of notebook 02."""
    return PrivacyPanel(**kw)


def run_mechanism(cfg: RunConfig) -> dict[str, Any]:
    """N, q, T and δ a run of this config will have (what its ledger will record).

    Why: the sliders of notebook 02 start from the lessons' own runs, not from a
    textbook setting, so the ε read off the panel is the ε the training cells spend.
    """
    n = cfg.data.train_size
    if n is None:
        raise ValueError("train_size is 'all': give the number of private examples explicitly")
    q = cfg.train.batch_size / n
    steps = max(1, int(round(cfg.train.epochs * -(-n // cfg.train.batch_size))))
    return {"n": int(n), "q": q, "steps": steps, "delta": cfg.privacy.resolve_delta(int(n)),
            "delta_exp": int(math.floor(math.log10(cfg.privacy.resolve_delta(int(n)))))}


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

        ``summarize`` reports the claimed ε (DP runs) and the DP-SGD part's ε of runs that are
        not DP; next to it goes ``claimed_epsilon`` (the rows' own claim, empty unless DP), so a
        paper-mode line cannot be read as having an ε.
        """
        from .sweep import summarize

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
        nothing = not self.missing() and not (self.analyze and any(
            RunDir(p).done and not analysis_done(p) for p in self.run_dirs()))
        try:
            with c["log"]:
                if self.missing():
                    self._update_status(f"· training {len(self.missing())} missing cell(s)")
                    variants, epsilons, seeds, modes = self.spec
                    with SetupStatus(enabled=self.base.train.progress):
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
                          yaxis2=dict(title="eval accuracy", overlaying="y", side="right", range=[0, 1]), height=350)
        live.add_scatter(x=[], y=[], mode="lines", name="train loss")
        live.add_scatter(x=[], y=[], mode="lines+markers", name="eval accuracy", yaxis="y2")
        v_live = self._add_figure("live", live)
        sharp = new_figure(title="live: sharpness (public data, a diagnostic) beside the ε spent so far",
                           xaxis_title="step", yaxis_title="top Hessian eigenvalue λ1",
                           yaxis2=dict(title="ε spent so far", overlaying="y", side="right", rangemode="tozero"),
                           height=330)
        sharp.add_scatter(x=[], y=[], mode="lines+markers", name="λ1 (sharpness trajectory)")
        sharp.add_scatter(x=[], y=[], mode="lines+markers", name="ε spent (accountant)", yaxis="y2",
                          line=dict(dash="dot"))
        v_sharp = self._add_figure("sharpness", sharp)
        self._traj_seen = 0
        v_cmp = self._add_figure("compare", new_figure(height=420))
        c["legend"] = w.HTML(ABLATION_LEGEND)
        self.last: dict[str, Any] | None = None
        self._run_dir: Path | None = None
        self._epochs = base.train.epochs
        levels = w.VBox([
            w.HBox([c["awp"], c["awp_mode"], c["awp_gamma"]]),
            w.HBox([c["layers"], c["layers_mode"], c["n_drop"]]),
            w.HBox([c["distill"], c["distill_mode"], c["distill_lambda"]]),
        ])
        self.widget = w.VBox([c["epsilon"], levels, w.HBox([c["launch"], c["name"]]), c["progress"], c["status"],
                              v_live, v_sharp, v_cmp, c["legend"], c["log"]])
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
        loss = row.get("train_loss_private", row.get("loss"))  # private diagnostic: not covered by the guarantee
        loss_t.x, loss_t.y = tuple(loss_t.x or ()) + (step,), tuple(loss_t.y or ()) + (float(loss),)
        if "eval_accuracy" in row:
            acc_t.x, acc_t.y = tuple(acc_t.x or ()) + (step,), tuple(acc_t.y or ()) + (float(row["eval_accuracy"]),)
        if "epsilon" in row:  # only rows of a run that is DP as a whole carry it
            eps = f", ε spent so far {row['epsilon']:.3g}"
        elif "dpsgd_part_epsilon" in row:
            eps = f", not DP (DP-SGD part alone {row['dpsgd_part_epsilon']:.3g})"
        else:
            eps = ""
        c["status"].value = f"step {step}{eps}"
        sharp = self.figures["sharpness"]
        if "epsilon" in row:
            e_t = sharp.data[1]
            e_t.x, e_t.y = tuple(e_t.x or ()) + (step,), tuple(e_t.y or ()) + (float(row["epsilon"]),)
        self._draw_trajectory()
        self._refresh()

    def _draw_trajectory(self) -> None:
        """λ1 points the run has written to its ``sharpness.jsonl`` so far (read when it grows)."""
        if self._run_dir is None:
            return
        from .flat.trajectory import load_trajectory

        traj = load_trajectory(self._run_dir)
        if len(traj) != self._traj_seen:
            self._traj_seen = len(traj)
            t0 = self.figures["sharpness"].data[0]
            t0.x, t0.y = [t["step"] for t in traj], [t["top_eigenvalue"] for t in traj]
            self._refresh()

    def launch(self) -> dict[str, Any]:
        """Train the configured run (a finished one is loaded from its folder) and compare it."""
        from .train import train

        cfg = self.config()
        self._epochs = cfg.train.epochs
        c = self.controls
        live = self.figures["live"]
        for t in (*live.data, *self.figures["sharpness"].data):
            t.x, t.y = (), ()
        from .runs import RunDir

        self._run_dir, self._traj_seen = RunDir.for_config(cfg).path, 0
        c["progress"].value, c["progress"].max = 0, 1
        c["launch"].disabled = True
        c["status"].value = f"training {cfg.variant} at target ε={cfg.privacy.epsilon:g} ..."
        live.update_layout(title=f"live: {cfg.variant} (its guarantee is the ledger's, once it finishes)")
        try:
            with c["log"]:
                with SetupStatus(enabled=cfg.train.progress):
                    row = train(cfg, on_step=self.on_step)
        finally:
            c["launch"].disabled = False
        if not live.data[0].x:  # a run read back from its folder: draw its stored curves
            from .runs import RunDir

            for m in RunDir(row["run_dir"]).metrics():
                self.on_step(m)
        self._draw_trajectory()
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
                       yaxis_title="eval accuracy", yaxis_range=[0, 1], showlegend=False)
        self._refresh()


ABLATION_LEGEND = (
    "<small><b>variant names</b>: <code>dp</code> plain DP-SGD · <code>dp+awp</code>, <code>dp+layers</code>, "
    "<code>dp+distill</code> one level · <code>dpflat</code> all three · suffix <code>-safe</code>/<code>-paper</code>: "
    "the mode of every level (mixed modes: <code>level.mode</code>) · settings off their defaults: "
    "<code>_g</code> AWP γ, <code>_k</code> n_drop (prefix layers dropped by the cross-layer level), "
    "<code>_l</code> distillation λ. Example: <code>dp+awp+layers-safe_k1</code> = AWP and cross-layer "
    "selection in safe mode, dropping 1 layer.</small>")


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
            "DP-SGD part ε (run not DP)": "—" if _is_missing(r.dpsgd_part_epsilon) else round(float(r.dpsgd_part_epsilon), 3),
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
    # Resolution: with n non-members the smallest non-zero FPR is 1/n; below it an empirical
    # ROC says nothing (a step at FPR 0 would sit above any claim's limit by construction),
    # so each curve and the axis start at 1/n (the largest over the models).
    steps = [float(np.min(np.asarray(f)[np.asarray(f) > 0])) for f, _ in rocs.values() if np.any(np.asarray(f) > 0)]
    lo = max(steps) if steps else 1e-3
    for i, (label, (fpr, tpr)) in enumerate(rocs.items()):
        color = palette[i % len(palette)]
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        keep = fpr >= lo - 1e-12 if log else np.ones_like(fpr, dtype=bool)
        fig.add_trace(go.Scatter(x=fpr[keep], y=np.maximum(tpr[keep], lo) if log else tpr, mode="lines", name=label,
                                 line=dict(color=color, shape="hv")))
        r = (results or {}).get(label)
        if r is not None and r.guarantee == DP and not _is_missing(r.claimed_epsilon):
            bf, bt = dp_roc_bound(float(r.claimed_epsilon), float(r.delta or 0.0))
            kb = bf >= lo if log else np.ones_like(bf, dtype=bool)
            fig.add_trace(go.Scatter(x=bf[kb], y=np.maximum(bt[kb], lo) if log else bt,
                                     mode="lines", line=dict(color=color, dash="dot"),
                                     name=f"limit of its claim ({label})"))
    grid = np.geomspace(lo, 1, 50) if log else np.linspace(0, 1, 50)
    fig.add_trace(go.Scatter(x=grid, y=grid, mode="lines", line=dict(color="gray", dash="dash"), name="chance"))
    kind = "log" if log else "linear"
    fig.update_layout(title="Membership inference (loss threshold): ROC per model",
                      xaxis_title=(f"false positive rate (from 1/n = {lo:.2g}: the attack's resolution with n "
                                   "non-members)" if log else "false positive rate"),
                      yaxis_title="true positive rate", xaxis_type=kind, yaxis_type=kind, height=480)
    if log:
        fig.update_xaxes(range=[math.log10(lo), 0])
        fig.update_yaxes(range=[math.log10(lo), 0])
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
    from .runs import update_result

    run_dir = Path(result.run_dir)
    cols = dict(mia_auc=result.loss.auc, mia_tpr_at_1_fpr=result.loss.tpr_at_1_fpr, mia_accuracy=result.loss.accuracy)
    if result.calibrated is not None:
        cols["mia_calibrated_auc"] = result.calibrated.auc
    return update_result(run_dir.parent, run_dir.name, cols)  # the one writer of the results table


def audit_bars(audits: Sequence[Any]):
    """Claimed ε (where there is one) next to the canary audit's empirical lower bound."""
    import plotly.graph_objects as go

    labels = [run_label({"variant": a.variant, "epsilon": a.claimed_epsilon, "guarantee": a.guarantee}) for a in audits]
    lower = [float(a.epsilon_lower_bound) for a in audits]
    claimed = [None if _is_missing(a.claimed_epsilon) else float(a.claimed_epsilon) for a in audits]
    fig = go.Figure([
        # a bound of 0 is a real result (no evidence against the claim): its value is written on the axis
        go.Bar(x=labels, y=lower, name="empirical ε lower bound (canary audit)",
               text=[f"{v:.2g}" + (" (no evidence of leakage)" if v == 0 else "") for v in lower],
               textposition="outside", marker_line=dict(width=2, color="#1f77b4")),
        go.Bar(x=labels, y=claimed, name="claimed ε (ledger; none for a run that is not DP)",
               text=["none" if v is None else f"{v:.3g}" for v in claimed], textposition="outside"),
    ])
    fig.update_layout(barmode="group", yaxis_title="ε", height=420,
                      title="A claim is refuted only if the lower bound rises above it")
    return fig



# --------------------------------------------------------------------------- figure layout helpers
# --------------------------------------------------------------------------- 03: the Hessian's own axes
AXES: dict[str, str] = {
    "random": "two random filter-normalised directions (Li et al. 2018)",
    "top-2 eigenvectors": "the top two Hessian eigenvectors v1, v2 (the sharpest directions)",
    "towards non-private": "the straight line to the non-private model (x: 0 = this model, 1 = non-private)"
                           " and one random direction",
}


def axis_definition(surface: Any) -> str:
    """One line that says what the two axes of a stored surface are."""
    dirs = surface.settings.get("directions", []) if isinstance(surface.settings, dict) else []
    parts = []
    for i, d in enumerate(dirs[:2], start=1):
        kind = d.get("kind") if isinstance(d, dict) else None
        if kind == "eigen":
            parts.append(f"d{i} = Hessian eigenvector v{d.get('index', i - 1) + 1} (λ = {d.get('eigenvalue', float('nan')):.3g}),"
                         f" scaled to the norm of a filter-normalised random direction")
        elif kind == "interpolation":
            parts.append(f"d{i} = θ_non-private − θ (distance {d.get('distance', float('nan')):.3g}): x = 1 is the "
                         "non-private model")
        elif kind:
            parts.append(f"d{i} = {kind} direction" + (" (filter-normalised)" if kind == "random" else ""))
    return "axes: " + "; ".join(parts) if parts else "axes: two directions through the trained θ (x = y = 0)"


def name_axes(fig, surface: Any) -> None:
    """Axis titles that say what each axis is, in every panel/scene of a surface figure."""
    dirs = surface.settings.get("directions", []) if isinstance(surface.settings, dict) else []
    names = []
    for i, d in enumerate(dirs[:2], start=1):
        kind = d.get("kind") if isinstance(d, dict) else None
        names.append({"eigen": f"v{(d.get('index', i - 1) if isinstance(d, dict) else i - 1) + 1} (Hessian eigenvector)",
                      "interpolation": "towards non-private (1 = non-private θ)",
                      "random": f"random direction d{i}"}.get(kind, f"d{i}"))
    if len(names) < 2:
        return
    fig.update_xaxes(title_text=names[0])
    fig.update_yaxes(title_text=names[1])
    for key in fig.layout:
        if key.startswith("scene"):
            fig.layout[key].update(xaxis_title=names[0], yaxis_title=names[1])


def axis_surfaces(run_dirs: Mapping[str, str | Path], axes: str, *, grid: int = 7, span: float = 1.0,
                  n_examples: int = 64, seed: int = 0, reference: str | None = None) -> dict[str, Any]:
    """2D loss surfaces of each model along ``axes`` (a key of :data:`AXES`), cached in the run folder.

    ``random``: the surface ``analyze_run`` stored. ``top-2 eigenvectors``: Lanczos on the
    model's own Hessian (``landscape.eigen_directions``), each unit eigenvector scaled to
    the norm of the random filter-normalised direction, so the units match the random
    view. ``towards non-private``: x along ``landscape.interpolation_direction`` to the
    ``reference`` run (the non-private model), y a random direction; the reference itself
    gets no surface. All on the eval subset analyze_run uses (no private data).
    """
    import landscape as ls
    from landscape.surface import Surface

    from . import analysis as A

    if axes not in AXES:
        raise ValueError(f"axes must be one of {list(AXES)}, got {axes!r}")
    if axes == "random":
        return {lab: A.load_surface(d) for lab, d in run_dirs.items()}
    tag = {"top-2 eigenvectors": "eigen", "towards non-private": "interp"}[axes]
    out: dict[str, Any] = {}
    for lab, d in run_dirs.items():
        if tag == "interp" and (reference is None or Path(d) == Path(reference)):
            continue
        cache = Path(d) / "landscape" / f"surface_{tag}_g{grid}_n{n_examples}_s{seed}"
        if cache.with_suffix(".json").is_file():
            out[lab] = Surface.load(cache)
            continue
        run = A.load_run(d)
        batches = A.analysis_batches(run, n_examples)
        rnd = ls.random_direction(run.model, seed=seed)
        if tag == "eigen":
            with ls.HessianOperator(run.model, A.ce_loss, batches) as H:
                eig = ls.top_eigenvalues(H, k=2, max_iter=30, tol=1e-3, seed=seed)
            d1, d2 = ls.eigen_directions(eig, 2)
            scale = float(rnd.vector.norm())
            d1.vector, d2.vector = d1.vector * scale, d2.vector * scale
            xs = np.linspace(-span, span, grid)
        else:
            other = A.load_run(reference).model
            d1 = ls.interpolation_direction(run.model, other)
            d2 = rnd
            xs = np.linspace(-0.5, 1.5, grid)
        surf = ls.loss_surface_2d(run.model, A.ce_loss, batches, d1, d2, xs=xs, ys=np.linspace(-span, span, grid),
                                  label=lab, progress=False, keep_directions=False)
        cache.parent.mkdir(parents=True, exist_ok=True)
        surf.save(cache)
        out[lab] = surf
    return out


# --------------------------------------------------------------------------- sharpness over time
def trajectories(run_dirs: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Each run's ``sharpness.jsonl`` (``--sharpness-every``) as a table; runs without one are left out."""
    from .flat.trajectory import load_trajectory

    out = {}
    for lab, d in run_dirs.items():
        rows = load_trajectory(d)
        if rows:
            out[lab] = pd.DataFrame(rows)
    return out


def trajectory_figure(run_dirs: Mapping[str, str | Path], colors: Mapping[str, str] | None = None):
    """Top Hessian eigenvalue and SAM sharpness over training, one line per model.

    Measured on public (or eval) data by the run itself, every ``sharpness_every`` steps:
    a diagnostic, not part of any guarantee (it never reads the private split).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    tr = trajectories(run_dirs)
    data = next(iter(tr.values()))["data"].iloc[0] if tr else "public"
    fig = make_subplots(rows=1, cols=2, subplot_titles=["top Hessian eigenvalue λ1", "SAM sharpness (ρ = 0.05 relative)"])
    palette = ["#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#d62728"]
    for i, (lab, t) in enumerate(tr.items()):
        col = (colors or {}).get(lab, palette[i % len(palette)])
        for j, key in enumerate(("top_eigenvalue", "sam_sharpness"), start=1):
            fig.add_trace(go.Scatter(x=t["step"], y=t[key], mode="lines+markers", name=lab, legendgroup=lab,
                                     showlegend=(j == 1), line=dict(color=col)), row=1, col=j)
        fig.update_xaxes(title_text="training step")
    fig.update_layout(title=f"Sharpness over training (on {data} data; a diagnostic, lower = flatter)",
                      height=400, legend=dict(orientation="h", y=-0.25))
    if not tr:
        fig.add_annotation(text="no run recorded a trajectory (train with sharpness_every > 0)", showarrow=False,
                           xref="paper", yref="paper", x=0.5, y=0.5)
    return fig


def flatness_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Accuracy, eval loss and the last trajectory point (λ1, SAM) per run, side by side."""
    out = []
    for r in map(_row, rows):
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
                                 text=[f"{r[k]:.3g}" if not _is_missing(r[k]) else "n/a"], textposition="outside"),
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
    It is the interval of one seed's difference; run-to-run (seed) variance comes on top.
    (dpflat.stats, where present, holds the project's shared paired statistics; this one
    needs only the two run folders.)
    """
    import torch

    from . import analysis as A
    from .evaluate import model_inputs

    correct = []
    for d in (run_a, run_b):
        run = A.load_run(d, attn="sdpa")
        ds = run.data[split]
        hits = []
        with torch.inference_mode():
            for b in torch.utils.data.DataLoader(ds, batch_size=128, shuffle=False):
                pred = run.model(**model_inputs(b, "cpu")).argmax(-1)
                hits.append((pred == b["labels"]).float().numpy())
        correct.append(np.concatenate(hits))
    diff = correct[1] - correct[0]
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"difference": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": int(len(diff)),
            "accuracy_a": float(correct[0].mean()), "accuracy_b": float(correct[1].mean()), "split": split}


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

    def __init__(self, surfaces: Mapping[str, Any], kind: str = "contour",
                 axes_source: Callable[[str], Mapping[str, Any]] | None = None):
        super().__init__()
        import ipywidgets as w

        if not surfaces:
            raise ValueError("no surfaces to show")
        self.surfaces = dict(surfaces)
        c = self.controls
        self.axes_source = axes_source  # axes -> {label: Surface}, computed on first use (see axis_surfaces)
        self._by_axes: dict[str, dict[str, Any]] = {"random": self.surfaces}
        c["model"] = w.Dropdown(options=list(self.surfaces), description="model", layout=w.Layout(width="auto"))
        # buttons in one row: ToggleButtons stack vertically in narrow boxes unless their width is fixed
        row_btn = {"button_width": "72px"}
        c["kind"] = w.ToggleButtons(options=["contour", "3d"], value=kind, style=row_btn)
        c["axes"] = w.ToggleButtons(options=list(AXES), value="random", style={"button_width": "150px"},
                                    tooltips=[AXES[a] for a in AXES], disabled=axes_source is None)
        c["log"] = w.Checkbox(value=False, description="log10 loss", layout=w.Layout(width="auto"))
        c["axes_note"] = w.HTML()
        for k in ("model", "kind", "log", "axes"):
            c[k].observe(lambda _ch: self.update(), names="value")
        view = self._add_figure("surface", new_figure())
        flow = w.Layout(flex_flow="row wrap", align_items="center")
        self.widget = w.VBox([w.HBox([c["model"], c["kind"], c["log"]], layout=flow),
                              w.HBox([c["axes"]], layout=flow), c["axes_note"], view])
        self.update()

    def current(self) -> dict[str, Any]:
        """The surfaces along the chosen axes (computed once per axes kind)."""
        ax = self.controls["axes"].value
        if ax not in self._by_axes:
            self.controls["axes_note"].value = f"<i>computing the surfaces along {AXES[ax]} ...</i>"
            self._by_axes[ax] = dict(self.axes_source(ax))
        return self._by_axes[ax]

    def update(self) -> None:
        from landscape import plots

        c = self.controls
        label = c["model"].value
        surfaces = self.current()
        fig = self.figures["surface"]
        if label not in surfaces:  # e.g. the non-private model has no "towards non-private" axis
            replace_traces(fig, [], title=f"{label}: no surface along {AXES[c['axes'].value]}")
            c["axes_note"].value = ""
            self._refresh()
            return
        s = surfaces[label]
        src = (plots.plot_contour if c["kind"].value == "contour" else plots.plot_surface_3d)(s, labels=label, log=c["log"].value)
        responsive(src)
        name_axes(src, s)
        replace_traces(fig, src.data)
        fig.layout = src.layout
        c["axes_note"].value = f"<small>{axis_definition(s)}</small>"
        self._refresh()


def surface_panel(surfaces: Mapping[str, Any], **kw: Any) -> SurfacePanel:
    """Build the surface viewer of notebook 03 from ``{label: landscape.Surface}``."""
    return SurfacePanel(surfaces, **kw)


__all__ = [
    "AXES",
    "SIZES",
    "SetupStatus",
    "axis_definition",
    "axis_surfaces",
    "flatness_table",
    "fmt_delta",
    "name_axes",
    "paired_accuracy_difference",
    "payoff_figure",
    "responsive",
    "run_mechanism",
    "sized",
    "train_run",
    "trajectories",
    "trajectory_figure",
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
