"""Figures: plotly (interactive, notebooks) and seaborn/matplotlib (static, reports).

Every function takes one result, a list of results, or a mapping ``{label: result}``
(one entry per model) and shows each model's label in titles or legends. Labels come
from ``labels=`` (a string or a list), the mapping's keys, or a surface's own
``settings["label"]``; callers pass e.g. ``"DP ε=3 · (ε, δ)-DP"`` so the privacy
guarantee travels with the picture.

Results: :class:`~landscape.surface.Surface` (1D/2D), :class:`~landscape.spectrum.DensityResult`,
:class:`~landscape.spectrum.EigenResult`, ``{group: GroupSpectrum}`` and
``{group: Sharpness}`` mappings (per-layer bars).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._params import LandscapeError

# --------------------------------------------------------------------------- labels


def _is_result(x: Any) -> bool:
    return hasattr(x, "settings") or hasattr(x, "definition") or hasattr(x, "eigen")


def _is_group_map(x: Any) -> bool:
    """``{group: GroupSpectrum | per-group Sharpness}`` (one model), not ``{label: result}``."""

    def per_group(v: Any) -> bool:
        return hasattr(v, "eigen") or getattr(getattr(v, "definition", None), "group", None) is not None

    return isinstance(x, Mapping) and bool(x) and all(per_group(v) for v in x.values())


def _items(objs: Any, labels: str | Sequence[str] | None = None) -> list[tuple[str, Any]]:
    """Normalise the inputs to ``[(label, result), ...]``."""
    if _is_result(objs) or _is_group_map(objs):
        items: list[Any] = [objs]
        keys: list[str | None] = [None]
    elif isinstance(objs, Mapping):
        keys, items = list(objs.keys()), list(objs.values())
    elif isinstance(objs, Sequence) and not isinstance(objs, str):
        items = list(objs)
        keys = [None] * len(items)
    else:
        raise LandscapeError(f"cannot plot {type(objs).__name__}")
    if not items:
        raise LandscapeError("nothing to plot")
    if isinstance(labels, str):
        labels = [labels]
    if labels is not None:
        if len(labels) != len(items):
            raise LandscapeError(f"{len(labels)} labels for {len(items)} models")
        keys = list(labels)
    out = []
    for i, (k, r) in enumerate(zip(keys, items)):
        if k is None:
            k = getattr(r, "label", None) or (r.settings.get("label") if isinstance(getattr(r, "settings", None), dict) else None)
        out.append((str(k) if k is not None else f"model {i + 1}", r))
    return out


def _title(base: str, items: list[tuple[str, Any]], title: str | None) -> str:
    if title is not None:
        return title
    return f"{base}: {items[0][0]}" if len(items) == 1 else base


def _axis_names(s: Any) -> list[str]:
    dirs = s.settings.get("directions", []) if isinstance(s.settings, dict) else []
    names = []
    for i in range(s.ndim):
        kind = dirs[i].get("kind") if i < len(dirs) and isinstance(dirs[i], dict) else None
        names.append(f"d{i + 1}" + (f" ({kind})" if kind else ""))
    return names


def _surfaces(objs: Any, labels: Any, ndim: int) -> list[tuple[str, Any]]:
    items = _items(objs, labels)
    for lab, s in items:
        if getattr(s, "ndim", None) != ndim:
            raise LandscapeError(f"{lab}: expected a {ndim}D surface")
    return items


# --------------------------------------------------------------------------- plotly
def plot_surface_3d(surfaces: Any, labels: Any = None, title: str | None = None, log: bool = False, colorscale: str = "Viridis"):
    """Interactive 3D surface(s), one scene per model, titled with its label."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = _surfaces(surfaces, labels, 2)
    fig = make_subplots(rows=1, cols=len(items), specs=[[{"type": "scene"}] * len(items)], subplot_titles=[l for l, _ in items])
    for i, (lab, s) in enumerate(items, start=1):
        z = np.log10(np.maximum(s.losses, 1e-12)) if log else s.losses
        ax = _axis_names(s)
        fig.add_trace(
            go.Surface(x=s.coords[0], y=s.coords[1], z=z.T, name=lab, colorscale=colorscale, showscale=(i == len(items)),
                       hovertemplate=f"{lab}<br>x=%{{x:.3g}}<br>y=%{{y:.3g}}<br>loss=%{{z:.4g}}<extra></extra>"),
            row=1, col=i,
        )
        scene = "scene" if i == 1 else f"scene{i}"
        fig.layout[scene].update(xaxis_title=ax[0], yaxis_title=ax[1], zaxis_title="log10 loss" if log else "loss")
    fig.update_layout(title=_title("Loss surface", items, title), height=500, width=max(520, 480 * len(items)))
    return fig


