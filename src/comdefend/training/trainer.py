"""Training ComDefend (any preset) with the paper's objective: the ``purifier`` task of the
training engine (:mod:`comdefend.training.engine`).

Usage from Python::

    from comdefend.training import TrainConfig, train
    summary = train(TrainConfig(dataset="cifar10", preset="normal", iterations=7500, out="runs/c"))
    # or by recipe (comdefend.training.recipes), with overrides:
    from comdefend.training.recipes import resolve_config
    summary = train(resolve_config("authors", out="runs/authors", stabilize="clip-grad"))
    # bfloat16 autocast (CPUs with AVX512-BF16 or AMX, recent GPUs), fp32 master weights:
    summary = train(TrainConfig(out="runs/c-bf16", precision="bf16"))
    # the same training, faster: NHWC convolutions and a compiled forward pass
    summary = train(TrainConfig(out="runs/c-fast", channels_last=True, compile=True))
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from comdefend.checkpoint import atomic_write
from comdefend.data.datasets import DATASETS, ImageSet, load_dataset
from comdefend.errors import UsageError
from comdefend.losses import comdefend_loss
from comdefend.metrics import mean_psnr, psnr_from_mse
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import get_preset
from comdefend.training.batches import EpochBatches, FolderPatches, iteration_generator
from comdefend.training.engine import (
    BEST_FILE,
    COLLAPSE_MARGIN,
    Processes,
    TrainingDivergedError,
    TrainingTask,
    autocast,
    check_training_precision,
    gradients_all_zero,
    is_collapse,
    read_best,
    run_training,
)
from comdefend.training.run import RunDirectory
from comdefend.training.schedules import SCHEDULES, learning_rate
from comdefend.training.stabilizers import STABILIZERS, Stabilization


@dataclass
class TrainConfig:
    """Every setting of a ComDefend training run (saved in its checkpoints and summary).

    Attributes:
        recipe: the recipe these settings came from (:mod:`comdefend.training.recipes`); the
            fields below are the resolved values, flags included.
        adam_beta1, adam_beta2: Adam's betas (0.9, 0.999 by default; the authors' PyTorch
            script used 0.5, 0.999).
        stabilize: measures against collapse, ``{name: strength}``
            (:mod:`comdefend.training.stabilizers`); empty in every recipe.
        patch_size: training images are random ``patch_size`` x ``patch_size`` crops (image
            folders always; other datasets only when it is smaller than their images).
        snapshot_every: keep the weights every this many iterations (and at the end) in
            ``OUT/snapshots/iteration-NNNNNN.safetensors``, loadable with
            :meth:`ComDefend.from_checkpoint`, to measure the run along its training later
            (``None``: no snapshots). It may change on ``--resume``.
        stop_when_dead: end the run early once every gradient has been exactly zero for
            :data:`DEAD_ITERATIONS` iterations (a collapse it cannot leave); ``False`` trains
            to the last iteration anyway, as a study that reports collapses must.
        precision: the arithmetic of the model's forward pass in training: ``fp32`` (the
            default), ``bf16`` or ``fp16`` (:func:`torch.autocast`; fp16 with a gradient
            scaler) or ``tf32`` (CUDA only). The weights, Adam's state, the code noise, the
            binarizer's sigmoid, the loss and the held-out evaluation stay float32. Refused
            where the device lacks it (:class:`~comdefend.training.engine.TrainingPrecision`);
            it may not change on ``--resume``.
        channels_last: train with the weights and the batches in the channels-last (NHWC)
            memory format, which oneDNN's convolutions prefer on CPUs. Checkpoints hold the
            weights in the usual layout, so they load into any ``ComDefend``.
        compile: run the encoder and the decoder of the training pass through
            :func:`torch.compile` (compiled once per process at the first iteration; the
            held-out evaluation stays eager). The model and its checkpoints are the same as
            without it. Refused where ``torch.compile`` cannot run (:func:`compile_unavailable`).

    ``channels_last`` and ``compile`` change how the same arithmetic is carried out, not what
    is trained, like ``threads``: the last bits of a step may differ from an eager NCHW step,
    and a resume with the same settings is bit-identical. Both may change on ``--resume``.

    :data:`RESUMABLE_CHANGES` names the settings that may change on ``--resume`` (and between
    a finished run and a residual study reusing it); every other one must match.
    """

    #: Settings that do not change what is trained: where the run folder lies, the thread count
    #: or device, the memory format and compilation of the training pass, how often to
    #: evaluate, save or keep snapshots, how many iterations in all (``resume`` is a key of the
    #: oldest run folders).
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset(
        {
            "iterations",
            "device",
            "threads",
            "out",
            "eval_every",
            "checkpoint_every",
            "resume",
            "snapshot_every",
            "channels_last",
            "compile",
        }
    )

    dataset: str = "cifar10"
    out: str = "runs/comdefend"
    preset: str = "plain"
    code_channels: int | None = None
    iterations: int = 7500
    batch_size: int = 20
    lr: float | None = None
    lr_schedule: str = "constant"
    noise_std: float = 20.0
    code_penalty: float = 1e-4
    seed: int = 0
    data_dir: str | None = None
    patch_size: int = 32
    eval_every: int = 500
    eval_images: int = 500
    checkpoint_every: int = 250
    device: str = "auto"
    threads: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    recipe: str = "residual-study"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    stabilize: dict[str, float] = field(default_factory=dict)
    snapshot_every: int | None = None
    stop_when_dead: bool = True
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        self.preset = get_preset(self.preset).name
        self.precision = check_training_precision(self.precision)
        for name in ("channels_last", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, got {getattr(self, name)!r}")
        schedule = SCHEDULES.get(self.lr_schedule)  # UsageError listing the valid names
        self.lr_schedule = schedule.name
        if self.lr is None:
            if schedule.default_lr is None:
                raise UsageError(f"--lr-schedule {schedule.name} has no default; pass --lr")
            self.lr = schedule.default_lr
        if self.dataset not in DATASETS and self.dataset != "folder":
            raise UsageError(
                f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}, folder"
            )
        for name in ("iterations", "batch_size", "eval_every", "checkpoint_every", "patch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be >= 1")
        if self.lr <= 0 or self.noise_std < 0 or self.code_penalty < 0:
            raise UsageError("lr must be > 0; noise-std and code-penalty must be >= 0")
        for value in (self.lr, self.noise_std, self.code_penalty):
            if not math.isfinite(value):
                raise UsageError("lr, noise-std and code-penalty must be finite numbers")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise UsageError("Adam's betas must lie in [0, 1)")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.snapshot_every is not None and (
            isinstance(self.snapshot_every, bool) or self.snapshot_every < 1
        ):
            raise UsageError(f"snapshot-every must be >= 1, got {self.snapshot_every}")
        self.stabilize = {STABILIZERS.canonical(k): float(v) for k, v in self.stabilize.items()}
        # checks the values, and that a measure acting on held-out evaluations has them
        stabilization = Stabilization.from_names(self.stabilize)
        stabilization.check_evaluations(0 if self.dataset == "folder" else self.eval_images)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def image_channels_for(dataset: str) -> int:
    return DATASETS[dataset].channels if dataset in DATASETS else 3


def make_batches(config: TrainConfig) -> EpochBatches | FolderPatches:
    if config.dataset == "folder":
        if not config.data_dir:
            raise UsageError("--dataset folder needs --data-dir pointing at an image folder")
        return FolderPatches(config.data_dir, config.batch_size, config.patch_size, config.seed)
    return EpochBatches(
        load_dataset(config.dataset, "train", config.data_dir),
        config.batch_size,
        config.seed,
        crop=config.patch_size,
    )


def held_out(config: TrainConfig) -> torch.Tensor | None:
    """The first ``eval_images`` test images (None for image folders without a test split)."""
    if config.dataset == "folder" or config.eval_images < 1:
        return None
    test: ImageSet = load_dataset(config.dataset, "test", config.data_dir)
    return test.head(config.eval_images).float_images()


@torch.no_grad()
def evaluate_reconstruction(
    model: ComDefend, images: torch.Tensor, batch: int = 250
) -> dict[str, float]:
    """PSNR (8-bit, of the mean MSE) and fraction of 1-bits of ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outputs, ones, total = [], 0.0, 0
    for chunk in images.split(batch):
        chunk = chunk.to(device)
        reconstruction, bits = model.reconstruct(chunk)
        outputs.append(reconstruction.cpu())
        ones += float(bits.sum())
        total += bits.numel()
    model.train(was_training)
    return {"psnr_db": mean_psnr(torch.cat(outputs), images), "bit_density": ones / total}


