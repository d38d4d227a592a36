"""One training engine for every kind of model: a task says *what* is trained, the engine *how*.

A :class:`TrainingTask` (``PurifierTask`` for ComDefend, ``ClassifierTask`` for classifiers)
builds the model, the optimizer and the loss of one iteration and evaluates held-out data. The
engine, :func:`run_training`, owns everything else, once for all tasks:

- deterministic batches: iteration ``i`` always sees the same global batch (seeded by
  ``(seed, i)``), so ``--resume`` is bit-identical without saving random states;
- the learning-rate schedule (the task's) and the optional stabilizers (gradient clipping,
  learning-rate decay: :mod:`comdefend.training.stabilizers`);
- logging (``log.jsonl``: means over the last :data:`LOG_EVERY` iterations, a
  :class:`LogWindow`; every evaluation, every event) and the progress bar;
- held-out evaluation, the best weights so far (``best.safetensors``: a :class:`BestTracker`
  of the metric the task monitors, higher or lower being better as the task declares) and
  collapse warnings (:func:`is_collapse`, the one rule: :data:`COLLAPSE_MARGIN` past the best);
- the rollback stabilizer (:class:`Rollback`), which the loop calls after every iteration;
- atomic checkpoints, written only between iterations, never during an optimizer step;
- Ctrl-C and SIGTERM: the first one finishes the current iteration, saves a checkpoint and
  raises :class:`TrainingInterrupted` (the CLI prints how to resume); a second one stops at
  once, and if that happens during an optimizer step the previous checkpoint is kept;
- a NaN or infinite loss (:class:`TrainingDivergedError`, checked before the step, so no
  checkpoint ever holds NaN weights) and a dead run (every gradient exactly zero for
  ``task.dead_iterations`` iterations: checkpointed, ended early);
- the task's numeric precision (:class:`TrainingPrecision`: ``fp32``, ``bf16``, ``fp16`` with
  a gradient scaler, ``tf32`` on CUDA; fp32 master weights and Adam state in every case),
  refused where the hardware lacks it, never silently run as fp32;
- data-parallel training when started by ``torchrun`` (``WORLD_SIZE`` > 1): one process per
  device, DistributedDataParallel (gloo on CPUs, nccl on GPUs), the recipe's *global* batch split
  evenly across the processes (a batch that does not divide is refused), process 0 alone
  writes logs and checkpoints, and ``--resume`` needs the same number of processes.

:func:`run_training` is a short loop over the parts of one session (``_Training``): ``step``
(learning rate, loss, backward pass, optimizer step), ``record`` (evaluation, dead-run check,
the logging window's record), ``roll_back``, ``after_iteration`` (the task's extra records,
snapshot, checkpoint, progress bar) and ``stops`` (a pause, a dead run, an interruption), then
``end`` (the final evaluation and the summary, or a paused session's checkpoint).

Example (a custom task needs ``setup``, ``build_optimizer``, ``compute_loss``, ``evaluate`` and
``finish``; see :class:`TrainingTask`)::

    from comdefend.training.engine import run_training
    from comdefend.training.trainer import PurifierTask, TrainConfig
    summary = run_training(PurifierTask(TrainConfig(dataset="fashion-mnist", out="runs/f")))
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comdefend.checkpoint import read_metadata
from comdefend.console import logger, progress_bar
from comdefend.distributed import Launch, exchange, join_process_group, launch_environment
from comdefend.errors import ComDefendError, UsageError
from comdefend.models.precision import cpu_bf16_missing, precision_context
from comdefend.training.run import RunDirectory, environment, resolve_device
from comdefend.training.stabilizers import MAX_ROLLBACKS, Stabilization
from comdefend.validation import set_threads

#: Log records average the per-iteration metrics over this many iterations (a logging window).
LOG_EVERY = 10
BEST_FILE = "best.safetensors"
#: An evaluation this far past the run's best (on the wrong side) is a collapse
#: (:func:`is_collapse`); for ComDefend's held-out PSNR, in dB. The study's recipe (Adam 1e-3,
#: constant) can diverge late: on a GPU the plain CIFAR-10 model fell from 31.8 dB at iteration
#: 6,500 to 11.9 dB at 7,000 and never recovered (docs/notes/training-collapse.md).
COLLAPSE_MARGIN = 6.0


class TrainingDivergedError(ComDefendError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class TrainingInterrupted(KeyboardInterrupt):  # noqa: N818 - it is a KeyboardInterrupt
    """Ctrl-C or SIGTERM stopped a run; ``str(error)`` says what was saved and how to resume.

    Attributes:
        iteration: the last finished iteration.
        saved: whether a checkpoint of that iteration was written.
        out: the run folder.
    """

    def __init__(self, message: str, iteration: int, saved: bool, out: str) -> None:
        super().__init__(message)
        self.iteration, self.saved, self.out = iteration, saved, out


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Processes:
    """This process's place in a data-parallel run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, global_batch: int) -> slice:
        """Rows of the global batch this process trains on (an even split)."""
        if global_batch % self.world_size:
            raise UsageError(
                f"the batch of {global_batch} does not split evenly across {self.world_size} "
                "processes; choose a process count that divides the batch size, or another "
                "--batch-size (the recipe's schedule is defined for its global batch)"
            )
        size = global_batch // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def exchanging(self, what: str) -> AbstractContextManager[Any]:
        """Around an exchange with the other processes (a collective operation, or a backward
        pass whose gradients DDP averages): a process that stopped or went silent becomes a
        :class:`~comdefend.distributed.LostProcessesError` (one line, how to go on) instead of
        torch's bare ``RuntimeError``. Nothing in a single process."""
        if not self.distributed:
            return nullcontext()
        return exchange(
            f"training ({what})",
            "the last checkpoint is kept: the same command with --resume and as many "
            "processes continues from it",
        )

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the processes (``values`` itself in a single process)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        values = values.clone()
        with self.exchanging("averaging the losses"):
            dist.all_reduce(values)
        return values / self.world_size

    def reduce_max(self, value: bool, device: torch.device) -> bool:
        if not self.distributed:
            return value
        import torch.distributed as dist

        flag = torch.tensor([float(value)], device=device)
        with self.exchanging("agreeing on a decision"):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            with self.exchanging("waiting for process 0"):
                dist.barrier()


