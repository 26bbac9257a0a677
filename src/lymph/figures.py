"""What every figure of lymph shares: a figure on matplotlib's Agg canvas (no pyplot, so
matplotlib's global backend is never switched and no display is needed), its atomic PNG
write, and one distinct style per curve.

    fig, ax = new_figure((7.6, 4.6), dpi=110)
    ax.plot(...); legend_outside(ax)
    save_png(fig, path)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lymph.atomic import atomic_path

#: one distinct (colour, line style, marker) per curve: 10 colours x 4 line styles, so up to
#: 40 curves never share both colour and style (colour-blind safe "tab10" order)
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf")
_LINES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
STYLES = [{"color": _COLOURS[k % 10], "ls": _LINES[(k + k // 10) % 4], "marker": _MARKERS[k % 10]}
          for k in range(40)]


def new_figure(figsize: tuple[float, float], dpi: int) -> tuple[Any, Any]:
    """(figure, axes) on an Agg canvas of its own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """``fig`` as a PNG at ``path``, written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def legend_outside(ax: object, **kw: object) -> None:
    """The legend to the right of the axes, so that it never hides a curve."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
              title_fontsize=7, **kw)  # type: ignore[attr-defined]