def plot_contour(surfaces: Any, labels: Any = None, title: str | None = None, log: bool = False, ncontours: int = 30):
    """Contour map(s) of 2D surfaces, one panel per model, with the origin marked."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    items = _surfaces(surfaces, labels, 2)
    fig = make_subplots(rows=1, cols=len(items), subplot_titles=[l for l, _ in items])
    for i, (lab, s) in enumerate(items, start=1):
        z = np.log10(np.maximum(s.losses, 1e-12)) if log else s.losses
        fig.add_trace(go.Contour(x=s.coords[0], y=s.coords[1], z=z.T, name=lab, ncontours=ncontours, showscale=(i == len(items))), row=1, col=i)
        fig.add_trace(go.Scatter(x=[0], y=[0], mode="markers", marker=dict(symbol="x", color="red"), name=f"{lab} (θ0)", showlegend=False), row=1, col=i)
        ax = _axis_names(s)
        fig.update_xaxes(title_text=ax[0], row=1, col=i)
        fig.update_yaxes(title_text=ax[1], row=1, col=i)
    fig.update_layout(title=_title("Loss contours", items, title), height=450, width=max(500, 450 * len(items)))
    return fig


def plot_1d(surfaces: Any, labels: Any = None, title: str | None = None, log: bool = False):
    """1D loss curves, one line per model (legend = labels)."""
    import plotly.graph_objects as go

    items = _surfaces(surfaces, labels, 1)
    fig = go.Figure()
    for lab, s in items:
        fig.add_trace(go.Scatter(x=s.coords[0], y=s.losses, mode="lines+markers", name=lab))
    fig.update_layout(title=_title("Loss along a direction", items, title), xaxis_title=_axis_names(items[0][1])[0], yaxis_title="loss",
                      yaxis_type="log" if log else "linear", showlegend=True)
    return fig


def plot_density(densities: Any, labels: Any = None, title: str | None = None, log: bool = True, sigma: float | None = None, n_grid: int = 1000):
    """Eigenvalue spectral density (SLQ, Gaussian-smoothed), one line per model."""
    import plotly.graph_objects as go

    items = _items(densities, labels)
    fig = go.Figure()
    for lab, d in items:
        grid, dens = d.density(sigma=sigma, n_grid=n_grid)
        fig.add_trace(go.Scatter(x=grid, y=np.maximum(dens, 1e-12) if log else dens, mode="lines", name=lab))
    fig.update_layout(title=_title("Hessian eigenvalue density", items, title), xaxis_title="eigenvalue", yaxis_title="density",
                      yaxis_type="log" if log else "linear", showlegend=True)
    return fig


def _bars(items: list[tuple[str, Any]], quantity: str) -> tuple[list[str], list[tuple[str, list[float]]]]:
    """Categories and per-model values for eigenvalue / per-group bar charts."""
    series: list[tuple[str, dict[str, float]]] = []
    for lab, r in items:
        if hasattr(r, "eigenvalues"):
            series.append((lab, {f"λ{i + 1}": float(v) for i, v in enumerate(np.asarray(r.eigenvalues))}))
        elif isinstance(r, Mapping):
            vals = {}
            for g, v in r.items():
                if hasattr(v, "eigen"):
                    vals[str(g)] = float(v.trace.trace) if quantity == "trace" else float(v.eigen.top)
                elif hasattr(v, "definition"):
                    vals[str(g)] = float(v.value)
                else:
                    vals[str(g)] = float(v)
            series.append((lab, vals))
        elif hasattr(r, "value") and hasattr(r, "definition"):
            series.append((lab, {r.definition.kind: float(r.value)}))
        else:
            raise LandscapeError(f"{lab}: cannot draw bars for {type(r).__name__}")
    cats: list[str] = []
    for _, v in series:
        cats += [c for c in v if c not in cats]
    return cats, [(lab, [v.get(c, math.nan) for c in cats]) for lab, v in series]


def plot_eigenvalues(results: Any, labels: Any = None, title: str | None = None, quantity: str = "top", log: bool = False):
    """Grouped bars: top-k eigenvalues per model, or per-group top eigenvalue / trace
    (``quantity="trace"``) from ``{group: GroupSpectrum}`` mappings, or per-group sharpness."""
    import plotly.graph_objects as go

    items = _items(results, labels)
    cats, series = _bars(items, quantity)
    fig = go.Figure([go.Bar(x=cats, y=vals, name=lab) for lab, vals in series])
    what = "Hessian trace" if quantity == "trace" else "Hessian eigenvalues"
    fig.update_layout(title=_title(what, items, title), barmode="group", yaxis_type="log" if log else "linear", showlegend=True)
    return fig


def plot_sharpness(results: Any, labels: Any = None, title: str | None = None):
    """Bars of sharpness per group (or one bar per model); the definition goes in the title."""
    items = _items(results, labels)
    fig = plot_eigenvalues(results, labels, title=title)
    first = items[0][1]
    s = next(iter(first.values())) if isinstance(first, Mapping) else first
    d = s.definition
    sub = f"{d.kind}, rho={d.rho:g}{' (relative)' if d.relative else ''}, {d.directions}, {d.n_examples} examples"
    fig.update_layout(title=(title or _title("Sharpness", items, None)) + f"<br><sup>{sub}</sup>")
    return fig


# --------------------------------------------------------------------------- static
def _mpl():
    """pyplot; matplotlib picks a headless backend (Agg) by itself when there is no display."""
    import matplotlib.pyplot as plt

    return plt


def static_surface(surfaces: Any, labels: Any = None, title: str | None = None, log: bool = False, levels: int = 30):
    """Filled contour panels (matplotlib), one per model, titled with its label."""
    plt = _mpl()
    items = _surfaces(surfaces, labels, 2)
    fig, axes = plt.subplots(1, len(items), figsize=(4.5 * len(items), 4), squeeze=False)
    for ax, (lab, s) in zip(axes[0], items):
        z = np.log10(np.maximum(s.losses, 1e-12)) if log else s.losses
        cs = ax.contourf(s.coords[0], s.coords[1], z.T, levels=levels, cmap="viridis")
        ax.contour(s.coords[0], s.coords[1], z.T, levels=levels, colors="k", linewidths=0.3)
        ax.plot([0], [0], "rx")
        ax.set_title(lab)
        names = _axis_names(s)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        fig.colorbar(cs, ax=ax, label="log10 loss" if log else "loss")
    fig.suptitle(_title("Loss surface", items, title))
    fig.tight_layout()
    return fig


def static_1d(surfaces: Any, labels: Any = None, title: str | None = None, log: bool = False):
    """1D curves with seaborn styling, legend = labels."""
    import seaborn as sns

    plt = _mpl()
    items = _surfaces(surfaces, labels, 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, s in items:
        sns.lineplot(x=s.coords[0], y=s.losses, marker="o", label=lab, ax=ax)
    ax.set_xlabel(_axis_names(items[0][1])[0])
    ax.set_ylabel("loss")
    if log:
        ax.set_yscale("log")
    ax.set_title(_title("Loss along a direction", items, title))
    fig.tight_layout()
    return fig


def static_density(densities: Any, labels: Any = None, title: str | None = None, log: bool = True, sigma: float | None = None):
    """ESD lines (matplotlib), legend = labels."""
    plt = _mpl()
    items = _items(densities, labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, d in items:
        grid, dens = d.density(sigma=sigma)
        ax.plot(grid, np.maximum(dens, 1e-12) if log else dens, label=lab)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title(_title("Hessian eigenvalue density", items, title))
    fig.tight_layout()
    return fig


def static_eigenvalues(results: Any, labels: Any = None, title: str | None = None, quantity: str = "top"):
    """Grouped seaborn bars of eigenvalues / per-group values, hue = model label."""
    import pandas as pd
    import seaborn as sns

    plt = _mpl()
    items = _items(results, labels)
    cats, series = _bars(items, quantity)
    df = pd.DataFrame([{"which": c, "value": v, "model": lab} for lab, vals in series for c, v in zip(cats, vals)])
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * len(cats) * len(items) + 2), 4))
    sns.barplot(data=df, x="which", y="value", hue="model", ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("trace" if quantity == "trace" else "value")
    ax.set_title(_title("Hessian trace" if quantity == "trace" else "Hessian eigenvalues", items, title))
    fig.tight_layout()
    return fig


__all__ = [
    "plot_1d",
    "plot_contour",
    "plot_density",
    "plot_eigenvalues",
    "plot_sharpness",
    "plot_surface_3d",
    "static_1d",
    "static_density",
    "static_eigenvalues",
    "static_surface",
]