def launched_processes() -> Processes:
    """The torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), if any, read by
    :func:`comdefend.distributed.launch_environment` (a broken one is a :class:`UsageError`)."""
    launch = launch_environment()
    return Processes(launch.rank, launch.world_size, launch.local_rank)


def start_processes(processes: Processes, device_name: str) -> torch.device:
    """The device of this process; joins the process group when there is more than one
    (:func:`comdefend.distributed.join_process_group`: backend, ``cuda:LOCAL_RANK``, and the
    ``COMDEFEND_DIST_TIMEOUT`` a process waits for the others)."""
    device = resolve_device(device_name)
    launch = Launch(processes.rank, processes.world_size, processes.local_rank)
    return join_process_group(launch, device)[0]


# -- precision ----------------------------------------------------------------------------------
#: Training precisions (``--precision``): what the model's forward pass computes in.
TRAINING_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "tf32")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_training_precision(precision: object) -> str:
    """``precision`` checked and lower-cased (whether a device has it: :class:`TrainingPrecision`).

    Example:
        >>> check_training_precision("BF16")
        'bf16'
        >>> check_training_precision("fp64")
        Traceback (most recent call last):
        ...
        comdefend.errors.UsageError: precision must be one of fp32, bf16, fp16, tf32, got 'fp64'
    """
    text = precision.strip().lower() if isinstance(precision, str) else precision
    if text not in TRAINING_PRECISIONS:
        raise UsageError(
            f"precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {precision!r}"
        )
    return str(text)


def _cpu_lacks(precision: str) -> str | None:
    if precision == "tf32":
        return "TF32 exists only on CUDA GPUs (Ampere or later)"
    if precision == "bf16":
        return cpu_bf16_missing()
    if precision == "fp16":
        # It runs, but the backward pass of a float16 convolution takes a reference kernel:
        # one step of the plain model (batch 4, 32x32, 1 thread, torch 2.13, a CPU with
        # AVX512-FP16 and AMX) took 124 s against 0.09 s in bf16.
        return (
            "torch's float16 convolution backward has no fast CPU kernel (one training step "
            "measured 1,300x slower than bf16); use --precision bf16 on a CPU"
        )
    return None


def _cuda_lacks(precision: str, device: torch.device) -> str | None:
    if precision == "tf32" and torch.cuda.get_device_capability(device) < (8, 0):
        return "TF32 needs compute capability 8.0 (Ampere) or later"
    if precision == "bf16":
        try:  # torch >= 2.3 would otherwise count a slow emulation as support
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            native = torch.cuda.is_bf16_supported()
        if not native:
            return "this GPU has no bfloat16 arithmetic"
    return None


def precision_unavailable(precision: str, device: torch.device) -> str | None:
    """Why ``device`` cannot train at ``precision`` (None: it can)."""
    precision = check_training_precision(precision)
    if precision == "fp32":
        return None
    if device.type == "cpu":
        return _cpu_lacks(precision)
    if device.type == "cuda":
        return _cuda_lacks(precision, device)
    return f"only fp32 is supported on {device.type} devices"


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """:func:`torch.autocast` to ``bf16`` or ``fp16`` on ``device``'s type; for ``fp32`` and
    ``tf32`` a context that does nothing (no autocast at all)."""
    dtype = _AUTOCAST_DTYPES.get(check_training_precision(precision))
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class TrainingPrecision:
    """How the engine runs a training step at a precision; the task puts :func:`autocast`
    around its model's forward pass (and keeps noise and loss in float32).

    - ``fp32``: float32 everywhere; on CUDA, TF32 is turned off for the run (cuDNN would
      otherwise use it for convolutions by default).
    - ``tf32`` (CUDA only): float32 storage, TF32 convolutions and matrix products.
    - ``bf16``: the forward pass under autocast to bfloat16.
    - ``fp16``: the forward pass under autocast to float16 and a gradient scaler
      (:class:`torch.amp.GradScaler`), whose state travels in the checkpoint.

    Parameters, gradients and the optimizer state stay float32 in every case. Held-out
    evaluation runs in float32 (:meth:`evaluation`): it measures the weights as they are used.

    Args:
        precision: one of :data:`TRAINING_PRECISIONS`, or None for a task without the setting
            (fp32, and the process's TF32 settings left as they are).
        device: the run's device.

    Raises:
        UsageError: ``device`` lacks the precision (:func:`precision_unavailable`).
    """

    def __init__(self, precision: str | None, device: torch.device) -> None:
        self.controls_math = precision is not None
        self.name = check_training_precision(precision or "fp32")
        self.device = device
        reason = precision_unavailable(self.name, device)
        if reason is not None:
            raise UsageError(
                f"--precision {self.name} is not available on {device}: {reason}; train with "
                "--precision fp32 (or on hardware that has it)"
            )
        self.scaler = torch.amp.GradScaler(device.type) if self.name == "fp16" else None

    def autocast(self) -> AbstractContextManager[Any]:
        return autocast(self.name, self.device)

    def training_math(self) -> AbstractContextManager[Any]:
        """The run's float32 arithmetic on CUDA (TF32 on or off); nothing elsewhere."""
        if self.device.type != "cuda" or not self.controls_math:
            return nullcontext()
        return precision_context("tf32" if self.name == "tf32" else "fp32", self.device)

    def evaluation(self) -> AbstractContextManager[Any]:
        """True float32 arithmetic for held-out evaluation on CUDA; nothing elsewhere."""
        if self.device.type != "cuda" or not self.controls_math:
            return nullcontext()
        return precision_context("fp32", self.device)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale (before they are inspected or clipped)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step (skipped by the scaler when a gradient is not finite)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the gradient scaler's state; nothing without one)."""
        return {} if self.scaler is None else {"grad_scaler": self.scaler.state_dict()}

    def load(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])


