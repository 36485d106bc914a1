"""Notebook 03 (flatness and landscapes): loss surfaces along chosen axes, sharpness over
training, curvature per model.

Everything is computed by the library on the eval split or public data (``dpflat.analysis``:
``analyze_run``, and ``axis_surface`` for surfaces along other axes, cached in each run's folder),
so the figures cost no privacy; this module only reads and shows them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..figures import guarantee_pattern, metric_label, responsive, run_color
from ..runs import RunDir
from .base import Panel, new_figure, replace_traces


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


#: the viewer's axes (keys of :data:`AXES`) -> the library's (``dpflat.analysis.SURFACE_AXES``)
AXIS_KINDS = {"random": "random", "top-2 eigenvectors": "eigen", "towards non-private": "interp"}


def axis_surfaces(run_dirs: Mapping[str, str | Path], axes: str, *, grid: int = 7, span: float = 1.0,
                  n_examples: int = 64, seed: int = 0, reference: str | None = None) -> dict[str, Any]:
    """2D loss surfaces of each model along ``axes`` (a key of :data:`AXES`): ``dpflat.analysis.axis_surface``
    on each run (computed there and cached in the run folder). ``towards non-private`` goes to the
    ``reference`` run (the non-private model), which itself gets no surface.
    """
    from .. import analysis as A

    if axes not in AXES:
        raise ValueError(f"axes must be one of {list(AXES)}, got {axes!r}")
    out: dict[str, Any] = {}
    for lab, d in run_dirs.items():
        surf = A.axis_surface(d, AXIS_KINDS[axes], grid=grid, span=span, n_examples=n_examples, seed=seed,
                              reference=reference, label=lab)
        if surf is not None:
            out[lab] = surf
    return out


#: what each phase of ``dpflat.analysis.analyze_run`` computes, as the status line says it
ANALYSIS_PHASES = {
    "loading": "loading the model and its eval batches",
    "spectrum": "spectrum: top Hessian eigenvalues (Lanczos)",
    "trace": "trace: Hutch++ Hessian trace",
    "density": "density: eigenvalue density (SLQ)",
    "SAM": "SAM: sharpness in a ρ-ball",
    "surface": "surface: 2D loss surface along random directions",
}


def analyze_runs(rows: Sequence[Mapping[str, Any]], *, progress: bool = True, status: Any = None,
                 **kw: Any) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """``dpflat.analysis.analyze_run`` on each run, with a status line naming the model and the phase.

    Returns ``({label: analysis}, {label: run_dir})``. Why a status line: the analysis of three
    models takes minutes, most of it in phases without a progress bar of their own (spectrum,
    trace, density, SAM); the line says "model 2/3 · dp · ε=3 · (ε, δ)-DP: trace ... · 0:41".
    A cached analysis (same settings) is read back and says so. ``status``: the ``StatusLine`` to write
    to (default: a new one, shown when ``progress``).
    """
    from .. import analysis as A
    from ..figures import run_label
    from .setup import StatusLine

    analyses: dict[str, dict[str, Any]] = {}
    run_dirs: dict[str, str] = {}
    rows = [dict(r) for r in rows]
    with (status if status is not None else StatusLine(enabled=progress)) as status:
        for i, r in enumerate(rows, start=1):
            head = f"model {i}/{len(rows)} · {run_label(r)}"
            status.set(f"{head}: reading its analysis (cached when the settings match)")
            a = A.analyze_run(r["run_dir"], progress=progress,
                              on_phase=lambda ph, head=head: status.set(f"{head}: {ANALYSIS_PHASES.get(ph, ph)}"), **kw)
            analyses[a["label"]] = a
            run_dirs[a["label"]] = str(r["run_dir"])
    return analyses, run_dirs


def trajectories(run_dirs: Mapping[str, str | Path]) -> dict[str, pd.DataFrame]:
    """Each run's ``sharpness.jsonl`` (``--sharpness-every``) as a table; runs without one are left out."""
    out = {}
    for lab, d in run_dirs.items():
        rows = RunDir(d).trajectory()
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
    for lab, t in tr.items():
        col = (colors or {}).get(lab, run_color(lab))
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


