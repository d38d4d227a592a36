"""The one figure helper: panels on matplotlib's object API (no pyplot state, no display),
written atomically as PNG. Every chart of the package and its scripts is drawn with it:
evaluation reports, training curves, the residual study.

matplotlib is the ``report`` extra: :func:`panels` raises
:class:`~comdefend.errors.MissingDependencyError` with the install line when it is missing.

Example:
    >>> import tempfile, pathlib
    >>> figure, (left, right) = panels(2, width=3, height=2)
    >>> curve(left, [1, 2, 3], [0.1, 0.5, 0.4], label="a", band=([0, .4, .3], [.2, .6, .5]))
    >>> curve(right, [1, 2], [1.0, 0.0], label="plain", reference=True)
    >>> path = save_png(figure, pathlib.Path(tempfile.mkdtemp()) / "chart.png")
    >>> path.read_bytes()[:4]
    b'\\x89PNG'
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comdefend.checkpoint import atomic_write
from comdefend.defenses.detectors import MissingDependencyError


def require_matplotlib(purpose: str = "charts") -> None:
    """Import matplotlib on the Agg backend, or raise with the install line."""
    try:
        import matplotlib
    except ImportError as error:
        raise MissingDependencyError(
            f"{purpose} need matplotlib: pip install comdefend[report]"
        ) from error
    matplotlib.use("Agg")


def panels(
    count: int,
    width: float = 5.0,
    height: float = 4.0,
    rows: int = 1,
    sharey: bool = False,
    sharex: bool = False,
    purpose: str = "charts",
) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels (``rows`` rows), each ``width`` x ``height`` inches;
    returns the figure and its axes in reading order."""
    require_matplotlib(purpose)
    from matplotlib.figure import Figure

    columns = -(-count // rows)
    figure = Figure(figsize=(width * columns, height * rows))
    grid = figure.subplots(rows, columns, squeeze=False, sharey=sharey, sharex=sharex)
    axes = [axis for row in grid for axis in row]
    for extra in axes[count:]:
        extra.set_visible(False)
    return figure, axes[:count]


def curve(
    axes: Any,
    xs: Sequence[float],
    ys: Sequence[float],
    label: str | None = None,
    reference: bool = False,
    band: tuple[Sequence[float], Sequence[float]] | None = None,
    color: str | None = None,
    markersize: float = 2.5,
) -> None:
    """One line with small markers; ``reference`` draws it black and dashed (the baseline every
    other line is read against); ``band`` = (lows, highs) shades an interval around it."""
    (line,) = axes.plot(
        list(xs),
        list(ys),
        marker="o",
        markersize=markersize,
        linewidth=1.2,
        color="black" if reference else color,
        linestyle="--" if reference else "-",
        label=label,
    )
    if band is not None:
        lows, highs = band
        axes.fill_between(
            list(xs), list(lows), list(highs), color=line.get_color(), alpha=0.12, linewidth=0
        )


def save_png(figure: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay the figure out and write it as PNG, atomically; returns the path."""
    figure.tight_layout()
    target = Path(path)
    atomic_write(target, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi))
    return target


__all__ = ["curve", "panels", "require_matplotlib", "save_png"]