# -- best value, collapse, logging window -------------------------------------------------------
#: Directions of a monitored metric: ``max`` (higher is better, as a PSNR) or ``min``.
MONITOR_MODES: tuple[str, ...] = ("max", "min")


def is_collapse(
    score: float, best: float | None, mode: str = "max", margin: float = COLLAPSE_MARGIN
) -> bool:
    """Whether ``score`` lies more than ``margin`` on the wrong side of the ``best`` so far: the
    one rule the engine, the summary and the log reader call a collapse by.

    Example:
        >>> is_collapse(18.5, 25.0), is_collapse(20.0, 25.0), is_collapse(3.0, None)
        (True, False, False)
        >>> is_collapse(0.9, 0.2, mode="min", margin=0.5)
        True
    """
    if best is None:
        return False
    return score < best - margin if mode == "max" else score > best + margin


class BestTracker:
    """The best value so far of the evaluation metric a task monitors, and its iteration.

    Args:
        metric: the key of the evaluation records (``heldout_psnr_db``); its name without the
            ``heldout_`` prefix (:attr:`name`) is the key in ``best.safetensors``'s metrics.
        mode: ``max`` (higher is better) or ``min``.
        margin: how far past the best a score counts as a collapse (:func:`is_collapse`).

    Example:
        >>> best = BestTracker("heldout_psnr_db")
        >>> [best.observe(score, i) for i, score in ((2, 20.0), (4, 25.0), (6, 18.0), (8, 24.0))]
        ['best', 'best', 'collapse', None]
        >>> best.record()
        {'iteration': 4, 'psnr_db': 25.0}
    """

    def __init__(self, metric: str, mode: str = "max", margin: float = COLLAPSE_MARGIN) -> None:
        if mode not in MONITOR_MODES:
            raise UsageError(
                f"monitor mode must be one of {', '.join(MONITOR_MODES)}, got {mode!r}"
            )
        self.metric, self.mode, self.margin = metric, mode, margin
        self.value: float | None = None
        self.iteration: int | None = None

    @property
    def name(self) -> str:
        return self.metric.removeprefix("heldout_")

    def improves(self, score: float) -> bool:
        """Whether ``score`` beats the best so far (any score does before the first)."""
        if self.value is None:
            return True
        return score > self.value if self.mode == "max" else score < self.value

    def observe(self, score: float, iteration: int) -> str | None:
        """Take the score of an evaluation: ``"best"`` (it is the new best), ``"collapse"``
        (:func:`is_collapse` against the best so far) or None."""
        if self.improves(score):
            self.value, self.iteration = score, iteration
            return "best"
        return "collapse" if is_collapse(score, self.value, self.mode, self.margin) else None

    def record(self) -> dict[str, Any] | None:
        """``{"iteration", NAME: value}`` (what :func:`read_best` returns), None before any."""
        if self.value is None:
            return None
        return {"iteration": self.iteration, self.name: self.value}

    def load(self, path: str | os.PathLike) -> None:
        """Continue from a run's ``best.safetensors`` (nothing happens if it has none)."""
        saved = read_best(path, self.name)
        if saved is not None:
            self.value, self.iteration = saved[self.name], saved["iteration"]


