"""One training engine for every kind of model: a task says *what* is trained, the engine *how*.

A :class:`TrainingTask` (``PurifierTask`` for ComDefend, ``ClassifierTask`` for classifiers)
builds the model, the optimizer and the loss of one iteration and evaluates held-out data. The
engine, :func:`run_training`, owns everything else, once for all tasks:

- deterministic batches: iteration ``i`` always sees the same global batch (seeded by
  ``(seed, i)``), so ``--resume`` is bit-identical without saving random states;
- the learning-rate schedule (the task's) and the optional stabilizers (gradient clipping,
  learning-rate decay: :mod:`comdefend.training.stabilizers`);
- logging (``log.jsonl``: means over the last :data:`LOG_EVERY` iterations, every evaluation,
  every event) and the progress bar;
- held-out evaluation, the best weights so far (``best.safetensors``) and collapse warnings;
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
import platform
import signal
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comdefend.checkpoint import read_metadata
from comdefend.console import logger, progress_bar
from comdefend.distributed import Launch, join_process_group, launch_environment
from comdefend.errors import ComDefendError, UsageError
from comdefend.models.precision import precision_context
from comdefend.training.run import RunDirectory, environment, resolve_device
from comdefend.training.stabilizers import MAX_ROLLBACKS, Stabilization
from comdefend.validation import set_threads

LOG_EVERY = 10
BEST_FILE = "best.safetensors"
# A held-out score this far below the run's best is reported as a collapse (see trainer.py).
DEFAULT_COLLAPSE_MARGIN = 6.0


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

    def reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the processes (``values`` itself in a single process)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values)
        return values / self.world_size

    def reduce_max(self, value: bool, device: torch.device) -> bool:
        if not self.distributed:
            return value
        import torch.distributed as dist

        flag = torch.tensor([float(value)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

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


def _probe(namespace: object, name: str) -> bool:
    """A hardware probe of torch's (private, so absent in some versions: False then)."""
    try:
        return bool(getattr(namespace, name)())
    except (AttributeError, RuntimeError):
        return False


