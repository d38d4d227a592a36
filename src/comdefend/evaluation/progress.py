"""Resumable evaluations: each finished (attack, eps) group is saved in the report folder.

A full-test-set evaluation can run for hours on a CPU. After every (attack, eps) group, that is
every threat model and defense of one attack at one budget, the harness rewrites
``PROGRESS_FILE`` in the report folder (atomically, safetensors: per-image correctness as
tensors, the cells and settings as JSON metadata). ``evaluate --resume`` reads the finished
groups back instead of recomputing them; the file is removed once the report is written.

A run resumes only with the settings it started with: the progress file records a fingerprint
(every setting that changes a number, and the sha256 of every checkpoint) and a resume with a
different one is refused. Every random choice of the harness is seeded per group, so a resumed
run gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from comdefend.checkpoint import load_checkpoint, save_checkpoint
from comdefend.errors import CheckpointError, UsageError

PROGRESS_FILE = "progress.safetensors"
PROGRESS_KIND = "evaluation-progress"
#: Settings that do not change any number: left out of the fingerprint.
UNFINGERPRINTED = ("out", "force", "resume", "progress")


def fingerprint(config: dict[str, Any], checkpoints: dict[str, str], data_source: Any) -> dict:
    """What must match between an interrupted run and its resume."""
    settings = {k: v for k, v in config.items() if k not in UNFINGERPRINTED}
    # JSON round trip: tuples become lists, as they will be when read back
    return json.loads(
        json.dumps(
            {"config": settings, "checkpoints": checkpoints, "data": data_source},
            sort_keys=True,
            default=str,
        )
    )


def group_key(attack: str, eps: Any) -> str:
    """The name of an (attack, eps) group in the progress file."""
    return json.dumps([attack, eps])


class EvaluationProgress:
    """The finished groups of one run: restored from ``folder`` on resume, saved as they finish.

    Args:
        folder: the report folder, or ``None`` (nothing is saved: no ``out`` given).
        fingerprint: see :func:`fingerprint`.
        resume: read the groups an interrupted run in ``folder`` finished.

    Raises:
        UsageError: ``resume`` and the saved run's fingerprint differs from ``fingerprint``
            (the message names the differing settings).
        CheckpointError: the progress file is unreadable.
    """

    def __init__(self, folder: str | Path | None, fingerprint: dict, resume: bool) -> None:
        self.path = Path(folder) / PROGRESS_FILE if folder is not None else None
        self.fingerprint = fingerprint
        self.groups: list[dict[str, Any]] = []
        self.correct: dict[str, torch.Tensor] = {}
        self.grid: dict[str, Any] = {}
        self.elapsed_s = 0.0
        self.restored = 0
        if self.path is None or not self.path.exists():
            return
        if not resume:  # --force: the interrupted run is replaced
            self.path.unlink()
            return
        tensors, metadata = load_checkpoint(self.path, PROGRESS_KIND)
        saved = metadata.get("fingerprint")
        if saved != fingerprint:
            raise UsageError(
                f"{self.path.parent} holds an interrupted evaluation with other settings "
                f"(differing: {', '.join(_differences(saved, fingerprint)) or 'format'}); rerun "
                "it with the same settings, or pass --force instead of --resume to start over"
            )
        try:
            self.groups = list(metadata["groups"])
            self.elapsed_s = float(metadata["elapsed_s"])
            grid_specs = list(metadata["grid_purified"])
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{self.path}: incomplete progress record ({error})") from error
        self.correct = {k: v for k, v in tensors.items() if k.startswith("correct/")}
        for name in ("clean", "adversarial", "difference"):
            if f"grid/{name}" in tensors:
                self.grid[name] = tensors[f"grid/{name}"]
        purified = {s: tensors[f"grid/purified/{i}"] for i, s in enumerate(grid_specs)}
        if purified:
            self.grid["purified"] = purified
        self.restored = len(self.groups)

    def keys(self) -> list[str]:
        """The :func:`group_key` of every finished group."""
        return [group["key"] for group in self.groups]

    def finished(
        self, attack: str, eps: Any
    ) -> tuple[list[dict[str, Any]], dict[tuple[int, str], torch.Tensor], Any] | None:
        """``(cells, correctness by (defense index, threat model), detection row)`` of a
        finished group, or ``None``."""
        key = group_key(attack, eps)
        for number, group in enumerate(self.groups):
            if group["key"] == key:
                correct = {
                    (int(index), tm): self.correct[f"correct/{number}/{index}/{tm}"]
                    for index, tm in group["correct"]
                }
                return group["cells"], correct, group["detection"]
        return None

    def save_group(
        self,
        attack: str,
        eps: Any,
        cells: list[dict[str, Any]],
        correct: dict[tuple[int, str], torch.Tensor],
        detection: Any,
        grid: dict[str, Any],
        elapsed_s: float,
    ) -> None:
        """Record a finished group and rewrite the progress file (atomically); nothing to do
        without a report folder."""
        if self.path is None:
            return
        number = len(self.groups)
        self.groups.append(
            json.loads(
                json.dumps(
                    {
                        "key": group_key(attack, eps),
                        "cells": cells,
                        "correct": [[index, tm] for index, tm in correct],
                        "detection": detection,
                    },
                    default=str,
                )
            )
        )
        for (index, tm), tensor in correct.items():
            # clone: reused cells share one tensor, which safetensors will not write twice
            self.correct[f"correct/{number}/{index}/{tm}"] = tensor.clone()
        tensors = dict(self.correct)
        for name in ("clean", "adversarial", "difference"):
            if name in grid:
                tensors[f"grid/{name}"] = grid[name].clone()
        specs = list(grid.get("purified", {}))
        for i, spec in enumerate(specs):
            tensors[f"grid/purified/{i}"] = grid["purified"][spec].clone()
        save_checkpoint(
            self.path,
            tensors,
            {
                "kind": PROGRESS_KIND,
                "fingerprint": self.fingerprint,
                "groups": self.groups,
                "grid_purified": specs,
                "elapsed_s": elapsed_s,
            },
        )

    def clear(self) -> None:
        """The report is written: the progress file is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _differences(saved: Any, current: dict) -> list[str]:
    if not isinstance(saved, dict):
        return []
    names = []
    for part in ("config", "checkpoints", "data"):
        old, new = saved.get(part), current.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            names += [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            names.append(part)
    return names
