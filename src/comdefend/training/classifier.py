"""Training the classifiers of :mod:`comdefend.models.classifiers` (ResNet-20, FashionCNN, ...).

The recipe is the standard one for CIFAR ResNets: SGD with Nesterov momentum 0.9, weight decay
5e-4, learning rate 0.1 decayed per iteration (cosine by default), batch 128, random crops of the
zero- or reflect-padded image and horizontal flips. The whole training set lives on the training
device as uint8 and augmentation runs there on the batch, so GPU training is not data-bound.

Everything random is drawn from generators seeded by (seed, iteration): the epoch order, the
crops and flips, and dropout. A run interrupted with Ctrl-C (or SIGTERM) saves a checkpoint and
``resume=True`` continues it to bit-identical weights (on the same device and thread count).

Usage from Python::

    from comdefend.training.classifier import ClassifierTrainConfig, train_classifier
    summary = train_classifier(ClassifierTrainConfig(dataset="cifar10", epochs=30, out="runs/r20"))
    summary["test_accuracy"]
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F  # noqa: N812 - the usual alias
from tqdm.auto import tqdm

from comdefend.data.datasets import DATASETS, ImageSet, load_dataset
from comdefend.errors import UsageError
from comdefend.models.classifiers import (
    ClassifierConfig,
    check_classifier_fits,
    classifier_from_config,
    count_parameters,
    save_classifier,
)
from comdefend.training.batches import iteration_generator
from comdefend.training.run import RunDirectory, environment, resolve_device
from comdefend.training.schedules import CLASSIFIER_SCHEDULES, classifier_learning_rate

PADDING_MODES = ("reflect", "zeros")
DEFAULT_ARCH = {"fashion-mnist": "fashion-cnn", "cifar10": "resnet20", "cifar100": "resnet20"}
LOG_EVERY = 10
# Settings that may change between an interrupted run and its --resume: they do not touch the
# weights (evaluation sizes, checkpoint interval) or are properties of the machine.
RESUMABLE_CHANGES = ("threads", "device", "eval_images", "limit_test", "checkpoint_every")
# Random streams of iteration_generator (stream 1 is the epoch order).
_ORDER_STREAM, _AUGMENT_STREAM, _DROPOUT_STREAM = 1, 2, 3


@dataclass
class ClassifierTrainConfig:
    """Every setting of a classifier training run (saved in its checkpoints and summary).

    Attributes:
        dataset: ``fashion-mnist``, ``cifar10`` or ``cifar100``.
        arch: registered architecture (default: ``fashion-cnn`` / ``resnet20`` by dataset).
        epochs: passes over the (possibly limited) training set; the last partial batch of every
            epoch is dropped.
        lr_schedule: ``cosine`` (to 0), ``onecycle`` (up from lr/25 for 30%, then cosine) or
            ``constant``; applied per iteration after ``warmup_epochs`` of linear warm-up.
        crop_padding: pixels of padding before the random crop (default 4 for 32x32 images,
            2 for 28x28); 0 disables cropping. ``padding_mode`` is ``reflect`` or ``zeros``.
        limit_train: train on the first N training images only (tests, quick looks).
        limit_test: evaluate the final model on the first N test images (default: all).
        eval_images: test images evaluated at the end of every epoch (0: none).
    """

    dataset: str = "cifar10"
    arch: str | None = None
    out: str = "runs/classifier"
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    augment: bool = True
    crop_padding: int | None = None
    padding_mode: str = "reflect"
    flip: bool = True
    seed: int = 0
    data_dir: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    eval_images: int = 1000
    checkpoint_every: int = 500
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise UsageError(f"unknown dataset {self.dataset!r}; valid: {', '.join(DATASETS)}")
        if self.arch is None:
            self.arch = DEFAULT_ARCH[self.dataset]
        check_classifier_fits(self.arch, self.dataset)
        if self.lr_schedule not in CLASSIFIER_SCHEDULES:
            raise UsageError(
                f"unknown --lr-schedule {self.lr_schedule!r}; valid: "
                f"{', '.join(CLASSIFIER_SCHEDULES)}"
            )
        if self.padding_mode not in PADDING_MODES:
            raise UsageError(
                f"unknown padding mode {self.padding_mode!r}; valid: {', '.join(PADDING_MODES)}"
            )
        if self.crop_padding is None:
            self.crop_padding = 2 if (DATASETS[self.dataset].image_size or 32) <= 28 else 4
        for name in ("epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be >= 1")
        for name in ("limit_train", "limit_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name.replace('_', '-')} must be >= 1")
        if self.limit_train is not None and self.limit_train < self.batch_size:
            raise UsageError(
                f"--limit-train {self.limit_train} is smaller than one batch ({self.batch_size})"
            )
        if self.lr <= 0:
            raise UsageError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UsageError("momentum must lie in [0, 1) and weight-decay must be >= 0")
        if self.nesterov and self.momentum == 0:
            raise UsageError("Nesterov momentum needs momentum > 0")
        if not 0 <= self.label_smoothing < 1:
            raise UsageError(f"label-smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise UsageError("warmup-epochs must lie in [0, epochs]")
        if self.crop_padding < 0 or self.eval_images < 0:
            raise UsageError("crop-padding and eval-images must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resume_dict(self) -> dict[str, Any]:
        """The settings an interrupted run must be resumed with (see :data:`RESUMABLE_CHANGES`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}