class LogWindow:
    """Running sums of the per-iteration metrics since the last log record; a record carries
    their means and ``iterations_averaged``.

    Example:
        >>> window = LogWindow()
        >>> window.add({"loss": 1.0}); window.add({"loss": 2.0})
        >>> window.flush()
        {'loss': 1.5, 'iterations_averaged': 2}
        >>> window.count
        0
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.count += 1

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def flush(self) -> dict[str, Any]:
        """The means and their count, then an empty window."""
        means: dict[str, Any] = {name: total / self.count for name, total in self.sums.items()}
        means["iterations_averaged"] = self.count
        self.reset()
        return means


# -- the task interface -------------------------------------------------------------------------
class TrainingTask(ABC):
    """What is trained. The engine calls, in order: :meth:`setup`, :meth:`build_optimizer`, then
    per iteration :meth:`learning_rate` and :meth:`compute_loss`, :meth:`evaluate` when
    :meth:`evaluation_due`, and :meth:`finish` at the end.

    Attributes:
        kind: ``"purifier"`` or ``"classifier"`` (recorded in the log).
        config: the run's settings dataclass; the engine reads ``out``, ``seed``, ``threads``,
            ``device``, ``checkpoint_every``, ``to_dict()`` and the class attribute
            ``RESUMABLE_CHANGES`` (:meth:`resumable_changes`) from it.
        model: the model being trained (set by :meth:`setup`).
        total_iterations: iterations of the whole run (set by :meth:`setup`).
        monitor: the evaluation metric whose best value is kept in ``best.safetensors``, or
            None (:class:`BestTracker`).
        monitor_mode: ``"max"`` when a higher ``monitor`` is better, ``"min"`` when a lower one
            is.
        collapse_margin: an evaluation this far past the best on the wrong side is a collapse
            (:func:`is_collapse`).
        monitor_label, monitor_unit: how the collapse warning names the metric and its unit
            (``"PSNR"``, ``" dB"``; by default the metric's name and no unit).
        stabilization: the measures against collapse the engine applies (clipping, decay).
        legacy_defaults: values of config keys that older run folders do not record, so that
            they still resume.
        precision: the training precision (:data:`TRAINING_PRECISIONS`), or None for a task
            without the setting (fp32, TF32 settings left alone); a task with one puts
            :func:`autocast` around its model's forward pass.
    """

    kind: str = "model"
    monitor: str | None = None
    monitor_mode: str = "max"
    monitor_label: str | None = None
    monitor_unit: str = ""
    precision: str | None = None
    collapse_margin: float = COLLAPSE_MARGIN
    legacy_defaults: dict[str, Any] = {}

    def __init__(self, config: Any) -> None:
        self.config = config
        self.model: nn.Module = nn.Identity()
        self.total_iterations = 0
        self.stabilization = Stabilization()

    def resume_config(self) -> dict[str, Any]:
        """The run's settings as every checkpoint records them (compared on ``--resume``)."""
        return self.config.to_dict()

    def resumable_changes(self) -> frozenset[str]:
        """Settings that may change on ``--resume``: the config class's ``RESUMABLE_CHANGES``
        (none declared: every setting must match)."""
        return frozenset(getattr(self.config, "RESUMABLE_CHANGES", ()))

    def best_tracker(self) -> BestTracker | None:
        """What keeps the best ``monitor`` value (None: the task monitors nothing)."""
        if not self.monitor:
            return None
        return BestTracker(self.monitor, self.monitor_mode, self.collapse_margin)

    @property
    def dead_iterations(self) -> int | None:
        """End the run once every gradient has been exactly zero this many times in a row."""
        return None

    @abstractmethod
    def setup(self, device: torch.device, processes: Processes) -> None:
        """Load the data and build ``self.model`` (seeded) on ``device``."""

    @abstractmethod
    def build_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer: ...

    def learning_rate(self, iteration: int) -> float:
        """Learning rate of 0-based ``iteration`` (before the stabilizers' factor)."""
        return float(self.config.lr)

    def training_module(self) -> nn.Module:
        """The module whose ``forward`` the loss goes through (what DDP wraps)."""
        return self.model

    @abstractmethod
    def compute_loss(
        self, module: nn.Module, iteration: int, share: slice
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of 0-based ``iteration`` on rows ``share`` of its global batch, and the batch
        means to log (``loss`` among them)."""

    def after_step(self, iteration: int, metrics: dict[str, float]) -> list[dict[str, Any]]:
        """Called after every finished iteration (1-based ``iteration``); returns extra log
        records (e.g. an end-of-epoch summary)."""
        return []

    def evaluation_due(self, iteration: int) -> bool:
        return False

    def checkpoint_due(self, iteration: int) -> bool:
        return iteration % int(self.config.checkpoint_every) == 0

    @abstractmethod
    def evaluate(self, iteration: int) -> dict[str, Any]:
        """Held-out metrics after ``iteration`` (process 0 only; the model in eval mode)."""

    def save_weights(self, path: os.PathLike | str, iteration: int, metrics: dict) -> None:
        """Write the model's weights (used for ``best.safetensors``)."""
        raise NotImplementedError

    def snapshot_due(self, iteration: int) -> bool:
        """Whether to keep a snapshot of the weights after ``iteration`` (1-based)."""
        return False

    def save_snapshot(self, folder: Path, iteration: int, metrics: dict[str, Any]) -> None:
        """Keep the weights after ``iteration`` in the run ``folder``, with the held-out
        ``metrics`` measured at that iteration (empty if none were)."""
        raise NotImplementedError

    @abstractmethod
    def finish(self, run: RunDirectory, iteration: int, state: dict[str, Any]) -> dict[str, Any]:
        """Final evaluation and ``model.safetensors``; returns the task's summary entries.
        ``state`` holds ``best``, ``optimizer`` and ``stopped_early``."""

    def describe_progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics.get('loss', float('nan')):.4f}"}

    def collapse_warning(
        self, score: float, iteration: int, best: BestTracker, best_file: Path
    ) -> str:
        """The warning of the first collapse of a run (``best``: the best before it)."""
        label, unit = self.monitor_label or best.name, self.monitor_unit
        moved = "fell" if best.mode == "max" else "rose"
        return (
            f"held-out {label} {moved} to {score:.2f}{unit} at iteration {iteration}, from "
            f"{best.value:.2f}{unit} at iteration {best.iteration}: the run is diverging; the "
            f"best weights are kept in {best_file}"
        )


# -- helpers ------------------------------------------------------------------------------------
def gradients_all_zero(model: nn.Module) -> bool:
    """Whether every parameter's gradient of the last backward pass is exactly zero."""
    grads = [p.grad.detach().abs().amax() for p in model.parameters() if p.grad is not None]
    return bool(grads) and not bool(torch.stack(grads).amax() > 0)


def read_best(path: str | os.PathLike, metric: str = "psnr_db") -> dict[str, Any] | None:
    """``{"iteration", metric}`` of a run's ``best.safetensors`` (``{"iteration", "psnr_db"}``
    for ComDefend), or None if it has none."""
    try:
        training = read_metadata(path)["training"]
    except (KeyError, ComDefendError):  # no best.safetensors yet, or not one of ours
        return None
    return {"iteration": int(training["iterations"]), metric: training["metrics"][metric]}


@contextmanager
def deferred_interrupts() -> Iterator[dict[str, bool]]:
    """The first Ctrl-C / SIGTERM sets ``state["stop"]`` (checked between iterations); a second
    one raises ``KeyboardInterrupt`` at once."""
    state = {"stop": False}

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    previous: dict[signal.Signals, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not in the main thread: leave the default behaviour
        pass
    try:
        yield state
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupt_message(run: RunDirectory, iteration: int, total: int, saved: bool) -> str:
    if saved:
        return (
            f"interrupted after iteration {iteration} of {total}: checkpoint saved in "
            f"{run.path}; rerun the same command with --resume to continue exactly"
        )
    return (
        f"interrupted during iteration {iteration + 1} of {total}, in the middle of an "
        f"optimizer step: that state was not saved; {run.checkpoint_path} keeps the last "
        "checkpoint; rerun the same command with --resume to continue exactly from it"
    )


# -- the rollback stabilizer --------------------------------------------------------------------
@dataclass
class _Snapshot:
    """Weights, optimizer and gradient-scaler state at one iteration, in memory (for the
    rollback stabilizer)."""

    iteration: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    numerics: dict[str, Any]

    @classmethod
    def take(
        cls,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        iteration: int,
        numerics: TrainingPrecision,
    ) -> _Snapshot:
        return cls(
            iteration,
            copy.deepcopy(model.state_dict()),
            copy.deepcopy(optimizer.state_dict()),
            copy.deepcopy(numerics.state()),
        )

    def restore(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, numerics: TrainingPrecision
    ) -> None:
        model.load_state_dict(self.model)
        optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        numerics.load(copy.deepcopy(self.numerics))


class Rollback:
    """The rollback stabilizer (:attr:`Stabilization.rollback`), called after every iteration.

    It keeps the state of the last healthy evaluation in memory. When an evaluation shows a
    collapse, or the run is dead (every gradient zero for ``dead_iterations``), it restores
    that state, multiplies the learning rate by ``factor`` from then on, logs a ``rollback``
    event and warns; at most :data:`MAX_ROLLBACKS` times in a run. ``lr_scale`` and
    ``rollbacks`` travel in every checkpoint, so a resumed run keeps its lowered rate (even
    with the stabilizer dropped on the resume).

    Args:
        factor: the learning-rate factor of each rollback; None: the stabilizer is off (the
            saved ``lr_scale`` still applies).
        model, optimizer, numerics: what a snapshot holds.
        log: writes a log record (:meth:`RunDirectory.log`).
        warn: whether this process prints the warning (process 0).
    """

    def __init__(
        self,
        factor: float | None,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        numerics: TrainingPrecision,
        log: Callable[[dict[str, Any]], None],
        warn: bool = True,
    ) -> None:
        self.factor = factor
        self.model, self.optimizer, self.numerics = model, optimizer, numerics
        self.log, self.warn = log, warn
        self.lr_scale, self.rollbacks = 1.0, 0
        self.healthy: _Snapshot | None = None  # the last healthy evaluation's state

    @property
    def active(self) -> bool:
        return self.factor is not None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps."""
        return {"lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    def load(self, state: dict[str, Any]) -> None:
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))

    def after_iteration(self, iteration: int, evaluated: bool, trouble: bool) -> int | None:
        """Go back to the last healthy evaluation on ``trouble`` (a collapse, a dead run) while
        rollbacks are left: returns the iteration it went back to, else None (and keeps the
        state of an ``evaluated`` iteration without trouble)."""
        if not self.active:
            return None
        healthy = self.healthy
        if trouble and healthy is not None and self.rollbacks < MAX_ROLLBACKS:
            assert self.factor is not None
            healthy.restore(self.model, self.optimizer, self.numerics)
            self.rollbacks += 1
            self.lr_scale *= self.factor
            self.log(
                {
                    "event": "rollback",
                    "iteration": iteration,
                    "to": healthy.iteration,
                    "lr_scale": self.lr_scale,
                    "rollbacks": self.rollbacks,
                }
            )
            if self.warn:
                logger.warning(
                    f"collapse at iteration {iteration}: back to iteration {healthy.iteration}, "
                    f"learning rate x{self.lr_scale:g} (rollback {self.rollbacks} of at most "
                    f"{MAX_ROLLBACKS})"
                )
            return healthy.iteration
        if evaluated and not trouble:
            self.healthy = _Snapshot.take(self.model, self.optimizer, iteration, self.numerics)
        return None


# -- the engine ---------------------------------------------------------------------------------
@dataclass
class _Step:
    """One finished iteration: its learning rate, the batch means of its metrics (over the
    processes), the gradient norm before clipping (None without clipping), and whether it is
    evaluated."""

    lr: float
    means: dict[str, float]
    grad_norm: float | None
    evaluated: bool


class _Training:
    """One session of a run: its state, and the parts :func:`run_training` calls in turn.

    Building it prepares everything that may refuse the run (threads, device, precision, the
    run folder, the task's setup, a resume's checkpoint); :meth:`begin` starts the session.
    """

    def __init__(self, task: TrainingTask, resume: bool, processes: Processes | None) -> None:
        config = task.config
        set_threads(config.threads)  # None: torch's default; 0 or less is refused, not ignored
        # Subnormal floats appear in saturated sigmoid/ELU gradients and are slow on CPUs.
        torch.set_flush_denormal(True)
        self.task, self.config, self.resume = task, config, resume
        self.processes = processes or launched_processes()
        self.device = start_processes(self.processes, config.device)
        # refused before any file is written
        self.numerics = TrainingPrecision(task.precision, self.device)
        self.run = RunDirectory(
            config.out,
            resume,
            task.resume_config(),
            writer=self.processes.is_main,
            world_size=self.processes.world_size,
            legacy_defaults=task.legacy_defaults,
            resumable=task.resumable_changes(),
        )
        task.setup(self.device, self.processes)
        self.total = task.total_iterations
        if self.total < 1:
            raise UsageError(f"iterations must be >= 1, got {self.total}")
        self.model = task.model
        self.optimizer = task.build_optimizer(list(self.model.parameters()))
        self.rollback = Rollback(
            task.stabilization.rollback if task.monitor else None,
            self.model,
            self.optimizer,
            self.numerics,
            self.run.log,
            warn=self.processes.is_main,
        )
        self.iteration = 0
        if resume:
            self._load_checkpoint()

    def _load_checkpoint(self) -> None:
        saved_state = self.run.load(self.model, self.optimizer)
        self.iteration = start = int(saved_state["iteration"])
        self.rollback.load(saved_state)
        self.numerics.load(saved_state)
        if start > self.total:
            raise UsageError(
                f"--resume: the run in {self.run.path} has already done {start} iterations, "
                f"more than the {self.total} asked for; pass at least --iterations {start} (a "
                "run is never shortened: its checkpoint and log are kept as they are)"
            )

    def _note_other_kernels(self, event: dict[str, Any]) -> None:
        """A resume on hardware with other kernels than the run's last session (another CPU
        capability, a GPU) continues the run, but not bit for bit as it would have gone on
        there: say so in the event and as a warning."""
        from comdefend.training.logs import read_training_log, session_kernels

        try:
            before = read_training_log(self.run.path, running=True).last_kernels
        except ComDefendError:
            return  # no readable log: nothing to compare with
        now = session_kernels(event)
        if before is None or now is None or before == now:
            return
        event["kernels_changed"] = {"from": before, "to": now}
        if self.processes.is_main:
            logger.warning(
                f"resuming on other hardware ({before} -> {now}): the run continues, but its "
                "float results are no longer those an uninterrupted run would give there"
            )

    def begin(self, progress: bool) -> None:
        """Wrap the model for data-parallel training, read the best so far, log the start (or
        resume) event and open the progress bar."""
        task, config, processes = self.task, self.config, self.processes
        self.share = processes.share(int(config.batch_size))
        self.module = task.training_module()
        if processes.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DistributedDataParallel(self.module, device_ids=ids)
        self.best = task.best_tracker()
        if self.best is not None and self.resume:
            self.best.load(self.run.path / BEST_FILE)
        event: dict[str, Any] = {
            "event": "resume" if self.resume else "start",
            "iteration": self.iteration,
            "task": task.kind,
            "device": str(self.device),
            "world_size": processes.world_size,
            "env": environment(),
        }
        if not self.resume:
            event["config"] = config.to_dict()
        else:
            if getattr(config, "stabilize", None) is not None:
                event["stabilize"] = config.stabilize  # a resume may add or drop rollback
            self._note_other_kernels(event)
        self.run.log(event)

        self.model.train()
        self.progress = progress
        self.bar = progress_bar(
            total=self.total,
            initial=self.iteration,
            enabled=progress and processes.is_main,
            desc="train",
            unit="it",
        )
        self.started, self.images_seen = time.perf_counter(), 0
        self.first_iteration_seconds: float | None = None
        self.window = LogWindow()
        self.zero_streak = 0
        self.stopped_early: dict[str, Any] | None = None
        self.collapse_warned = False
        self.in_step = False

    def save(self, at: int) -> None:
        """Checkpoint the state after iteration ``at``."""
        state = {**self.rollback.state(), **self.numerics.state()}
        self.run.save(self.model, self.optimizer, at, state)

    def session_seconds(self) -> float:
        return time.perf_counter() - self.started

    @contextmanager
    def interruptible(self) -> Iterator[dict[str, bool]]:
        """The training loop's context: deferred Ctrl-C / SIGTERM (see the module docstring)
        and the run's float32 arithmetic; an interruption ends in :class:`TrainingInterrupted`
        after saving what can be saved."""
        try:
            with deferred_interrupts() as interrupts, self.numerics.training_math():
                yield interrupts
        except KeyboardInterrupt as error:
            self.bar.close()
            saved = not self.in_step
            if saved:
                self.save(self.iteration)
            self.run.log(
                {
                    "event": "interrupted",
                    "iteration": self.iteration,
                    "saved": saved,
                    "session_seconds": round(self.session_seconds(), 1),
                }
            )
            message = _interrupt_message(self.run, self.iteration, self.total, saved)
            raise TrainingInterrupted(message, self.iteration, saved, str(self.run.path)) from error
        except Exception:
            self.bar.close()  # the error's message starts on a line of its own
            raise

    def step(self) -> _Step:
        """One iteration: learning rate, loss (refused if not finite, before the step),
        backward pass, clipping and the optimizer step."""
        task, optimizer, numerics = self.task, self.optimizer, self.numerics
        stabilization = task.stabilization
        iteration = self.iteration
        lr = task.learning_rate(iteration) * stabilization.lr_factor(iteration, self.total)
        lr *= self.rollback.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, metrics = task.compute_loss(self.module, iteration, self.share)
        names = sorted(metrics)
        values = torch.stack([metrics[name].detach().float() for name in names])
        values = self.processes.reduce_mean(values).cpu()
        means = dict(zip(names, values.tolist(), strict=True))
        if not all(math.isfinite(v) for v in means.values()):
            self.run.log({"event": "diverged", "iteration": iteration + 1})
            raise TrainingDivergedError(
                f"the loss became {means.get('loss')} at iteration {iteration + 1}; "
                f"{self.run.checkpoint_path} still holds the last good state (every "
                f"{self.config.checkpoint_every} iterations) and {self.run.path / BEST_FILE} "
                "the best weights so far; a lower --lr or --stabilize may help"
            )
        self.in_step = True
        optimizer.zero_grad(set_to_none=True)
        with self.processes.exchanging("averaging the gradients"):
            numerics.backward(loss)
        numerics.unscale(optimizer)
        dead = gradients_all_zero(self.model)
        grad_norm = stabilization.clip(list(self.model.parameters()))
        numerics.step(optimizer)
        self.in_step = False
        if self.first_iteration_seconds is None:  # with --compile, the compilation's time
            self.first_iteration_seconds = self.session_seconds()
        self.iteration = iteration = iteration + 1
        self.images_seen += int(self.config.batch_size)
        self.zero_streak = self.zero_streak + 1 if dead else 0
        self.window.add(means)
        evaluated = task.evaluation_due(iteration) or iteration == self.total
        return _Step(lr, means, grad_norm, evaluated)

    def record(self, step: _Step) -> dict[str, Any]:
        """The iteration's log record: held-out evaluation, dead-run check, and the logging
        window's means when a record is due (every :data:`LOG_EVERY` iterations, at the end,
        and whenever the record holds more than the learning rate)."""
        record: dict[str, Any] = {"iteration": self.iteration, "lr": step.lr}
        if step.grad_norm is not None:
            record["grad_norm_before_clip"] = step.grad_norm
        if step.evaluated and self.processes.is_main:
            self.evaluate(record)
        self.check_dead(record)
        if self.iteration % LOG_EVERY == 0 or len(record) > 2 or self.iteration == self.total:
            record.update(self.window.flush())
            self.run.log(record)
        return record

    def evaluate(self, record: dict[str, Any]) -> None:
        """Held-out evaluation (process 0): the best weights so far and collapse warnings."""
        task, iteration = self.task, self.iteration
        self.model.eval()
        with self.numerics.evaluation():
            heldout = task.evaluate(iteration)
        self.model.train()
        record.update(heldout)
        best = self.best
        score = heldout.get(best.metric) if best is not None else None
        if best is None or score is None:
            return
        best_file = self.run.path / BEST_FILE
        verdict = best.observe(score, iteration)  # a collapse leaves the best as it was
        if verdict == "best":
            task.save_weights(best_file, iteration, _plain(heldout))
        elif verdict == "collapse":
            record["collapse"] = True
            if not self.collapse_warned:
                self.collapse_warned = True
                logger.warning(task.collapse_warning(score, iteration, best, best_file))

    def check_dead(self, record: dict[str, Any]) -> None:
        """End the run after this iteration once every gradient has been exactly zero for
        ``task.dead_iterations`` iterations in a row."""
        limit = self.task.dead_iterations
        if limit is not None and self.zero_streak >= limit:
            self.stopped_early = {
                "iteration": self.iteration,
                "reason": f"every gradient was exactly zero for {self.zero_streak} "
                "iterations in a row: the model cannot learn any more (a saturated "
                "output, as in a collapse)",
            }
            record["dead"] = True

    def roll_back(self, step: _Step, record: dict[str, Any]) -> bool:
        """The rollback stabilizer's turn (:class:`Rollback`); True when it went back."""
        if not self.rollback.active:
            return False
        # every process takes the same decision (process 0 evaluates)
        collapse = bool(record.get("collapse"))
        trouble = step.evaluated and self.processes.reduce_max(collapse, self.device)
        trouble = trouble or self.stopped_early is not None
        back_to = self.rollback.after_iteration(self.iteration, step.evaluated, trouble)
        if back_to is None:
            return False
        self.iteration, self.stopped_early, self.zero_streak = back_to, None, 0
        self.window.reset()
        self.save(back_to)
        self.bar.n = back_to
        self.bar.refresh()
        return True

    def after_iteration(self, step: _Step, record: dict[str, Any]) -> None:
        """The task's extra records, a snapshot and a checkpoint when due, the progress bar."""
        task, iteration, is_main = self.task, self.iteration, self.processes.is_main
        for extra in task.after_step(iteration, step.means):
            self.run.log(extra)
            if self.progress and is_main and "message" in extra:
                self.bar.write(extra["message"])
        if is_main and task.snapshot_due(iteration):
            measured = {k: v for k, v in record.items() if k.startswith("heldout_")}
            task.save_snapshot(self.run.path, iteration, _plain(measured))
        if task.checkpoint_due(iteration) or iteration == self.total or self.stopped_early:
            self.save(iteration)
        rate = self.images_seen / max(self.session_seconds(), 1e-9)
        postfix = {**task.describe_progress(step.means), "img_s": f"{rate:.0f}"}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def pauses(self, pause_at: int | None) -> bool:
        return pause_at is not None and self.iteration == pause_at < self.total

    def stops(self, pause_at: int | None, interrupts: dict[str, bool]) -> bool:
        """Whether the loop ends after this iteration (a pause, a dead run); raises
        ``KeyboardInterrupt`` when any process was interrupted."""
        if self.pauses(pause_at):
            return True
        if self.stopped_early:
            self.run.log({"event": "stopped_early", **self.stopped_early})
            if self.processes.is_main:
                logger.warning(
                    f"stopping at iteration {self.iteration} of {self.total}: "
                    f"{self.stopped_early['reason']}"
                )
            return True
        # Every process stops after the same iteration, whichever got the signal.
        if self.processes.reduce_max(interrupts["stop"], self.device):
            raise KeyboardInterrupt
        return False

    def end(self, pause_at: int | None) -> dict[str, Any]:
        """A paused session's checkpoint, or the task's final evaluation and the summary."""
        self.bar.close()
        seconds = self.session_seconds()
        run, processes, iteration = self.run, self.processes, self.iteration
        if self.pauses(pause_at) and not self.stopped_early:
            self.save(iteration)
            run.log(
                {"event": "paused", "iteration": iteration, "session_seconds": round(seconds, 1)}
            )
            return {"paused": True, "iteration": iteration}
        if not processes.is_main:
            processes.barrier()  # process 0 evaluates and writes the final files
            return {"rank": processes.rank}

        # the wall time of this session's training (the ``interrupted`` event carries it for a
        # session that ended early): how long a run took, summed over its sessions
        run.log(
            {"event": "session_end", "iteration": iteration, "session_seconds": round(seconds, 1)}
        )
        best = self.best.record() if self.best is not None else None
        state = {"best": best, "optimizer": self.optimizer, "stopped_early": self.stopped_early}
        with self.numerics.evaluation():
            finished = self.task.finish(run, iteration, state)
        summary: dict[str, Any] = {
            "config": self.config.to_dict(),
            "task": self.task.kind,
            "iterations": iteration,
            **finished,
            "stopped_early": self.stopped_early,
            "rollbacks": self.rollback.rollbacks,
            "world_size": processes.world_size,
            "env": environment(),
            "device": str(self.device),
            "images_per_second_this_session": self.images_seen / max(seconds, 1e-9),
            "seconds_this_session": round(seconds, 1),
            "first_iteration_seconds_this_session": self.first_iteration_seconds,
        }
        run.write_summary(summary)
        processes.barrier()
        return summary


