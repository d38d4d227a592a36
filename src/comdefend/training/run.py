"""A training run's folder: resumable checkpoints, a JSONL log, clean interruption.

Layout of ``runs/NAME/``:
    ``checkpoint.safetensors``  model and optimizer tensors + JSON state (atomic, overwritten)
    ``log.jsonl``               one JSON object per logged event
    ``model.safetensors``       the final weights (written when the run completes)
    ``summary.json``            final metrics and provenance
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from comdefend import validation
from comdefend.checkpoint import (
    atomic_write_text,
    clean_stale_temporary_files,
    load_checkpoint,
    save_checkpoint,
)
from comdefend.errors import CheckpointError, UsageError

TRAINING_STATE_KIND = "training-state"


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state as flat tensors (``optim.<param>.<name>``) plus JSON-able rest."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], extra: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, entries in extra.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})


#: Stabilizers a resume may add or drop: ``rollback`` changes nothing until a collapse, so
#: adding it to a healthy run equals having had it from the start (the resume event logs it).
RESUMABLE_STABILIZERS = frozenset({"rollback"})


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A run's settings as a resume compares them (stabilizers a resume may change dropped)."""
    stabilize = config.get("stabilize")
    if not isinstance(stabilize, dict):
        return config
    kept = {k: v for k, v in stabilize.items() if k not in RESUMABLE_STABILIZERS}
    return {**config, "stabilize": kept}