class LabelledBatches:
    """Shuffled epochs of (uint8 images, labels) kept on ``device``; batch ``i`` depends only on
    (seed, i). The last partial batch of an epoch is dropped."""

    def __init__(
        self, data: ImageSet, batch_size: int, seed: int, device: torch.device | str = "cpu"
    ) -> None:
        if len(data) < batch_size:
            raise UsageError(f"dataset has {len(data)} images, fewer than one batch ({batch_size})")
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(data) // batch_size
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def __call__(self, iteration: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = iteration_generator(self.seed, epoch, stream=_ORDER_STREAM)
            order = torch.randperm(len(self.labels), generator=generator)
            self._order = order.to(self.images.device)
            self._epoch = epoch
        index = self._order[step * self.batch_size : (step + 1) * self.batch_size]
        return self.images[index], self.labels[index]


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    padding: int,
    padding_mode: str = "reflect",
    flip: bool = True,
) -> torch.Tensor:
    """Random crops of the padded images and random horizontal flips, one draw per image.

    The draws come from the CPU ``generator``; the images stay on their device.

    Shape:
        ``(N, C, H, W)`` float -> ``(N, C, H, W)``.
    """
    n, _, height, width = images.shape
    device = images.device
    out = images
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
        mode = "reflect" if padding_mode == "reflect" else "constant"
        padded = F.pad(images, (padding, padding, padding, padding), mode=mode)
        rows = (offsets[:, :1] + torch.arange(height)).to(device)  # (N, H)
        cols = (offsets[:, 1:] + torch.arange(width)).to(device)  # (N, W)
        batch = torch.arange(n, device=device)[:, None, None]
        # Advanced indices around a slice put their broadcast shape first: (N, H, W, C).
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(device).view(n, 1, 1, 1)
        out = torch.where(flips, out.flip(3), out)
    return out.contiguous()