def run_training(
    task: TrainingTask,
    resume: bool = False,
    progress: bool = True,
    processes: Processes | None = None,
    pause_at: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) ``task``'s run; returns the summary written to ``summary.json``.

    Args:
        task: what to train (:class:`TrainingTask`).
        resume: continue the run in ``task.config.out`` from its checkpoint (same settings,
            same number of processes; ``iterations`` may grow, never shrink).
        progress: show a progress bar (process 0 only).
        processes: this process's place in a data-parallel run (default: from torchrun's
            environment variables).
        pause_at: stop after this iteration as an interruption would (checkpoint saved, a
            ``paused`` event in the log, no summary) and return ``{"paused": True,
            "iteration": ...}``; a later ``resume=True`` continues exactly. Ignored when it is
            not below the run's iterations; a run already there returns at once.

    Returns:
        The summary (config, iterations, env, device, timing and the task's entries). The
        timing is this session's: ``seconds_this_session``, ``images_per_second_this_session``
        and ``first_iteration_seconds_this_session`` (which holds any one-time start-up of the
        training pass, such as a ``torch.compile`` compilation). In a data-parallel run,
        processes other than 0 return ``{"rank": r}``.

    Raises:
        TrainingInterrupted: Ctrl-C or SIGTERM (after saving, see the module docstring).
        TrainingDivergedError: a NaN or infinite loss.
        UsageError: bad settings, a folder holding another run, a resume that does not fit.
    """
    training = _Training(task, resume, processes)
    if pause_at is not None and pause_at < training.total and training.iteration >= pause_at:
        return {"paused": True, "iteration": training.iteration}  # already there
    training.begin(progress)
    with training.interruptible() as interrupts:
        while training.iteration < training.total:
            step = training.step()
            record = training.record(step)
            if training.roll_back(step, record):
                continue
            training.after_iteration(step, record)
            if training.stops(pause_at, interrupts):
                break
    return training.end(pause_at)


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics without the ``heldout_`` prefix of the log records."""
    return {k.removeprefix("heldout_"): v for k, v in metrics.items()}


__all__ = [
    "BEST_FILE",
    "COLLAPSE_MARGIN",
    "LOG_EVERY",
    "MONITOR_MODES",
    "TRAINING_PRECISIONS",
    "BestTracker",
    "LogWindow",
    "Processes",
    "Rollback",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "TrainingPrecision",
    "TrainingTask",
    "autocast",
    "check_training_precision",
    "deferred_interrupts",
    "gradients_all_zero",
    "is_collapse",
    "launched_processes",
    "precision_unavailable",
    "read_best",
    "run_training",
]
