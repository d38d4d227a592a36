"""What the package tells its user while it works: progress bars and log messages.

Library code reports through the ``comdefend`` :mod:`logging` logger (``logger.info`` for
status, ``logger.warning`` for things a user must know) and draws progress bars with
:func:`progress_bar`; it never prints. As a library, Python's logging defaults apply (warnings
reach stderr, status lines are silent until you configure logging). The ``comdefend`` command
calls :func:`configure` once: status lines and warnings go to stderr, above the progress bars,
and ``--quiet`` hides the bars and the status lines (warnings and errors stay).

Example:
    >>> from comdefend.console import progress_bar
    >>> sum(progress_bar(range(3), enabled=False))
    3
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

logger = logging.getLogger("comdefend")

T = TypeVar("T")

_quiet = False


def duration(seconds: float) -> str:
    """``seconds`` to the minute, as the status lines and result pages write it.

    Example:
        >>> duration(4000.0), duration(90.0), duration(20.0)
        ('1 h 7 min', '2 min', '0 min')
    """
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def is_quiet() -> bool:
    """True after ``configure(quiet=True)`` (``comdefend --quiet``)."""
    return _quiet


def progress_bar(
    iterable: Iterable[T] | None = None, *, enabled: bool = True, **kwargs: Any
) -> Any:
    """A tqdm bar, hidden when ``enabled`` is False or the command line asked for ``--quiet``.

    Args:
        iterable: what to iterate over (or None for a manual ``update()`` bar).
        enabled: the caller's own progress switch (``progress=False`` in the API).
        **kwargs: passed to tqdm (``total``, ``desc``, ``unit``, ...).
    """
    return tqdm(iterable, disable=not enabled or _quiet, **kwargs)


class _TqdmHandler(logging.Handler):
    """Writes records to stderr through ``tqdm.write`` so that open bars are not torn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def configure(quiet: bool = False) -> None:
    """Set up the command line's output: status lines (unless ``quiet``) and warnings on
    stderr; ``quiet`` also hides progress bars. Calling it again replaces the setup."""
    global _quiet
    _quiet = quiet
    for handler in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def reset() -> None:
    """Undo :func:`configure` (tests call it to leave logging as they found it)."""
    global _quiet
    _quiet = False
    for handler in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