@torch.no_grad()
def evaluate_accuracy(
    model: torch.nn.Module,
    data: ImageSet,
    batch_size: int = 500,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 accuracy of ``model`` (in eval mode) over every image of ``data``."""
    if len(data) == 0:
        raise UsageError("no images to evaluate")
    was_training = model.training
    model.eval()
    device = device if device is not None else next(model.parameters()).device
    correct = 0
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, disable=not progress, desc="test", unit="batch"):
        chunk = slice(start, start + batch_size)
        images = data.images[chunk].to(device).float().div_(255)
        labels = data.labels[chunk].to(device)
        correct += int((model(images).argmax(1) == labels).sum())
    model.train(was_training)
    return {"accuracy": correct / len(data), "correct": correct, "images": len(data)}


@contextmanager
def deferred_interrupts() -> Iterator[dict[str, bool]]:
    """Turn the first Ctrl-C / SIGTERM into a flag (``state["stop"]``) checked between
    iterations, so the checkpoint never holds a half-applied optimizer step; a second one
    interrupts at once."""
    state = {"stop": False}

    def handler(signum: int, frame: object) -> None:  # noqa: ARG001
        if state["stop"]:
            raise KeyboardInterrupt
        state["stop"] = True

    previous: dict[int, Any] = {}
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


def _training_sets(config: ClassifierTrainConfig) -> tuple[ImageSet, ImageSet]:
    train_set = load_dataset(config.dataset, "train", config.data_dir).head(config.limit_train)
    if config.limit_train is not None and len(train_set) < config.limit_train:
        raise UsageError(
            f"--limit-train {config.limit_train}: {config.dataset} has only {len(train_set)} "
            "training images"
        )
    test_set = load_dataset(config.dataset, "test", config.data_dir)
    return train_set, test_set


def train_classifier(
    config: ClassifierTrainConfig, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) a classifier run; returns the summary written to ``summary.json``.

    Ctrl-C or SIGTERM saves a checkpoint at the last finished iteration and raises
    ``KeyboardInterrupt``; ``resume=True`` continues exactly from it. The final model is written
    to ``OUT/model.safetensors`` (kind ``classifier``) with its test accuracy in ``metrics``.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    train_set, test_set = _training_sets(config)
    final_test_set = test_set.head(config.limit_test)
    epoch_test_set = test_set.head(config.eval_images) if config.eval_images else None
    run = RunDirectory(config.out, resume, config.resume_dict())

    assert config.arch is not None  # filled in by __post_init__
    model_config = ClassifierConfig(
        arch=config.arch, dataset=config.dataset, num_classes=DATASETS[config.dataset].num_classes
    )
    torch.manual_seed(config.seed)  # weight initialisation
    model = classifier_from_config(model_config).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )
    start = 0
    if resume:
        start = int(run.load(model, optimizer)["iteration"])
        run.log({"event": "resume", "iteration": start, "env": environment()})
    else:
        run.log(
            {"event": "start", "iteration": 0, "config": config.to_dict(), "env": environment()}
        )
    batches = LabelledBatches(train_set, config.batch_size, config.seed, device)
    steps = batches.steps_per_epoch
    total = config.epochs * steps
    warmup = round(config.warmup_epochs * steps)

    model.train()
    iteration = start
    zero = torch.zeros((), device=device)
    window = {"loss": zero.clone(), "correct": zero.clone(), "count": 0}
    epoch_stats = {"loss": zero.clone(), "correct": zero.clone(), "count": 0}
    last_epoch_eval: dict[str, Any] = {}
    bar = tqdm(total=total, initial=start, disable=not progress, desc="train", unit="it")
    started, images_seen = time.perf_counter(), 0
    try:
        with deferred_interrupts() as interrupts:
            while iteration < total:
                if interrupts["stop"]:
                    raise KeyboardInterrupt
                epoch, step = divmod(iteration, steps)
                lr = classifier_learning_rate(
                    config.lr_schedule, config.lr, iteration, total, warmup
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                raw, labels = batches(iteration)
                x = raw.float().div_(255)
                if config.augment:
                    x = augment_batch(
                        x,
                        iteration_generator(config.seed, iteration, stream=_AUGMENT_STREAM),
                        int(config.crop_padding or 0),
                        config.padding_mode,
                        config.flip,
                    )
                # Dropout draws from the global generators: seed them per iteration.
                dropout_seed = iteration_generator(config.seed, iteration, stream=_DROPOUT_STREAM)
                torch.manual_seed(dropout_seed.initial_seed())
                logits = model(x)
                loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                iteration += 1
                images_seen += x.shape[0]
                with torch.no_grad():
                    batch_loss = loss.detach() * x.shape[0]
                    batch_correct = (logits.argmax(1) == labels).sum()
                for stats in (window, epoch_stats):
                    stats["loss"] += batch_loss
                    stats["correct"] += batch_correct
                    stats["count"] += x.shape[0]
                epoch_done = step == steps - 1
                if iteration % LOG_EVERY == 0 or epoch_done:
                    count = max(int(window["count"]), 1)
                    record = {
                        "iteration": iteration,
                        "epoch": epoch + 1,
                        "lr": lr,
                        "loss": float(window["loss"]) / count,
                        "train_accuracy": float(window["correct"]) / count,
                    }
                    run.log(record)
                    rate = images_seen / max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(
                        epoch=epoch + 1,
                        loss=f"{record['loss']:.3f}",
                        acc=f"{record['train_accuracy']:.3f}",
                        img_s=f"{rate:.0f}",
                        refresh=False,
                    )
                    window = {"loss": zero.clone(), "correct": zero.clone(), "count": 0}
                if epoch_done:
                    count = max(int(epoch_stats["count"]), 1)
                    record = {
                        "event": "epoch",
                        "iteration": iteration,
                        "epoch": epoch + 1,
                        "train_loss": float(epoch_stats["loss"]) / count,
                        "train_accuracy": float(epoch_stats["correct"]) / count,
                        "train_images_this_session": count,
                    }
                    if epoch_test_set is not None:
                        last_epoch_eval = evaluate_accuracy(model, epoch_test_set, device=device)
                        record["test_accuracy"] = last_epoch_eval["accuracy"]
                        record["test_images"] = last_epoch_eval["images"]
                        bar.write(
                            f"epoch {epoch + 1}/{config.epochs}: train acc "
                            f"{record['train_accuracy']:.4f}, test acc "
                            f"{record['test_accuracy']:.4f} ({record['test_images']} images)"
                        )
                    run.log(record)
                    epoch_stats = {"loss": zero.clone(), "correct": zero.clone(), "count": 0}
                if iteration % config.checkpoint_every == 0 or epoch_done:
                    run.save(model, optimizer, iteration)
                bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        run.save_interrupted(model, optimizer, iteration)
        raise
    bar.close()
    session_seconds = time.perf_counter() - started

    final = evaluate_accuracy(model, final_test_set, device=device, progress=progress)
    metrics = {
        "test_accuracy": final["accuracy"],
        "test_correct": final["correct"],
        "test_images": final["images"],
    }
    run.save(model, optimizer, iteration, extra={"metrics": metrics})
    model_path = run.path / "model.safetensors"
    training = {"config": config.to_dict(), "iterations": iteration, "epochs": config.epochs}
    save_classifier(
        model.eval(), model_path, model_config, extra={"metrics": metrics, "training": training}
    )
    summary = {
        "config": config.to_dict(),
        "arch": config.arch,
        "parameters": count_parameters(model),
        "iterations": iteration,
        "iterations_per_epoch": steps,
        "train_images": len(train_set),
        **metrics,
        "last_epoch_eval": last_epoch_eval,
        "model": str(model_path),
        "env": environment(),
        "device": str(device),
        "images_per_second_this_session": images_seen / max(session_seconds, 1e-9),
    }
    run.log({"event": "done", "iteration": iteration, **metrics})
    run.write_summary(summary)
    return summary


__all__ = [
    "CLASSIFIER_SCHEDULES",
    "DEFAULT_ARCH",
    "ClassifierTrainConfig",
    "LabelledBatches",
    "augment_batch",
    "classifier_learning_rate",
    "evaluate_accuracy",
    "train_classifier",
]