def differing_settings(
    saved: dict[str, Any],
    current: dict[str, Any],
    resumable: Collection[str] = (),
    legacy_defaults: dict[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """The settings a run was ``saved`` with that differ from the ``current`` ones, as
    ``{key: (saved, current)}`` sorted by key: the one rule of ``--resume``.

    Args:
        saved, current: the two sets of settings.
        resumable: keys that may change (a config class's ``RESUMABLE_CHANGES``).
        legacy_defaults: values of keys that older runs do not record.

    Stabilizers a resume may add or drop (:data:`RESUMABLE_STABILIZERS`) are not compared.

    Example:
        >>> differing_settings({"lr": 0.1, "threads": 1}, {"lr": 0.2, "threads": 4}, {"threads"})
        {'lr': (0.1, 0.2)}
        >>> differing_settings({}, {"precision": "fp32"}, legacy_defaults={"precision": "fp32"})
        {}
    """
    before = _comparable({**(legacy_defaults or {}), **saved})
    now = _comparable(current)
    keys = sorted(k for k in set(before) | set(now) if k not in resumable)
    return {k: (before.get(k), now.get(k)) for k in keys if before.get(k) != now.get(k)}


class RunDirectory:
    """Checkpoints and logs of one run; refuses to clobber a finished or foreign run.

    Args:
        path: the run folder.
        resume: continue the run in ``path`` (its checkpoint must exist).
        config: the settings every checkpoint records; they must match on resume, but for
            ``resumable`` (:func:`differing_settings`).
        writer: whether this process writes (in a data-parallel run only process 0 does;
            the others read the checkpoint on resume and write nothing).
        world_size: processes of a data-parallel run; a resume must use as many.
        legacy_defaults: values of settings that older run folders do not record.
        resumable: settings that may change on resume (the config class's
            ``RESUMABLE_CHANGES``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resume: bool,
        config: dict[str, Any],
        writer: bool = True,
        world_size: int = 1,
        legacy_defaults: dict[str, Any] | None = None,
        resumable: Collection[str] = (),
    ) -> None:
        self.path = Path(path)
        self.checkpoint_path = self.path / "checkpoint.safetensors"
        self.log_path = self.path / "log.jsonl"
        self.config = config
        self.writer = writer
        self.world_size = world_size
        self.legacy_defaults = legacy_defaults or {}
        self.resumable = frozenset(resumable)
        if self.checkpoint_path.exists() and not resume:
            raise UsageError(
                f"{self.path} already holds a run; pass --resume to continue it, "
                "or choose another --out"
            )
        if resume and not self.checkpoint_path.exists():
            raise UsageError(f"--resume: no checkpoint in {self.path}")
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files of writes that a killed process left behind: those of
        :func:`comdefend.checkpoint.atomic_write` whose writer is gone
        (:func:`~comdefend.checkpoint.clean_stale_temporary_files`) and the ``.NAME.XXXX.tmp``
        files of earlier versions."""
        stale = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        for file in stale:
            file.unlink(missing_ok=True)
        return stale + clean_stale_temporary_files(self.path)

    def save(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        iteration: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if not self.writer:
            return
        optim_tensors, optim_extra = flatten_optimizer(optimizer)
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | optim_tensors
        metadata = {
            "kind": TRAINING_STATE_KIND,
            "iteration": iteration,
            "train_config": self.config,
            "world_size": self.world_size,
            "optimizer": optim_extra,
            **(extra or {}),
        }
        save_checkpoint(self.checkpoint_path, tensors, metadata)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        tensors, metadata = load_checkpoint(self.checkpoint_path, TRAINING_STATE_KIND)
        saved_world = int(metadata.get("world_size", 1))
        if saved_world != self.world_size:
            raise UsageError(
                f"--resume: the run in {self.path} was trained by {saved_world} process(es) and "
                f"this is {self.world_size}; resume it with the same number (torchrun "
                f"--nproc-per-node {saved_world}, or no torchrun for 1): the batch split across "
                "processes is part of the run"
            )
        differing = differing_settings(
            metadata["train_config"], self.config, self.resumable, self.legacy_defaults
        )
        if differing:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differing.items())
            raise UsageError(f"--resume with settings that differ from the saved run ({details})")
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            model.load_state_dict(model_state, strict=True)
        except RuntimeError as error:
            raise CheckpointError(
                f"{self.checkpoint_path} does not fit this model: {error}"
            ) from error
        restore_optimizer(optimizer, tensors, metadata["optimizer"])
        if self.writer:
            self.truncate_log(int(metadata["iteration"]))
        return metadata

    def log(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_log(self, iteration: int) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone).

        Lines up to the last ``rollback`` event are history and kept whatever their iteration
        (a rollback always writes a checkpoint, so no resume starts before it).
        """
        if not self.log_path.exists():
            return
        records = []
        for line in self.log_path.read_text(encoding="utf-8").splitlines():
            try:
                records.append((line, json.loads(line)))
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
        history = max(
            (i + 1 for i, (_, r) in enumerate(records) if r.get("event") == "rollback"), default=0
        )
        kept = [line for line, _ in records[:history]]
        kept += [line for line, r in records[history:] if r.get("iteration", 0) <= iteration]
        atomic_write_text(self.log_path, "".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` for ``--device`` (see :func:`comdefend.validation.resolve_device`)."""
    return validation.resolve_device(name)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Processor") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment() -> dict[str, Any]:
    """Hardware and versions, recorded with every run. ``cpu_capability`` is the instruction
    set torch's CPU kernels use here (``AVX512``, ``AVX2``, ...): float results, and so a
    training continued bit for bit, are the same only between machines of one capability."""
    import platform

    from comdefend import __version__

    info: dict[str, Any] = {
        "comdefend": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def kernels(environment: dict[str, Any], on_cuda: bool) -> str | None:
    """The kernels that computed on ``environment`` (the record of :func:`environment`): the
    GPU's name when ``on_cuda``, else the CPU's capability; None when the record does not say.
    Float results agree bit for bit only between computations of the same kernels (and torch).

    Example:
        >>> machine = {"torch": "2.13.0", "cpu_capability": "AVX2", "cuda_device": "H100"}
        >>> kernels(machine, on_cuda=False), kernels(machine, on_cuda=True)
        ('cpu AVX2', 'cuda H100')
        >>> kernels({}, on_cuda=False) is None
        True
    """
    if on_cuda:
        name = environment.get("cuda_device")
        return f"cuda {name}" if name else None
    capability = environment.get("cpu_capability")
    return f"cpu {capability}" if capability else None
