"""What every notebook panel shares: figures that update in place, and the ``Panel`` base.

Why a base: each panel builder returns an object with

* ``widget``: the box to ``display`` in a notebook,
* ``figure`` / ``figures``: the plotly figures it keeps up to date,
* ``controls``: its ipywidgets by name,

and every callback is a plain method that tests drive headlessly (set a control's
``value``, read the figure's ``data``). Figures are ``plotly.graph_objects.FigureWidget``
when ``anywidget`` is installed (plotly >= 6 needs it); otherwise plain ``go.Figure``
objects re-drawn into an ``Output`` widget, with the same data, so a missing optional
package degrades the view, not the logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd


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


def fmt_delta(delta: float) -> str:
    """δ as every figure and printout of the lessons writes it (two significant digits)."""
    return f"{delta:.2g}"


def log_ticks(fig, axis: str = "y", **sel: Any) -> None:
    """Label a log axis at powers of ten only (plotly's default labels minor ticks "2, 5")."""
    upd = dict(type="log", dtick=1, exponentformat="power", showexponent="all", minor=dict(showgrid=True))
    (fig.update_yaxes if axis == "y" else fig.update_xaxes)(**upd, **sel)


def as_row(row: Any) -> dict[str, Any]:
    """A results row as a plain dict (a pandas row or any mapping)."""
    return row.to_dict() if isinstance(row, pd.Series) else dict(row)


def variant_config(base: Any, name: str) -> Any:
    """Config of a display name as ``config.variant_name`` writes it ("dp", "dpflat-paper", "dp+awp-safe").

    The inverse of ``variant_name``; kept here until ``dpflat.config`` has one.
    """
    from ..config import VARIANTS, apply_variant

    if name in VARIANTS:
        return apply_variant(base, name)
    variant, _, mode = name.rpartition("-")
    return apply_variant(base, variant, mode)
