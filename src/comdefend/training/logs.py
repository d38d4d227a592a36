"""Reading a training run's ``log.jsonl`` back: one typed record for every script and report.

The engine writes one JSON object per line: a ``start`` event with the run's config, one record
per logging window (loss, largest code logit, saturated-output fraction, ...), one per held-out
evaluation (``heldout_psnr_db``, ``collapse`` when the engine flagged it), and events such as
``resume`` (with the stabilizers of that resume) and ``rollback`` (``iteration`` -> ``to``).
:func:`read_training_log` turns such a file into a :class:`TrainingLog`.

>>> first_collapse({100: 20.0, 200: 25.0, 300: 18.5, 400: 26.0})
300
>>> first_collapse({100: 20.0, 200: 25.0}) is None
True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .engine import is_collapse
from .run import kernels
from .trainer import COLLAPSE_DB


def first_collapse(psnr: dict[int, float], margin: float = COLLAPSE_DB) -> int | None:
    """The first evaluation more than ``margin`` dB below the best one before it, if any
    (:func:`~comdefend.training.engine.is_collapse`, the engine's rule)."""
    best = float("-inf")
    for iteration in sorted(psnr):
        if is_collapse(psnr[iteration], best, "max", margin):
            return iteration
        best = max(best, psnr[iteration])
    return None


#: The events that end a training session (``stopped_early`` is followed by ``session_end``).
SESSION_ENDS = ("interrupted", "paused", "session_end", "diverged")


@dataclass
class TrainingLog:
    """What a training log says about its run.

    ``psnr`` maps iteration -> held-out PSNR (dB); after a rollback the redone iterations'
    evaluations replace the collapsed ones (the collapsed ones stay in ``flagged``).
    ``code_logit`` and ``saturated_output`` are those of each logged window (logs written since
    they are recorded). ``added_stabilizers`` lists stabilizers a resume turned on, as
    ``"NAME from ITERATION"``; ``rollbacks`` the ``(from, to)`` iterations of each rollback.
    A training session ends with one of :data:`SESSION_ENDS`; ``session_seconds`` sums the wall
    time those events record. ``kernels`` lists, for every start and resume, the iteration and
    the hardware whose kernels computed the session (:func:`session_kernels`; None where an
    older log did not record it).
    """

    @property
    def last_kernels(self) -> str | None:
        """The hardware of the latest session that recorded it."""
        known = [kernels for _, kernels in self.kernels if kernels is not None]
        return known[-1] if known else None

    name: str
    config: dict[str, Any]
    psnr: dict[int, float]
    code_logit: dict[int, float] = field(default_factory=dict)
    saturated_output: dict[int, float] = field(default_factory=dict)
    last_iteration: int = 0
    added_stabilizers: list[str] = field(default_factory=list)
    rollbacks: list[tuple[int, int]] = field(default_factory=list)
    flagged: list[int] = field(default_factory=list)
    finished: bool = False  # the engine logged its ``done`` event
    kernels: list[tuple[int, str | None]] = field(default_factory=list)
    session_seconds: float = 0.0  # summed over the sessions that ended and logged their time
    sessions_ended: int = 0
    untimed_sessions: int = 0  # sessions that ended without their time (older logs, divergence)

    @property
    def training_seconds(self) -> float | None:
        """Wall time of the run's training over every session that ended (a session still
        running is not counted); None when a session ended without logging its time."""
        return None if self.untimed_sessions else self.session_seconds

    @property
    def best_iteration(self) -> int:
        return max(self.psnr, key=lambda iteration: self.psnr[iteration])

    @property
    def last_evaluation(self) -> int:
        return max(self.psnr)

    def collapsed_at(self) -> int | None:
        """The first collapse: the first evaluation the engine flagged, else (older logs, or a
        run without the flag) the first more than ``COLLAPSE_DB`` below the best before it."""
        return self.flagged[0] if self.flagged else first_collapse(self.psnr)


def session_kernels(record: dict[str, Any]) -> str | None:
    """The hardware whose kernels computed a training session, from its start or resume
    record: the GPU's name on CUDA, else ``"cpu AVX512"``, ``"cpu AVX2"``, ... (torch's CPU
    capability); None when the record does not say. Float results, and so a training continued
    bit for bit, agree only between sessions of the same kernels."""
    env = record.get("env")
    if not isinstance(env, dict):
        return None
    return kernels(env, on_cuda=str(record.get("device", "")).startswith("cuda"))


def log_file(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or the ``log.jsonl`` inside it when it is a run folder."""
    path = Path(path)
    return path / "log.jsonl" if path.is_dir() else path


def read_training_log(path: str | os.PathLike[str], running: bool = False) -> TrainingLog:
    """Read a run's ``log.jsonl`` (or the run folder holding one).

    The run is named after its folder (``.../NAME/log.jsonl``) or the file (``NAME.jsonl``).
    Raises :class:`UsageError` when the file is missing, is not JSON lines, or holds no start
    record and no held-out evaluation.

    ``running=True`` reads a run that may be training right now: a last line the trainer is
    still writing (no newline yet) is left for later, and a run with no held-out evaluation yet
    reads as a log with no points instead of an error.
    """
    log = log_file(path)
    if not log.is_file():
        raise UsageError(f"{path}: no training log found")
    config: dict[str, Any] | None = None
    record_log = TrainingLog(
        name=log.parent.name if log.name == "log.jsonl" else log.stem, config={}, psnr={}
    )
    text = log.read_text(encoding="utf-8")
    lines = text.splitlines()
    if running and lines and not text.endswith("\n"):
        lines.pop()  # still being written
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{log}:{number}: not a JSON line") from None
        if not isinstance(record, dict):
            raise UsageError(f"{log}:{number}: not a training log record")
        event = record.get("event")
        iteration = int(record.get("iteration", 0))
        if event in ("start", "resume"):
            record_log.kernels.append((iteration, session_kernels(record)))
        if event == "start" and config is None:
            config = dict(record.get("config") or {})
        elif event == "resume" and config is not None and "stabilize" in record:
            before = config.get("stabilize") or {}
            for name in sorted(set(record["stabilize"]) - set(before)):
                record_log.added_stabilizers.append(f"{name} from {iteration:,}")
            config = {**config, "stabilize": {**before, **record["stabilize"]}}
        elif event == "rollback":
            record_log.rollbacks.append((iteration, int(record["to"])))
        elif event == "done":
            record_log.finished = True
        if event in SESSION_ENDS:
            record_log.sessions_ended += 1
            if "session_seconds" in record:
                record_log.session_seconds += float(record["session_seconds"])
            else:
                record_log.untimed_sessions += 1
        if event is not None:
            continue
        record_log.last_iteration = max(record_log.last_iteration, iteration)
        if "heldout_psnr_db" in record:
            record_log.psnr[iteration] = float(record["heldout_psnr_db"])
            if record.get("collapse"):
                record_log.flagged.append(iteration)
        if "max_abs_code_logit" in record:
            record_log.code_logit[iteration] = float(record["max_abs_code_logit"])
            if "saturated_output" in record:
                record_log.saturated_output[iteration] = float(record["saturated_output"])
    if not running and (config is None or not record_log.psnr):
        raise UsageError(f"{log}: needs a start record and at least one held-out evaluation")
    record_log.config = config or {}
    return record_log


__all__ = [
    "SESSION_ENDS",
    "TrainingLog",
    "first_collapse",
    "log_file",
    "read_training_log",
    "session_kernels",
]