def _cpu_lacks(precision: str) -> str | None:
    if precision == "tf32":
        return "TF32 exists only on CUDA GPUs (Ampere or later)"
    if precision == "bf16":
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            # Without AVX512-BF16 or AMX, oneDNN emulates bfloat16: slower than fp32.
            native = _probe(torch.cpu, "_is_avx512_bf16_supported") or _probe(
                torch.cpu, "_is_amx_tile_supported"
            )
            return None if native else "this CPU has neither AVX512-BF16 nor AMX"
        onednn_bf16 = _probe(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
        if torch.backends.mkldnn.is_available() and onednn_bf16:
            return None
        return "oneDNN has no bfloat16 kernels for this CPU"
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


# -- the task interface -------------------------------------------------------------------------
class TrainingTask(ABC):
    """What is trained. The engine calls, in order: :meth:`setup`, :meth:`build_optimizer`, then
    per iteration :meth:`learning_rate` and :meth:`compute_loss`, :meth:`evaluate` when
    :meth:`evaluation_due`, and :meth:`finish` at the end.

    Attributes:
        kind: ``"purifier"`` or ``"classifier"`` (recorded in the log).
        config: the run's settings dataclass; the engine reads ``out``, ``seed``, ``threads``,
            ``device``, ``checkpoint_every`` and ``to_dict()`` from it.
        model: the model being trained (set by :meth:`setup`).
        total_iterations: iterations of the whole run (set by :meth:`setup`).
        monitor: the evaluation metric whose best value is kept in ``best.safetensors``
            (higher is better), or None.
        stabilization: the measures against collapse the engine applies (clipping, decay).
        legacy_defaults: values of config keys that older run folders do not record, so that
            they still resume.
        precision: the training precision (:data:`TRAINING_PRECISIONS`), or None for a task
            without the setting (fp32, TF32 settings left alone); a task with one puts
            :func:`autocast` around its model's forward pass.
    """

    kind: str = "model"
    monitor: str | None = None
    precision: str | None = None
    collapse_margin: float = DEFAULT_COLLAPSE_MARGIN
    legacy_defaults: dict[str, Any] = {}

    def __init__(self, config: Any) -> None:
        self.config = config
        self.model: nn.Module = nn.Identity()
        self.total_iterations = 0
        self.stabilization = Stabilization()

    # The run's settings that must match on --resume.
    def resume_config(self) -> dict[str, Any]:
        return self.config.to_dict()

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


# -- helpers ------------------------------------------------------------------------------------
def gradients_all_zero(model: nn.Module) -> bool:
    """Whether every parameter's gradient of the last backward pass is exactly zero."""
    grads = [p.grad.detach().abs().amax() for p in model.parameters() if p.grad is not None]
    return bool(grads) and not bool(torch.stack(grads).amax() > 0)


def read_best(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"iteration", "psnr_db"}`` of a run's ``best.safetensors``, or None if it has none."""
    try:
        training = read_metadata(path)["training"]
    except (KeyError, ComDefendError):  # no best.safetensors yet, or not one of ours
        return None
    return {"iteration": int(training["iterations"]), "psnr_db": training["metrics"]["psnr_db"]}


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


# -- the engine ---------------------------------------------------------------------------------
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
        The summary (config, iterations, env, device, timing and the task's entries). In a
        data-parallel run, processes other than 0 return ``{"rank": r}``.

    Raises:
        TrainingInterrupted: Ctrl-C or SIGTERM (after saving, see the module docstring).
        TrainingDivergedError: a NaN or infinite loss.
        UsageError: bad settings, a folder holding another run, a resume that does not fit.
    """
    config = task.config
    set_threads(config.threads)  # None: torch's default; 0 or less is refused, not ignored
    # Subnormal floats appear in saturated sigmoid/ELU gradients and are slow on CPUs.
    torch.set_flush_denormal(True)
    processes = processes or launched_processes()
    device = start_processes(processes, config.device)
    numerics = TrainingPrecision(task.precision, device)  # refused before any file is written
    run = RunDirectory(
        config.out,
        resume,
        task.resume_config(),
        writer=processes.is_main,
        world_size=processes.world_size,
        legacy_defaults=task.legacy_defaults,
    )
    task.setup(device, processes)
    total = task.total_iterations
    if total < 1:
        raise UsageError(f"iterations must be >= 1, got {total}")
    model = task.model
    optimizer = task.build_optimizer(list(model.parameters()))
    start = 0
    lr_scale, rollbacks = 1.0, 0  # the rollback stabilizer's state
    if resume:
        saved_state = run.load(model, optimizer)
        start = int(saved_state["iteration"])
        lr_scale = float(saved_state.get("lr_scale", 1.0))
        rollbacks = int(saved_state.get("rollbacks", 0))
        numerics.load(saved_state)
        if start > total:
            raise UsageError(
                f"--resume: the run in {run.path} has already done {start} iterations, more "
                f"than the {total} asked for; pass at least --iterations {start} (a run is "
                "never shortened: its checkpoint and log are kept as they are)"
            )
    if pause_at is not None and pause_at < total and start >= pause_at:
        return {"paused": True, "iteration": start}  # already there: nothing to train
    share = processes.share(int(config.batch_size))
    module = task.training_module()
    if processes.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)

    best = read_best(run.path / BEST_FILE) if resume and task.monitor else None
    event: dict[str, Any] = {
        "event": "resume" if resume else "start",
        "iteration": start,
        "task": task.kind,
        "device": str(device),
        "world_size": processes.world_size,
        "env": environment(),
    }
    if not resume:
        event["config"] = config.to_dict()
    elif getattr(config, "stabilize", None) is not None:
        event["stabilize"] = config.stabilize  # a resume may add or drop rollback
    run.log(event)

    model.train()
    iteration = start
    bar = progress_bar(
        total=total,
        initial=start,
        enabled=progress and processes.is_main,
        desc="train",
        unit="it",
    )
    started, images_seen = time.perf_counter(), 0
    window: dict[str, float] = {}
    window_count = 0
    zero_streak, stopped_early = 0, None
    collapse_warned = False
    in_step = False
    stabilization = task.stabilization
    healthy: _Snapshot | None = None  # the last healthy evaluation's state (rollback)

    def save(at: int) -> None:
        state = {"lr_scale": lr_scale, "rollbacks": rollbacks, **numerics.state()}
        run.save(model, optimizer, at, state)

    try:
        with deferred_interrupts() as interrupts, numerics.training_math():
            while iteration < total:
                lr = task.learning_rate(iteration) * stabilization.lr_factor(iteration, total)
                lr *= lr_scale
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss, metrics = task.compute_loss(module, iteration, share)
                names = sorted(metrics)
                values = torch.stack([metrics[name].detach().float() for name in names])
                values = processes.reduce_mean(values).cpu()
                means = dict(zip(names, values.tolist(), strict=True))
                if not all(math.isfinite(v) for v in means.values()):
                    run.log({"event": "diverged", "iteration": iteration + 1})
                    raise TrainingDivergedError(
                        f"the loss became {means.get('loss')} at iteration {iteration + 1}; "
                        f"{run.checkpoint_path} still holds the last good state (every "
                        f"{config.checkpoint_every} iterations) and {run.path / BEST_FILE} "
                        "the best weights so far; a lower --lr or --stabilize may help"
                    )
                in_step = True
                optimizer.zero_grad(set_to_none=True)
                numerics.backward(loss)
                numerics.unscale(optimizer)
                dead = gradients_all_zero(model)
                grad_norm = stabilization.clip(list(model.parameters()))
                numerics.step(optimizer)
                in_step = False
                iteration += 1
                images_seen += int(config.batch_size)
                zero_streak = zero_streak + 1 if dead else 0

                for name, value in means.items():
                    window[name] = window.get(name, 0.0) + value
                window_count += 1
                record: dict[str, Any] = {"iteration": iteration, "lr": lr}
                if grad_norm is not None:
                    record["grad_norm_before_clip"] = grad_norm
                if task.evaluation_due(iteration) or iteration == total:
                    if processes.is_main:
                        model.eval()
                        with numerics.evaluation():
                            heldout = task.evaluate(iteration)
                        model.train()
                        record.update(heldout)
                        score = heldout.get(task.monitor) if task.monitor else None
                        if score is not None:
                            if best is None or score > best["psnr_db"]:
                                best = {"iteration": iteration, "psnr_db": score}
                                task.save_weights(run.path / BEST_FILE, iteration, _plain(heldout))
                            elif score < best["psnr_db"] - task.collapse_margin:
                                record["collapse"] = True
                                if not collapse_warned:
                                    collapse_warned = True
                                    logger.warning(
                                        f"held-out PSNR fell to {score:.2f} dB at "
                                        f"iteration {iteration}, from {best['psnr_db']:.2f} dB "
                                        f"at iteration {best['iteration']}: the run is "
                                        "diverging; the best weights are kept in "
                                        f"{run.path / BEST_FILE}"
                                    )
                limit = task.dead_iterations
                if limit is not None and zero_streak >= limit:
                    stopped_early = {
                        "iteration": iteration,
                        "reason": f"every gradient was exactly zero for {zero_streak} "
                        "iterations in a row: the model cannot learn any more (a saturated "
                        "output, as in a collapse)",
                    }
                    record["dead"] = True
                if iteration % LOG_EVERY == 0 or len(record) > 2 or iteration == total:
                    record.update({k: v / window_count for k, v in window.items()})
                    record["iterations_averaged"] = window_count
                    run.log(record)
                    window, window_count = {}, 0
                if stabilization.rollback is not None and task.monitor:
                    evaluated = task.evaluation_due(iteration) or iteration == total
                    # every process takes the same decision (process 0 evaluates)
                    trouble = evaluated and processes.reduce_max(
                        bool(record.get("collapse")), device
                    )
                    trouble = trouble or stopped_early is not None
                    if trouble and healthy is not None and rollbacks < MAX_ROLLBACKS:
                        healthy.restore(model, optimizer, numerics)
                        rollbacks += 1
                        lr_scale *= stabilization.rollback
                        run.log(
                            {
                                "event": "rollback",
                                "iteration": iteration,
                                "to": healthy.iteration,
                                "lr_scale": lr_scale,
                                "rollbacks": rollbacks,
                            }
                        )
                        if processes.is_main:
                            logger.warning(
                                f"collapse at iteration {iteration}: back to iteration "
                                f"{healthy.iteration}, learning rate x{lr_scale:g} "
                                f"(rollback {rollbacks} of at most {MAX_ROLLBACKS})"
                            )
                        iteration, stopped_early, zero_streak = healthy.iteration, None, 0
                        window, window_count = {}, 0
                        save(iteration)
                        bar.n = iteration
                        bar.refresh()
                        continue
                    if evaluated and not trouble:
                        healthy = _Snapshot.take(model, optimizer, iteration, numerics)
                for extra in task.after_step(iteration, means):
                    run.log(extra)
                    if progress and processes.is_main and "message" in extra:
                        bar.write(extra["message"])
                if processes.is_main and task.snapshot_due(iteration):
                    measured = {k: v for k, v in record.items() if k.startswith("heldout_")}
                    task.save_snapshot(run.path, iteration, _plain(measured))
                if task.checkpoint_due(iteration) or iteration == total or stopped_early:
                    save(iteration)
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                postfix = {**task.describe_progress(means), "img_s": f"{rate:.0f}"}
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if pause_at is not None and iteration == pause_at < total:
                    break
                if stopped_early:
                    run.log({"event": "stopped_early", **stopped_early})
                    if processes.is_main:
                        logger.warning(
                            f"stopping at iteration {iteration} of {total}: "
                            f"{stopped_early['reason']}"
                        )
                    break
                # Every process stops after the same iteration, whichever got the signal.
                if processes.reduce_max(interrupts["stop"], device):
                    raise KeyboardInterrupt
    except KeyboardInterrupt as error:
        bar.close()
        saved = not in_step
        if saved:
            save(iteration)
        run.log(
            {
                "event": "interrupted",
                "iteration": iteration,
                "saved": saved,
                "session_seconds": round(time.perf_counter() - started, 1),
            }
        )
        raise TrainingInterrupted(
            _interrupt_message(run, iteration, total, saved), iteration, saved, str(run.path)
        ) from error
    bar.close()
    seconds = time.perf_counter() - started
    if pause_at is not None and iteration == pause_at < total and not stopped_early:
        save(iteration)
        run.log({"event": "paused", "iteration": iteration, "session_seconds": round(seconds, 1)})
        return {"paused": True, "iteration": iteration}
    if not processes.is_main:
        processes.barrier()  # process 0 evaluates and writes the final files
        return {"rank": processes.rank}

    # the wall time of this session's training (the ``interrupted`` event carries it for a
    # session that ended early): how long a run took, summed over its sessions
    run.log({"event": "session_end", "iteration": iteration, "session_seconds": round(seconds, 1)})
    state = {"best": best, "optimizer": optimizer, "stopped_early": stopped_early}
    with numerics.evaluation():
        finished = task.finish(run, iteration, state)
    summary: dict[str, Any] = {
        "config": config.to_dict(),
        "task": task.kind,
        "iterations": iteration,
        **finished,
        "stopped_early": stopped_early,
        "rollbacks": rollbacks,
        "world_size": processes.world_size,
        "env": environment(),
        "device": str(device),
        "images_per_second_this_session": images_seen / max(seconds, 1e-9),
        "seconds_this_session": round(seconds, 1),
    }
    run.write_summary(summary)
    processes.barrier()
    return summary


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


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Held-out metrics without the ``heldout_`` prefix of the log records."""
    return {k.removeprefix("heldout_"): v for k, v in metrics.items()}


__all__ = [
    "BEST_FILE",
    "LOG_EVERY",
    "TRAINING_PRECISIONS",
    "Processes",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "TrainingPrecision",
    "TrainingTask",
    "autocast",
    "check_training_precision",
    "deferred_interrupts",
    "gradients_all_zero",
    "launched_processes",
    "precision_unavailable",
    "read_best",
    "run_training",
]
