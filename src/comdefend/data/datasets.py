"""Labelled image datasets held in memory as uint8 NCHW tensors.

Supported: Fashion-MNIST (IDX files, gzipped or not), CIFAR-10 and CIFAR-100 (the python-pickle
batch folders), and image folders with one subfolder per class (ImageNet style). Where a dataset
is looked for: ``--data-dir`` if given, else ``$COMDEFEND_DATA``, else the default locations
listed in :data:`DATASETS`. Nothing is downloaded unless ``comdefend download`` is asked to.

Each dataset is described once by a :class:`DatasetSpec` (channels, classes, size, class names,
normalisation, splits, where its files are looked for, its loader) in the :data:`DATASETS`
registry; :func:`register_dataset` adds one (e.g. ImageNet, or a user's own dataset).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from comdefend.data.imagenet import (
    DEFAULT_IMAGE_SIZE,
    IMAGENET_CLASSES,
    ImageNetLoader,
    is_imagenet_folder,
)
from comdefend.errors import DatasetNotFoundError, InputError, UsageError
from comdefend.registry import Registry

ENV_VAR = "COMDEFEND_DATA"
SPLITS = ("train", "test", "sample")  # sample: embedded 1,000 test images


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over named tensors (names, dtypes, shapes and bytes, in name order): the checksum
    of what a cache or progress file holds, or depends on.

    Example:
        >>> a = tensors_sha256({"x": torch.zeros(2)})
        >>> a == tensors_sha256({"x": torch.zeros(2)}), a == tensors_sha256({"x": torch.ones(2)})
        (True, False)
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():  # the bytes themselves, without a copy
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


@dataclass
class ImageSet:
    """Images ``(N, C, H, W)`` uint8, labels ``(N,)`` int64, and where they came from."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str
    indices: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Every loader's images are dense NCHW: a strided view (an HWC array transposed) would
        # travel into attacks, purifiers and saved records in that layout.
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def identity(self) -> dict[str, object]:
        """What a result computed from these images depends on: their count and shape, and the
        sha256 of their pixels and of their labels (:func:`tensors_sha256`). Not where they
        lie: the same images in a moved folder have the same identity, a changed one another.

        Example:
            >>> images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
            >>> data = ImageSet("tiny", "test", images, torch.tensor([0, 1]), ["a", "b"], "here")
            >>> identity = data.identity()
            >>> identity["images"], identity["image_shape"], len(identity["pixels_sha256"])
            (2, [1, 4, 4], 64)
        """
        return {
            "images": len(self),
            "image_shape": list(self.images.shape[1:]),
            "pixels_sha256": tensors_sha256({"images": self.images}),
            "labels_sha256": tensors_sha256({"labels": self.labels.to(torch.int64)}),
        }

    def float_images(
        self, index: slice | torch.Tensor | Sequence[int] = slice(None)
    ) -> torch.Tensor:
        """The selected images as float32 in [0, 1]."""
        return self.images[index].float().div_(255)

    def subset(self, index: torch.Tensor | Sequence[int]) -> ImageSet:
        index = torch.as_tensor(index, dtype=torch.long)
        base = self.indices if self.indices is not None else torch.arange(len(self))
        return ImageSet(
            self.name,
            self.split,
            self.images[index],
            self.labels[index],
            self.classes,
            self.source,
            base[index],
        )

    def head(self, n: int | None) -> ImageSet:
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise UsageError(f"n must be >= 1, got {n}")
        return self.subset(torch.arange(n))


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise InputError(f"{path} is truncated: {len(raw) - offset} of {expected} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_root_ok(folder: Path) -> bool:
    return _find_file(folder, "t10k-images-idx3-ubyte") is not None


def _load_fashion(folder: Path, split: str) -> ImageSet:
    prefix = "train" if split == "train" else "t10k"
    images_file = _find_file(folder, f"{prefix}-images-idx3-ubyte")
    labels_file = _find_file(folder, f"{prefix}-labels-idx1-ubyte")
    if images_file is None or labels_file is None:
        raise DatasetNotFoundError(f"{folder} lacks the Fashion-MNIST {split} IDX files")
    images = torch.from_numpy(_read_idx(images_file).copy()).unsqueeze(1)
    labels = torch.from_numpy(_read_idx(labels_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return ImageSet("fashion-mnist", split, images, labels, FASHION_CLASSES, str(folder))


def _unpickle_batch(path: Path) -> dict:
    # CIFAR batches are pickles of plain dicts, lists and NumPy arrays: allow exactly that.
    class Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module.startswith(("numpy.core", "numpy._core", "numpy")) and name in {
                "_reconstruct",
                "ndarray",
                "dtype",
                "scalar",
            }:
                return super().find_class(module, name)
            raise InputError(f"{path}: refusing to unpickle {module}.{name}")

    with path.open("rb") as handle:
        try:
            batch = Restricted(handle, encoding="bytes").load()
        except InputError:
            raise
        except Exception as error:
            raise InputError(f"{path} is not a readable CIFAR batch: {error}") from error
    # Keys are str in re-pickled copies and bytes in the original release: accept both.
    return {
        (key.decode() if isinstance(key, bytes) else key): value for key, value in batch.items()
    }


def _as_str_list(values: Sequence) -> list[str]:
    return [value.decode() if isinstance(value, bytes) else str(value) for value in values]


def _cifar_batches(folder: Path, split: str, hundred: bool) -> list[Path]:
    if hundred:
        return [folder / ("train" if split == "train" else "test")]
    if split == "train":
        return [folder / f"data_batch_{i}" for i in range(1, 6)]
    return [folder / "test_batch"]


def _load_cifar(folder: Path, split: str, hundred: bool) -> ImageSet:
    data, labels = [], []
    for path in _cifar_batches(folder, split, hundred):
        if not path.is_file():
            raise DatasetNotFoundError(f"{folder} lacks the CIFAR batch {path.name}")
        batch = _unpickle_batch(path)
        data.append(np.asarray(batch["data"], dtype=np.uint8))
        labels.extend(batch["fine_labels" if hundred else "labels"])
    array = np.concatenate(data).reshape(-1, 3, 32, 32)
    meta_name = "meta" if hundred else "batches.meta"
    classes: list[str] = [] if hundred else list(CIFAR10_CLASSES)
    if (folder / meta_name).is_file():
        meta = _unpickle_batch(folder / meta_name)
        classes = _as_str_list(meta["fine_label_names" if hundred else "label_names"])
    return ImageSet(
        "cifar100" if hundred else "cifar10",
        split,
        torch.from_numpy(array.copy()),
        torch.tensor(labels, dtype=torch.long),
        classes,
        str(folder),
    )


def _load_folder(folder: Path, split: str) -> ImageSet:
    from comdefend.data.images import IMAGE_SUFFIXES, read_image

    root = folder / split if (folder / split).is_dir() else folder
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir())
    if not class_dirs:
        raise DatasetNotFoundError(f"{root} has no class subfolders")
    images, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        for file in sorted(class_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                images.append(read_image(file, channels=3))
                labels.append(label)
    if not images:
        raise DatasetNotFoundError(f"{root} holds no images")
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) != 1:
        raise InputError(
            f"{root}: images of different sizes {sorted(sizes)[:3]}...; "
            "use ImageFolderPatches to train on random patches of them"
        )
    stacked = (torch.stack(images) * 255).round().to(torch.uint8)
    return ImageSet(
        "folder", split, stacked, torch.tensor(labels), [d.name for d in class_dirs], str(root)
    )


DatasetLoader = Callable[[Path, str], ImageSet]

#: Per-channel statistics of ImageNet's training images, the normalisation torchvision's
#: pretrained ImageNet weights expect.
IMAGENET_MEAN: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, ...] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """Every fact about one dataset, declared once and registered in :data:`DATASETS`.

    Training, evaluation, the classifier checks and the CLI read these facts from here; nothing
    else hard-codes a dataset's channels, classes, size or normalisation.

    Attributes:
        name: registry name (``--dataset NAME``).
        channels: image channels (1 grayscale, 3 RGB).
        num_classes: number of labels.
        image_size: side of the (square) images, or ``None`` when sizes vary.
        loader: ``loader(folder, split) -> ImageSet`` reads one split from a folder that
            ``is_present`` accepted.
        is_present: ``is_present(folder)`` tells whether ``folder`` holds the dataset.
        class_names: label names in label order; empty means "read from the dataset's files".
        mean, std: per-channel statistics of the training images, the default normalisation
            inside classifiers trained on it (``None`` when unknown).
        splits: the splits ``load_dataset`` accepts (``sample``: embedded test images).
        subfolders: where below each search root the files may lie (``""``: the root itself).
        defaults: search roots used without ``--data-dir`` / ``$COMDEFEND_DATA``.
        how_to_get: one sentence for the "not found" error.
    """

    name: str
    channels: int
    num_classes: int
    image_size: int | None
    loader: DatasetLoader = field(repr=False, compare=False)
    is_present: Callable[[Path], bool] = field(repr=False, compare=False)
    class_names: tuple[str, ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    splits: tuple[str, ...] = ("train", "test")
    subfolders: tuple[str, ...] = ("",)
    defaults: tuple[str, ...] = ("data", "~/.cache/comdefend/data")
    how_to_get: str = "point --data-dir or $COMDEFEND_DATA at a folder holding it"

    def __post_init__(self) -> None:
        if self.channels < 1 or self.num_classes < 2:
            raise UsageError(
                f"dataset {self.name}: channels must be >= 1 and num_classes >= 2, got "
                f"{self.channels} and {self.num_classes}"
            )
        if self.image_size is not None and self.image_size < 1:
            raise UsageError(f"dataset {self.name}: image_size must be >= 1 or None")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise UsageError(
                f"dataset {self.name}: {len(self.class_names)} class names for "
                f"{self.num_classes} classes"
            )
        if (self.mean is None) != (self.std is None):
            raise UsageError(f"dataset {self.name}: give both mean and std, or neither")
        if self.mean is not None and self.std is not None:
            if not len(self.mean) == len(self.std) == self.channels:
                raise UsageError(
                    f"dataset {self.name}: mean and std need {self.channels} value(s) each"
                )
            if any(value <= 0 for value in self.std):
                raise UsageError(f"dataset {self.name}: std values must be > 0")
        unknown = set(self.splits) - set(SPLITS)
        if unknown:
            raise UsageError(
                f"dataset {self.name}: unknown splits {sorted(unknown)}; valid: {', '.join(SPLITS)}"
            )

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """``(mean, std)``, or ``None`` when the dataset declares none."""
        if self.mean is None or self.std is None:
            return None
        return self.mean, self.std

    def summary(self) -> dict[str, object]:
        """The JSON-serialisable facts (no functions), e.g. for reports."""
        return {
            "name": self.name,
            "channels": self.channels,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "class_names": list(self.class_names),
            "mean": list(self.mean) if self.mean is not None else None,
            "std": list(self.std) if self.std is not None else None,
            "splits": list(self.splits),
        }


#: Every dataset ``load_dataset`` knows. Add one with :func:`register_dataset`.
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(
    spec: DatasetSpec, *, aliases: tuple[str, ...] = (), replace: bool = False
) -> DatasetSpec:
    """Make ``spec`` loadable by name everywhere (``load_dataset``, ``--dataset``, checks).

    Args:
        spec: the dataset's facts and its ``loader(folder, split)``.
        aliases: other accepted names.
        replace: allow replacing an already registered dataset of the same name.

    Example:
        >>> def load_tiny(folder, split):
        ...     images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
        ...     labels = torch.tensor([0, 1, 0, 1])
        ...     return ImageSet("tiny", split, images, labels, ["a", "b"], str(folder))
        >>> spec = register_dataset(DatasetSpec(
        ...     "tiny", channels=1, num_classes=2, image_size=8, loader=load_tiny,
        ...     is_present=lambda folder: True, class_names=("a", "b")))
        >>> len(load_dataset("tiny", "test", data_dir="."))
        4
        >>> DATASETS.remove("tiny")
    """
    return DATASETS.add(spec.name, spec, aliases=aliases, replace=replace)


def get_dataset(name: str) -> DatasetSpec:
    """The description of dataset ``name``; a :class:`UsageError` lists the valid names."""
    return DATASETS.get(name)


def _cifar_present(marker: str) -> Callable[[Path], bool]:
    return lambda folder: (folder / marker).is_file()


register_dataset(
    DatasetSpec(
        "fashion-mnist",
        channels=1,
        num_classes=10,
        image_size=28,
        loader=_load_fashion,
        is_present=_fashion_root_ok,
        class_names=tuple(FASHION_CLASSES),
        mean=(0.2860,),
        std=(0.3530,),
        splits=("train", "test", "sample"),
        subfolders=("", "fashion-mnist", "FashionMNIST/raw"),
        defaults=("/usr/share/datasets/fashion-mnist", "data", "~/.cache/comdefend/data"),
        how_to_get="install the Debian package 'dataset-fashion-mnist' (apt-get install "
        "dataset-fashion-mnist) or run 'comdefend download fashion-mnist --data-dir DIR'",
    )
)
register_dataset(
    DatasetSpec(
        "cifar10",
        channels=3,
        num_classes=10,
        image_size=32,
        loader=lambda folder, split: _load_cifar(folder, split, hundred=False),
        is_present=_cifar_present("test_batch"),
        class_names=CIFAR10_CLASSES,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        splits=("train", "test", "sample"),
        subfolders=("cifar-10-batches-py", "cifar10/cifar-10-batches-py", ""),
        how_to_get="run 'comdefend download cifar10 --data-dir DIR' (needs internet) or point "
        "--data-dir / $COMDEFEND_DATA at a folder holding cifar-10-batches-py/",
    )
)
register_dataset(
    DatasetSpec(
        "cifar100",
        channels=3,
        num_classes=100,
        image_size=32,
        loader=lambda folder, split: _load_cifar(folder, split, hundred=True),
        is_present=_cifar_present("test"),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        subfolders=("cifar-100-python", "cifar100/cifar-100-python", ""),
        how_to_get="run 'comdefend download cifar100 --data-dir DIR' (needs internet) or point "
        "--data-dir / $COMDEFEND_DATA at a folder holding cifar-100-python/",
    )
)

register_dataset(
    DatasetSpec(
        "imagenet",
        channels=3,
        num_classes=1000,
        image_size=DEFAULT_IMAGE_SIZE,  # the center crop; load_dataset(image_size=...) changes it
        loader=ImageNetLoader(),
        is_present=is_imagenet_folder,
        class_names=IMAGENET_CLASSES,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        subfolders=("", "imagenet-sample", "imagenet"),
        how_to_get="point --data-dir / $COMDEFEND_DATA at an ImageNet folder: labels.csv with "
        "images/ (like the project's 1,000-image sample) or one folder per WordNet id "
        "(n01440764/, ...; ILSVRC-2012 validation images, not downloadable here)",
    )
)


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding dataset ``name``; a clear error lists every place looked at."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, or a folder")
    spec = DATASETS.get(name)
    if data_dir is not None:
        roots = [Path(data_dir)]
    elif os.environ.get(ENV_VAR):
        roots = [Path(os.environ[ENV_VAR])]
    else:
        roots = [Path(default).expanduser() for default in spec.defaults]
    looked = []
    for root in roots:
        for sub in spec.subfolders:
            folder = root / sub if sub else root
            looked.append(str(folder))
            if spec.is_present(folder):
                return folder
    raise DatasetNotFoundError(
        f"dataset {spec.name} not found; looked in: {', '.join(looked)}. "
        f"To get it: {spec.how_to_get}"
    )


def load_dataset(
    name: str,
    split: str = "test",
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
    max_images: int | None = None,
) -> ImageSet:
    """Load a registered dataset (see :data:`DATASETS`, e.g. ``fashion-mnist``, ``cifar10``,
    ``cifar100``, ``imagenet``) or ``folder`` into memory.

    ``image_size`` changes the crop of datasets that are cropped on loading (``imagenet``:
    center crop, default 224); for the others it must be their size or ``None``.

    ``max_images`` keeps the first images only; datasets decoded image by image (``imagenet``)
    then decode no others, so ``--n 2`` on a folder of 50,000 JPEGs reads two.

    ``split="sample"`` gives the 1,000 class-balanced test images embedded in the package
    (Fashion-MNIST and CIFAR-10 only), so that no dataset needs to be installed.

    For ``folder``, ``data_dir`` is a folder of class subfolders (or of ``train``/``test`` each
    holding class subfolders) of equally sized images.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if name == "folder":
        if split == "sample":
            raise UsageError("an image folder has no embedded sample; use --split test or train")
        if data_dir is None or not Path(data_dir).is_dir():
            raise DatasetNotFoundError(f"--data-dir must name an image folder, got {data_dir}")
        return _load_folder(Path(data_dir), split)
    spec = get_dataset(name)
    if split == "sample":
        from comdefend.data.samples import load_sample

        return load_sample(spec.name)  # DatasetNotFoundError naming the datasets with one
    if split not in spec.splits:
        raise UsageError(
            f"dataset {spec.name} has no {split!r} split; valid: {', '.join(spec.splits)}"
        )
    loader = spec.loader
    if image_size is not None and image_size != spec.image_size:
        resized = getattr(loader, "with_image_size", None)
        if resized is None:
            raise UsageError(
                f"dataset {spec.name} has {spec.image_size}x{spec.image_size} images; "
                "--image-size only changes the crop of datasets cropped on loading (imagenet)"
            )
        loader = resized(image_size)
    if max_images is not None:
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise UsageError(f"max_images must be an integer >= 1, got {max_images!r}")
        limited = getattr(loader, "with_max_images", None)
        if limited is not None:
            loader = limited(max_images)
        return loader(find_dataset(spec.name, data_dir), split).head(max_images)
    return loader(find_dataset(spec.name, data_dir), split)


def class_balanced_indices(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """``per_class`` indices of every class, drawn without replacement with ``seed``, sorted."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        if members.numel() < per_class:
            raise UsageError(f"class {label} has {members.numel()} images, {per_class} needed")
        order = torch.randperm(members.numel(), generator=generator)[:per_class]
        chosen.append(members[order])
    return torch.sort(torch.cat(chosen)).values