def build_model(config: TrainConfig) -> ComDefend:
    return ComDefend(
        ComDefendConfig(
            preset=config.preset,
            image_channels=image_channels_for(config.dataset),
            code_channels=config.code_channels,
            noise_std=config.noise_std,
            source=f"trained:{config.dataset}:{config.preset}:{config.iterations}it:seed{config.seed}",
        )
    )


EvaluationHook = Callable[[int, ComDefend], dict[str, Any]]


def compile_unavailable() -> str | None:
    """Why :func:`torch.compile` cannot compile the training pass here (None: it can): a Python
    or platform TorchDynamo does not support, or no C++ compiler for its CPU code."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} on this platform"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as error:  # torch raises its own error types, which differ by version
        return f"torch.compile needs a C++ compiler ({type(error).__name__}: {error})"
    return None


#: A held-out PSNR this many dB below the best of the run is a collapse: the engine's one
#: margin (:data:`~comdefend.training.engine.COLLAPSE_MARGIN`), in ComDefend's unit.
COLLAPSE_DB = COLLAPSE_MARGIN
# Every gradient exactly zero for this many iterations in a row (each with its own batch and
# noise) ends the run early: it can no longer learn. This is how the plain recipe collapses:
# the output sigmoid saturates (pre-activations of -300 to -3,000 on every pixel), its gradient
# is exactly 0 in float32, and so is every gradient behind it; Adam's remaining momentum has
# decayed to 0.9**100 of its value by then. Both plain Fashion-MNIST runs stayed there.
DEAD_ITERATIONS = 100
# Settings that older run folders do not record: the values they were trained with.
LEGACY_DEFAULTS: dict[str, Any] = {
    "recipe": "residual-study",
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "stabilize": {},
    "snapshot_every": None,
    "stop_when_dead": True,
    "precision": "fp32",
    "channels_last": False,
    "compile": False,
}
#: Where a run keeps its snapshots (``TrainConfig.snapshot_every``).
SNAPSHOTS_FOLDER = "snapshots"
NOISE_STREAM = 2


def snapshot_name(iteration: int) -> str:
    """File name of the snapshot after ``iteration`` (zero-padded: they sort by iteration).

    Example:
        >>> snapshot_name(700)
        'iteration-000700.safetensors'
    """
    return f"iteration-{iteration:06d}.safetensors"


def _save_weights(
    model: ComDefend, path, config: TrainConfig, iteration: int, metrics: dict[str, float]
) -> None:
    was_training = model.training
    model.eval()
    recipe = {"name": config.recipe, "fields": config.to_dict()}
    model.save(
        path,
        extra={
            "training": {
                "config": config.to_dict(),
                "recipe": recipe,
                "iterations": iteration,
                "metrics": metrics,
            }
        },
    )
    model.train(was_training)


def to_channels_last(model: nn.Module) -> None:
    """Put ``model``'s 4-d weights (the convolutions') in the channels-last memory format, in
    place, as ``model.to(memory_format=torch.channels_last)`` does: same values, NHWC strides.

    Example:
        >>> layer = nn.Conv2d(3, 8, 3)
        >>> to_channels_last(layer)
        >>> layer.weight.is_contiguous(memory_format=torch.channels_last)
        True
    """
    for parameter in model.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)


class NoisyReconstruction(nn.Module):
    """ComDefend's training pass as one ``forward`` (what DistributedDataParallel wraps):
    code logits (bounded if a stabilizer says so), ``sigmoid(logits - noise)``, decoder. Returns
    ``(reconstruction, code, logits)``, the logits before any bound (for a logit penalty).

    The noise of iteration ``i`` is drawn for the whole global batch from the generator of
    ``(seed, i)`` and this process's rows are taken from it, so a data-parallel run sees the
    noise a single process would. For one process it is exactly the binarizer's own draw.

    At ``bf16`` or ``fp16`` the encoder and the decoder run under :func:`torch.autocast`; the
    logits are cast to float32 before the noise is subtracted, so the noise, the binarizer's
    sigmoid, the code and the returned reconstruction (and so the loss) are float32. At
    ``fp32`` and ``tf32`` there is no autocast at all.

    ``channels_last=True`` passes the batch and the code in the channels-last memory format
    (the model's weights are converted by :meth:`PurifierTask.setup`). ``compile=True`` runs
    ``model.code_logits`` and ``model.decode`` through :func:`torch.compile`: the compiled
    functions take the model's parameters as inputs, so the model, its ``state_dict`` keys and
    every other use of it (evaluation, saving) are those of the eager model.
    """

    def __init__(
        self,
        model: ComDefend,
        stabilization: Stabilization,
        precision: str = "fp32",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.stabilization = stabilization
        self.precision = check_training_precision(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.code_logits: Callable[[torch.Tensor], torch.Tensor] = model.code_logits
        self.decode: Callable[[torch.Tensor], torch.Tensor] = model.decode
        if compile:
            self.code_logits = torch.compile(model.code_logits)
            self.decode = torch.compile(model.decode)
        self.largest_logit = torch.zeros(())

    def forward(
        self, x: torch.Tensor, generator: torch.Generator, global_batch: int, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.contiguous(memory_format=self.memory_format)
        with autocast(self.precision, x.device):
            unbounded = self.code_logits(x)
        unbounded = unbounded.float()  # the same tensor at fp32 and tf32
        self.largest_logit = unbounded.detach().abs().max()
        logits = self.stabilization.bound_logits(unbounded)
        std = float(self.model.binarizer.noise_std)
        if std == 0.0:
            code = torch.sigmoid(logits)
        else:
            shape = (global_batch, *logits.shape[1:])
            if generator.device != logits.device:
                noise = torch.randn(shape, generator=generator, device=generator.device)
                noise = noise[rows].to(device=logits.device, dtype=logits.dtype) * std
            else:
                noise = torch.randn(shape, generator=generator, dtype=logits.dtype)[rows] * std
            code = torch.sigmoid(logits - noise)
        code = code.contiguous(memory_format=self.memory_format)
        with autocast(self.precision, code.device):
            reconstruction = self.decode(code)
        return reconstruction.float(), code, unbounded


class PurifierTask(TrainingTask):
    """The ``purifier`` task: ComDefend with ``mse + lambda * mean(code^2)``.

    Args:
        config: the run's :class:`TrainConfig`.
        on_evaluation: ``hook(iteration, model)`` called at every held-out evaluation (model in
            eval mode); the numbers it returns join that log record.
    """

    kind = "purifier"
    monitor = "heldout_psnr_db"
    monitor_mode = "max"
    monitor_label, monitor_unit = "PSNR", " dB"
    collapse_margin = COLLAPSE_DB
    legacy_defaults = LEGACY_DEFAULTS
    model: ComDefend

    def __init__(self, config: TrainConfig, on_evaluation: EvaluationHook | None = None) -> None:
        super().__init__(config)
        self.config: TrainConfig = config
        self.on_evaluation = on_evaluation
        self.stabilization = Stabilization.from_names(config.stabilize)
        self.precision = config.precision
        self.evaluation_images: torch.Tensor | None = None
        if config.compile and (why := compile_unavailable()) is not None:
            raise UsageError(f"--compile is not available here: {why}")  # before any file

    @property
    def dead_iterations(self) -> int | None:
        # read at call time: tests shorten it
        return DEAD_ITERATIONS if self.config.stop_when_dead else None

    def snapshot_due(self, iteration: int) -> bool:
        every = self.config.snapshot_every
        return every is not None and (iteration % every == 0 or iteration == self.total_iterations)

    def save_snapshot(self, folder: Path, iteration: int, metrics: dict[str, Any]) -> None:
        assert isinstance(self.model, ComDefend)
        path = folder / SNAPSHOTS_FOLDER / snapshot_name(iteration)
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_weights(self.model, path, self.config, iteration, metrics)

    @property
    def base_lr(self) -> float:
        """The initial learning rate (TrainConfig fills in the schedule's default for None)."""
        assert self.config.lr is not None
        return float(self.config.lr)

    def setup(self, device: torch.device, processes: Processes) -> None:
        self.device = device
        torch.manual_seed(self.config.seed)  # weight initialisation
        self.model = build_model(self.config).to(device)
        if self.config.channels_last:
            to_channels_last(self.model)
        self.batches = make_batches(self.config)
        self.evaluation_images = held_out(self.config) if processes.is_main else None
        self.total_iterations = self.config.iterations
        self.step_module = NoisyReconstruction(
            self.model,
            self.stabilization,
            self.config.precision,
            channels_last=self.config.channels_last,
            compile=self.config.compile,
        )

    def build_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        betas = (self.config.adam_beta1, self.config.adam_beta2)
        return self.stabilization.optimizer(parameters, self.base_lr, betas)

    def learning_rate(self, iteration: int) -> float:
        config = self.config
        return learning_rate(config.lr_schedule, self.base_lr, iteration, config.iterations)

    def training_module(self) -> nn.Module:
        return self.step_module

    def compute_loss(
        self, module: nn.Module, iteration: int, share: slice
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = self.batches(iteration)
        x = images[share].to(self.device, non_blocking=True)
        noise = iteration_generator(self.config.seed, iteration, stream=NOISE_STREAM)
        reconstruction, code, logits = module(x, noise, images.shape[0], share)
        loss, mse, code_term = comdefend_loss(reconstruction, x, code, self.config.code_penalty)
        penalty = self.stabilization.penalty(logits)
        with torch.no_grad():
            ones = (code > 0.5).float().mean()
            # output pixels whose sigmoid has saturated (slope below 1e-6: pre-activation beyond
            # about +-13.8), the state a collapsed run ends in
            saturated = (reconstruction * (1 - reconstruction) < 1e-6).float().mean()
        metrics = {
            "loss": loss,
            "mse": mse,
            "code_term": code_term,
            "train_bit_density": ones,
            # the largest |code logit| of the batch (before any code-bound), averaged over the
            # logged window: how far the logits have run away
            "max_abs_code_logit": self.step_module.largest_logit,
            "saturated_output": saturated,
        }
        if penalty is not None:
            loss = loss + penalty
            metrics["loss"] = loss
            metrics["logit_penalty"] = penalty
        return loss, metrics

    def evaluation_due(self, iteration: int) -> bool:
        return iteration % self.config.eval_every == 0

    def evaluate(self, iteration: int) -> dict[str, Any]:
        record: dict[str, Any] = {}
        if self.evaluation_images is not None:
            heldout = evaluate_reconstruction(self.model, self.evaluation_images)
            record.update({f"heldout_{k}": v for k, v in heldout.items()})
        if self.on_evaluation is not None:
            record.update(self.on_evaluation(iteration, self.model))
        return record

    def save_weights(self, path: os.PathLike | str, iteration: int, metrics: dict) -> None:
        assert isinstance(self.model, ComDefend)
        _save_weights(self.model, path, self.config, iteration, metrics)

    def describe_progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {
            "loss": f"{metrics['loss']:.4f}",
            "psnr": f"{psnr_from_mse(metrics['mse']):.2f}",
            "bits": f"{metrics['train_bit_density']:.2f}",
        }

    def finish(self, run: RunDirectory, iteration: int, state: dict[str, Any]) -> dict[str, Any]:
        model = self.model
        assert isinstance(model, ComDefend)
        images = self.evaluation_images
        final = evaluate_reconstruction(model, images) if images is not None else {}
        model.eval()
        model_path = run.path / "model.safetensors"
        _save_weights(model, model_path, self.config, iteration, final)
        best = state["best"]
        if final and (best is None or final["psnr_db"] >= best["psnr_db"]):
            best = {"iteration": iteration, "psnr_db": final["psnr_db"]}
            atomic_write(run.path / BEST_FILE, lambda tmp: shutil.copyfile(model_path, tmp))
        run.log(
            {
                "event": "done",
                "iteration": iteration,
                **{f"heldout_{k}": v for k, v in final.items()},
            }
        )
        best_psnr = best["psnr_db"] if best else None
        margin = self.collapse_margin
        return {
            "recipe": self.config.recipe,
            "heldout": final,
            "model": str(model_path),
            "best": {**best, "model": str(run.path / BEST_FILE)} if best else None,
            "collapsed": bool(final)
            and is_collapse(final["psnr_db"], best_psnr, self.monitor_mode, margin),
        }


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_evaluation: EvaluationHook | None = None,
    pause_at: int | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the summary written to ``summary.json``.

    ``pause_at=N`` stops after iteration N with a checkpoint, as an interruption would, and
    returns ``{"paused": True, "iteration": N}``; ``resume=True`` later continues exactly (a way
    to train several runs breadth-first).

    ``on_evaluation(iteration, model)`` is called at every held-out evaluation (every
    ``eval_every`` iterations and at the end) with the model in eval mode; the numbers it
    returns are added to that log record (the residual study measures defended accuracy here).

    Ctrl-C or SIGTERM finishes the current iteration, saves a checkpoint and raises
    :class:`~comdefend.training.engine.TrainingInterrupted` (a ``KeyboardInterrupt``);
    ``resume=True`` continues exactly from it. Started by ``torchrun`` with several processes,
    the run is data-parallel (see :mod:`comdefend.training.engine`).

    The weights with the best held-out PSNR so far are kept in ``best.safetensors``; an
    evaluation more than :data:`COLLAPSE_DB` below that best is logged as a collapse and warned
    about. A NaN or infinite loss stops the run with :class:`TrainingDivergedError` before the
    step is applied. A run whose gradients have all been exactly zero for
    :data:`DEAD_ITERATIONS` iterations is dead: it is checkpointed and ends early, with
    ``stopped_early`` in its summary (and usually ``collapsed``: use ``best.safetensors``).
    """
    return run_training(
        PurifierTask(config, on_evaluation), resume=resume, progress=progress, pause_at=pause_at
    )


__all__ = [
    "BEST_FILE",
    "COLLAPSE_DB",
    "DEAD_ITERATIONS",
    "SNAPSHOTS_FOLDER",
    "NoisyReconstruction",
    "PurifierTask",
    "TrainConfig",
    "TrainingDivergedError",
    "build_model",
    "compile_unavailable",
    "evaluate_reconstruction",
    "gradients_all_zero",
    "read_best",
    "snapshot_name",
    "train",
]
