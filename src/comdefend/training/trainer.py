"""Training ComDefend (any preset) with the paper's objective.

Usage from Python::

    from comdefend.training import TrainConfig, train
    summary = train(TrainConfig(dataset="cifar10", preset="normal", iterations=7500, out="runs/c"))
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from comdefend.checkpoint import atomic_write, read_metadata
from comdefend.data.datasets import DATASETS, ImageSet, load_dataset
from comdefend.errors import ComDefendError, UsageError
from comdefend.losses import comdefend_loss
from comdefend.metrics import mean_psnr, psnr_from_mse
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import get_preset
from comdefend.training.batches import EpochBatches, FolderPatches, iteration_generator
from comdefend.training.run import RunDirectory, environment, resolve_device, sigterm_as_interrupt
from comdefend.training.schedules import SCHEDULES, learning_rate


@dataclass
class TrainConfig:
    """Every setting of a ComDefend training run (saved in its checkpoints and summary)."""

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

    def __post_init__(self) -> None:
        self.preset = get_preset(self.preset).name
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
        load_dataset(config.dataset, "train", config.data_dir), config.batch_size, config.seed
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

# A held-out PSNR this many dB below the best of the run is reported as a collapse. The seed's
# recipe (Adam 1e-3, constant) can diverge late: on a GPU the plain CIFAR-10 model fell from
# 31.8 dB at iteration 6,500 to 11.9 dB at 7,000 and never recovered (docs/RESULTS.md).
COLLAPSE_DB = 6.0
BEST_FILE = "best.safetensors"
# Every gradient exactly zero for this many iterations in a row (each with its own batch and
# noise) ends the run early: it can no longer learn. This is how the plain recipe collapses:
# the output sigmoid saturates (pre-activations of -300 to -3,000 on every pixel), its gradient
# is exactly 0 in float32, and so is every gradient behind it; Adam's remaining momentum has
# decayed to 0.9**100 of its value by then. Both plain Fashion-MNIST runs stayed there.
DEAD_ITERATIONS = 100


def gradients_all_zero(model: torch.nn.Module) -> bool:
    """Whether every parameter's gradient of the last backward pass is exactly zero."""
    grads = [p.grad.detach().abs().amax() for p in model.parameters() if p.grad is not None]
    return bool(grads) and not bool(torch.stack(grads).amax() > 0)


def collapsed(psnr_db: float, best: dict[str, Any] | None) -> bool:
    """Whether a held-out PSNR lies more than :data:`COLLAPSE_DB` below the run's best."""
    return best is not None and psnr_db < best["psnr_db"] - COLLAPSE_DB


