"""Figure helpers shared by the notebook panels (``widgets``) and the HTML report (``report``).

Why a module: both show the same plotly figures in different pages; a layout fix (a fixed
width that cut off a panel, a glyph missing from default fonts) belongs in one place.
"""

from __future__ import annotations

from typing import Any

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


__all__ = ["responsive", "safe_text"]