def landscape_bars(analyses: Mapping[str, Mapping[str, Any]],
                   keys: Sequence[str] = ("top_eigenvalue", "hessian_trace", "sam_sharpness")):
    """One panel per curvature number (they have different scales), one bar per model label."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(keys), subplot_titles=[metric_label(k) for k in keys])
    for j, k in enumerate(keys, start=1):
        for label, a in analyses.items():
            fig.add_trace(go.Bar(x=[label], y=[a.get(k)], name=label, showlegend=(j == 1),
                                 marker=dict(color=run_color(label),
                                             pattern_shape=guarantee_pattern(str(a.get("guarantee"))))), row=1, col=j)
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


def axis_surface_source(run_dirs: Mapping[str, str | Path], **kw: Any) -> Callable[[str, str], Any]:
    """``(axes, label) -> Surface or None`` for :class:`SurfacePanel`: one model's surface along ``axes``,
    computed when the viewer first shows it (``axis_surfaces`` on that model alone, cached in its folder).

    Why one model at a time: a surface along the eigenvectors costs a Lanczos run and a grid of
    forward passes (about a minute per model on a CPU core); the viewer shows one model at a time.
    """
    def source(axes: str, label: str) -> Any:
        if label not in run_dirs:
            return None
        return axis_surfaces({label: run_dirs[label]}, axes, **kw).get(label)

    return source


def name_colorbar(fig, text: str):
    """Title the colour bar of every contour, heatmap or surface trace (what the colours measure)."""
    for tr in fig.data:
        if getattr(tr, "type", "") in ("contour", "heatmap", "surface"):
            tr.colorbar.title = dict(text=text, side="right")
    return fig


class SurfacePanel(Panel):
    """Pick a model and a view (contour or 3D, linear or log loss) of its 2D loss surface."""

    def __init__(self, surfaces: Mapping[str, Any], kind: str = "contour",
                 axes_source: Callable[[str], Mapping[str, Any]] | None = None,
                 surface_source: Callable[[str, str], Any] | None = None):
        super().__init__()
        import ipywidgets as w

        if not surfaces:
            raise ValueError("no surfaces to show")
        self.surfaces = dict(surfaces)
        c = self.controls
        self.axes_source = axes_source  # axes -> {label: Surface}, every model at once (see axis_surfaces)
        # (axes, label) -> Surface or None: the shown model only, when first shown (see axis_surface_source)
        self.surface_source = surface_source
        self._by_axes: dict[str, dict[str, Any]] = {"random": self.surfaces}
        self._tried: set[tuple[str, str]] = set()
        c["model"] = w.Dropdown(options=list(self.surfaces), description="model", layout=w.Layout(width="auto"))
        # buttons in one row: ToggleButtons stack vertically in narrow boxes unless their width is fixed
        row_btn = {"button_width": "72px"}
        c["kind"] = w.ToggleButtons(options=["contour", "3d"], value=kind, style=row_btn)
        c["axes"] = w.ToggleButtons(options=list(AXES), value="random", style={"button_width": "150px"},
                                    tooltips=[AXES[a] for a in AXES],
                                    disabled=axes_source is None and surface_source is None)
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
        """The surfaces along the chosen axes computed so far (the shown model's first, when missing)."""
        c = self.controls
        ax, label = c["axes"].value, c["model"].value
        got = self._by_axes.setdefault(ax, {})
        if ax == "random" or label in got or (ax, label) in self._tried:
            return got
        if self.surface_source is not None:
            c["axes_note"].value = f"<i>computing the surface of {label} along {AXES[ax]} (about a minute) ...</i>"
            self._tried.add((ax, label))
            s = self.surface_source(ax, label)
            if s is not None:
                got[label] = s
        elif self.axes_source is not None:
            c["axes_note"].value = f"<i>computing the surfaces along {AXES[ax]} ...</i>"
            got.update(self.axes_source(ax))
            self._tried.update((ax, lab) for lab in self.surfaces)
        return got

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
        name_colorbar(src, "log10 loss" if c["log"].value else "loss")
        replace_traces(fig, src.data)
        fig.layout = src.layout
        c["axes_note"].value = f"<small>{axis_definition(s)}</small>"
        self._refresh()


def surface_panel(surfaces: Mapping[str, Any], **kw: Any) -> SurfacePanel:
    """Build the surface viewer of notebook 03 from ``{label: landscape.Surface}``."""
    return SurfacePanel(surfaces, **kw)
