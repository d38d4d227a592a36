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

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch.nn import functional as F  # noqa: N812 - the usual alias

from comdefend.console import progress_bar
from comdefend.data.datasets import DATASETS, ImageSet, load_dataset
from comdefend.errors import UsageError
from comdefend.models.classifiers import (
    Classifier,
    ClassifierConfig,
    check_classifier_fits,
    classifier_from_config,
    count_parameters,
    save_classifier,
)
from comdefend.training.batches import iteration_generator
from comdefend.training.engine import Processes, TrainingTask, run_training
from comdefend.training.run import RunDirectory
from comdefend.training.schedules import CLASSIFIER_SCHEDULES, classifier_learning_rate

PADDING_MODES = ("reflect", "zeros")
DEFAULT_ARCH = {"fashion-mnist": "fashion-cnn", "cifar10": "resnet20", "cifar100": "resnet20"}
# Settings a checkpoint does not record: they do not touch the weights (evaluation sizes,
# checkpoint interval) or are properties of the machine.
_UNRECORDED = ("threads", "device", "eval_images", "limit_test", "checkpoint_every")
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

    :data:`RESUMABLE_CHANGES` names the settings that may change on ``--resume``.
    """

    #: Settings that may change between an interrupted run and its ``--resume``: those a
    #: checkpoint does not record, and where the run folder lies.
    RESUMABLE_CHANGES: ClassVar[frozenset[str]] = frozenset({*_UNRECORDED, "out"})

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
        """The settings a checkpoint records: all but the machine's, the evaluation sizes and
        the checkpoint interval (:data:`RESUMABLE_CHANGES` says what may change)."""
        return {k: v for k, v in self.to_dict().items() if k not in _UNRECORDED}


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
    for start in progress_bar(starts, enabled=progress, desc="test", unit="batch"):
        chunk = slice(start, start + batch_size)
        images = data.images[chunk].to(device).float().div_(255)
        labels = data.labels[chunk].to(device)
        correct += int((model(images).argmax(1) == labels).sum())
    model.train(was_training)
    return {"accuracy": correct / len(data), "correct": correct, "images": len(data)}


def _training_sets(config: ClassifierTrainConfig) -> tuple[ImageSet, ImageSet]:
    train_set = load_dataset(config.dataset, "train", config.data_dir).head(config.limit_train)
    if config.limit_train is not None and len(train_set) < config.limit_train:
        raise UsageError(
            f"--limit-train {config.limit_train}: {config.dataset} has only {len(train_set)} "
            "training images"
        )
    test_set = load_dataset(config.dataset, "test", config.data_dir)
    return train_set, test_set


class ClassifierTask(TrainingTask):
    """The ``classifier`` task: cross-entropy with the configured augmentation, SGD."""

    kind = "classifier"
    model: Classifier

    def __init__(self, config: ClassifierTrainConfig) -> None:
        super().__init__(config)
        self.config: ClassifierTrainConfig = config
        self.last_epoch_eval: dict[str, Any] = {}
        self._epoch: dict[str, float] = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        self.progress = True
        self.is_main = True

    def resume_config(self) -> dict[str, Any]:
        return self.config.resume_dict()

    def setup(self, device: torch.device, processes: Processes) -> None:
        config = self.config
        self.device = device
        self.is_main = processes.is_main
        self.train_set, test_set = _training_sets(config)
        self.final_test_set = test_set.head(config.limit_test)
        self.epoch_test_set = test_set.head(config.eval_images) if config.eval_images else None
        assert config.arch is not None  # filled in by __post_init__
        self.model_config = ClassifierConfig(
            arch=config.arch,
            dataset=config.dataset,
            num_classes=DATASETS[config.dataset].num_classes,
        )
        torch.manual_seed(config.seed)  # weight initialisation
        self.model = classifier_from_config(self.model_config).to(device)
        self.batches = LabelledBatches(self.train_set, config.batch_size, config.seed, device)
        self.steps = self.batches.steps_per_epoch
        self.total_iterations = config.epochs * self.steps
        self.warmup = round(config.warmup_epochs * self.steps)

    def build_optimizer(self, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        config = self.config
        return torch.optim.SGD(
            parameters,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )

    def learning_rate(self, iteration: int) -> float:
        config = self.config
        return classifier_learning_rate(
            config.lr_schedule, config.lr, iteration, self.total_iterations, self.warmup
        )

    def compute_loss(
        self, module: torch.nn.Module, iteration: int, share: slice
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = self.config
        raw, labels = self.batches(iteration)
        x = raw.float().div_(255)
        if config.augment:
            x = augment_batch(
                x,
                iteration_generator(config.seed, iteration, stream=_AUGMENT_STREAM),
                int(config.crop_padding or 0),
                config.padding_mode,
                config.flip,
            )
        x, labels = x[share], labels[share]
        # Dropout draws from the global generators: seed them per iteration.
        dropout_seed = iteration_generator(config.seed, iteration, stream=_DROPOUT_STREAM)
        torch.manual_seed(dropout_seed.initial_seed())
        logits = module(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"loss": loss, "train_accuracy": accuracy}

    def after_step(self, iteration: int, metrics: dict[str, float]) -> list[dict[str, Any]]:
        count = float(self.config.batch_size)
        self._epoch["loss"] += metrics["loss"] * count
        self._epoch["correct"] += metrics["train_accuracy"] * count
        self._epoch["count"] += count
        if iteration % self.steps:
            return []
        epoch = iteration // self.steps
        seen = max(self._epoch["count"], 1.0)
        record: dict[str, Any] = {
            "event": "epoch",
            "iteration": iteration,
            "epoch": epoch,
            "train_loss": self._epoch["loss"] / seen,
            "train_accuracy": self._epoch["correct"] / seen,
            "train_images_this_session": int(self._epoch["count"]),
        }
        self._epoch = {"loss": 0.0, "correct": 0.0, "count": 0.0}
        if self.epoch_test_set is not None and self.is_main:
            self.last_epoch_eval = evaluate_accuracy(self.model, self.epoch_test_set)
            record["test_accuracy"] = self.last_epoch_eval["accuracy"]
            record["test_images"] = self.last_epoch_eval["images"]
            record["message"] = (
                f"epoch {epoch}/{self.config.epochs}: train acc {record['train_accuracy']:.4f}, "
                f"test acc {record['test_accuracy']:.4f} ({record['test_images']} images)"
            )
        return [record]

    def checkpoint_due(self, iteration: int) -> bool:
        return iteration % self.config.checkpoint_every == 0 or iteration % self.steps == 0

    def evaluate(self, iteration: int) -> dict[str, Any]:
        return {}  # the per-epoch test accuracy is part of the epoch record (after_step)

    def describe_progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.3f}", "acc": f"{metrics['train_accuracy']:.3f}"}

    def finish(self, run: RunDirectory, iteration: int, state: dict[str, Any]) -> dict[str, Any]:
        config = self.config
        final = evaluate_accuracy(self.model, self.final_test_set, progress=self.progress)
        metrics = {
            "test_accuracy": final["accuracy"],
            "test_correct": final["correct"],
            "test_images": final["images"],
        }
        run.save(self.model, state["optimizer"], iteration, extra={"metrics": metrics})
        model_path = run.path / "model.safetensors"
        training = {"config": config.to_dict(), "iterations": iteration, "epochs": config.epochs}
        save_classifier(
            self.model.eval(),
            model_path,
            self.model_config,
            extra={"metrics": metrics, "training": training},
        )
        run.log({"event": "done", "iteration": iteration, **metrics})
        return {
            "arch": config.arch,
            "parameters": count_parameters(self.model),
            "iterations_per_epoch": self.steps,
            "train_images": len(self.train_set),
            **metrics,
            "last_epoch_eval": self.last_epoch_eval,
            "model": str(model_path),
        }


def train_classifier(
    config: ClassifierTrainConfig, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) a classifier run; returns the summary written to ``summary.json``.

    Ctrl-C or SIGTERM finishes the current iteration, saves a checkpoint and raises
    :class:`~comdefend.training.engine.TrainingInterrupted` (a ``KeyboardInterrupt``);
    ``resume=True`` continues exactly from it. The final model is written to
    ``OUT/model.safetensors`` (kind ``classifier``) with its test accuracy in ``metrics``.
    Started by ``torchrun`` with several processes, the run is data-parallel.
    """
    task = ClassifierTask(config)
    task.progress = progress
    return run_training(task, resume=resume, progress=progress)


__all__ = [
    "CLASSIFIER_SCHEDULES",
    "ClassifierTask",
    "DEFAULT_ARCH",
    "ClassifierTrainConfig",
    "LabelledBatches",
    "augment_batch",
    "classifier_learning_rate",
    "evaluate_accuracy",
    "train_classifier",
]