class TrainingDivergedError(ComDefendError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


def read_best(path: str | os.PathLike) -> dict[str, Any] | None:
    """``{"iteration", "psnr_db"}`` of a run's ``best.safetensors``, or None if it has none."""
    try:
        training = read_metadata(path)["training"]
    except (KeyError, ComDefendError):  # no best.safetensors yet, or not one of ours
        return None
    return {"iteration": int(training["iterations"]), "psnr_db": training["metrics"]["psnr_db"]}


def _save_weights(
    model: ComDefend, path, config: TrainConfig, iteration: int, metrics: dict[str, float]
) -> None:
    was_training = model.training
    model.eval()
    model.save(
        path,
        extra={
            "training": {"config": config.to_dict(), "iterations": iteration, "metrics": metrics}
        },
    )
    model.train(was_training)


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    on_evaluation: EvaluationHook | None = None,
) -> dict[str, Any]:
    """Train (or resume) a run; returns the summary written to ``summary.json``.

    ``on_evaluation(iteration, model)`` is called at every held-out evaluation (every
    ``eval_every`` iterations and at the end) with the model in eval mode; the numbers it
    returns are added to that log record (the seed experiment measures defended accuracy here).

    Ctrl-C or SIGTERM saves a checkpoint at the last finished iteration and re-raises
    ``KeyboardInterrupt``; ``resume=True`` continues exactly from it.

    The weights with the best held-out PSNR so far are kept in ``best.safetensors``; an
    evaluation more than :data:`COLLAPSE_DB` below that best is logged as a collapse and warned
    about. A NaN or infinite loss stops the run with :class:`TrainingDivergedError`, before the
    last good checkpoint could be overwritten. A run whose gradients have all been exactly zero
    for :data:`DEAD_ITERATIONS` iterations is dead: it is checkpointed and ends early, with
    ``stopped_early`` in its summary (and usually ``collapsed``: use ``best.safetensors``).
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    # Subnormal floats appear in saturated sigmoid/ELU gradients and are slow on CPUs.
    torch.set_flush_denormal(True)
    device = resolve_device(config.device)
    run = RunDirectory(config.out, resume, config.to_dict())
    torch.manual_seed(config.seed)  # weight initialisation
    model = build_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=float(config.lr))
    start = 0
    if resume:
        start = int(run.load(model, optimizer)["iteration"])
    batches = make_batches(config)
    evaluation_images = held_out(config)
    best = read_best(run.path / BEST_FILE) if resume else None
    collapse_warned = False
    zero_streak, stopped_early = 0, None
    if not resume:
        run.log(
            {"event": "start", "iteration": 0, "config": config.to_dict(), "env": environment()}
        )
    else:
        # Threads, device and machine may change between sessions: keep each one's provenance.
        run.log(
            {"event": "resume", "iteration": start, "device": str(device), "env": environment()}
        )

    model.train()
    iteration = start
    bar = tqdm(
        total=config.iterations, initial=start, disable=not progress, desc="train", unit="it"
    )
    started, images_seen = time.perf_counter(), 0
    try:
        with sigterm_as_interrupt():
            while iteration < config.iterations:
                lr = learning_rate(
                    config.lr_schedule, float(config.lr), iteration, config.iterations
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = batches(iteration).to(device, non_blocking=True)
                noise = iteration_generator(config.seed, iteration, stream=2)
                reconstruction, code = model.reconstruct(x, generator=noise)
                loss, mse, code_term = comdefend_loss(reconstruction, x, code, config.code_penalty)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                zero_streak = zero_streak + 1 if gradients_all_zero(model) else 0
                optimizer.step()
                iteration += 1
                images_seen += x.shape[0]
                record = {
                    "iteration": iteration,
                    "lr": lr,
                    "loss": float(loss.detach()),
                    "mse": float(mse.detach()),
                    "code_term": float(code_term.detach()),
                }
                if not math.isfinite(record["loss"]):
                    run.log({"event": "diverged", "iteration": iteration})
                    raise TrainingDivergedError(
                        f"the loss became {record['loss']} at iteration {iteration}; "
                        f"{run.checkpoint_path} still holds the last good state (every "
                        f"{config.checkpoint_every} iterations) and {run.path / BEST_FILE} the "
                        "best weights so far; a lower --lr may help"
                    )
                if iteration % config.eval_every == 0 or iteration == config.iterations:
                    if evaluation_images is not None:
                        heldout = evaluate_reconstruction(model, evaluation_images)
                        record.update({f"heldout_{k}": v for k, v in heldout.items()})
                        if best is None or heldout["psnr_db"] > best["psnr_db"]:
                            best = {"iteration": iteration, "psnr_db": heldout["psnr_db"]}
                            _save_weights(model, run.path / BEST_FILE, config, iteration, heldout)
                        elif collapsed(heldout["psnr_db"], best):
                            record["collapse"] = True
                            if not collapse_warned:
                                collapse_warned = True
                                tqdm.write(
                                    f"warning: held-out PSNR fell to {heldout['psnr_db']:.2f} dB "
                                    f"at iteration {iteration}, from {best['psnr_db']:.2f} dB at "
                                    f"iteration {best['iteration']}: the run is diverging; the "
                                    f"best weights are kept in {run.path / BEST_FILE}",
                                    file=sys.stderr,
                                )
                    if on_evaluation is not None:
                        model.eval()
                        record.update(on_evaluation(iteration, model))
                        model.train()
                if zero_streak >= DEAD_ITERATIONS:
                    stopped_early = {
                        "iteration": iteration,
                        "reason": f"every gradient was exactly zero for {zero_streak} "
                        "iterations in a row: the model cannot learn any more (a saturated "
                        "output, as in a collapse)",
                    }
                    record["dead"] = True
                if iteration % 10 == 0 or len(record) > 5:
                    run.log(record)
                if (
                    iteration % config.checkpoint_every == 0
                    or iteration == config.iterations
                    or stopped_early
                ):
                    run.save(model, optimizer, iteration)
                rate = images_seen / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    psnr=f"{psnr_from_mse(record['mse']):.2f}",
                    bits=f"{float((code > 0.5).float().mean()):.2f}",
                    img_s=f"{rate:.0f}",
                    refresh=False,
                )
                bar.update(1)
                if stopped_early:
                    run.log({"event": "stopped_early", **stopped_early})
                    tqdm.write(
                        f"warning: stopping at iteration {iteration} of {config.iterations}: "
                        f"{stopped_early['reason']}; the best weights are in "
                        f"{run.path / BEST_FILE}",
                        file=sys.stderr,
                    )
                    break
    except KeyboardInterrupt:
        bar.close()
        run.save_interrupted(model, optimizer, iteration)
        raise
    bar.close()

    final = (
        evaluate_reconstruction(model, evaluation_images) if evaluation_images is not None else {}
    )
    model.eval()
    model_path = run.path / "model.safetensors"
    _save_weights(model, model_path, config, iteration, final)
    if final and (best is None or final["psnr_db"] >= best["psnr_db"]):
        best = {"iteration": iteration, "psnr_db": final["psnr_db"]}
        atomic_write(run.path / BEST_FILE, lambda tmp: shutil.copyfile(model_path, tmp))
    summary = {
        "config": config.to_dict(),
        "iterations": iteration,
        "heldout": final,
        "model": str(model_path),
        "best": {**best, "model": str(run.path / BEST_FILE)} if best else None,
        "collapsed": bool(final) and collapsed(final["psnr_db"], best),
        "stopped_early": stopped_early,
        "env": environment(),
        "device": str(device),
        "images_per_second_this_session": images_seen / max(time.perf_counter() - started, 1e-9),
    }
    run.log(
        {"event": "done", "iteration": iteration, **{f"heldout_{k}": v for k, v in final.items()}}
    )
    run.write_summary(summary)
    return summary
