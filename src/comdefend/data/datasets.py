"""Labelled image datasets held in memory as uint8 NCHW tensors.

Supported: Fashion-MNIST (IDX files, gzipped or not), CIFAR-10 and CIFAR-100 (the python-pickle
batch folders), and image folders with one subfolder per class (ImageNet style). Where a dataset
is looked for: ``--data-dir`` if given, else ``$COMDEFEND_DATA``, else the default locations
listed in :data:`DATASETS`. Nothing is downloaded unless ``comdefend download`` is asked to.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from comdefend.errors import DatasetNotFoundError, InputError, UsageError

ENV_VAR = "COMDEFEND_DATA"
SPLITS = ("train", "test", "sample")  # sample: embedded 1,000 test images


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

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

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
        def find_class(self, module: str, name: str):  # type: ignore[override]
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
    classes: list[str] = []
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


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    num_classes: int
    subfolders: tuple[str, ...]
    defaults: tuple[str, ...]
    how_to_get: str


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        1,
        10,
        ("", "fashion-mnist", "FashionMNIST/raw"),
        ("/usr/share/datasets/fashion-mnist", "data", "~/.cache/comdefend/data"),
        "install the Debian package 'dataset-fashion-mnist' (apt-get install "
        "dataset-fashion-mnist) or run 'comdefend download fashion-mnist --data-dir DIR'",
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        3,
        10,
        ("cifar-10-batches-py", "cifar10/cifar-10-batches-py", ""),
        ("data", "~/.cache/comdefend/data"),
        "run 'comdefend download cifar10 --data-dir DIR' (needs internet) or point "
        "--data-dir / $COMDEFEND_DATA at a folder holding cifar-10-batches-py/",
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        3,
        100,
        ("cifar-100-python", "cifar100/cifar-100-python", ""),
        ("data", "~/.cache/comdefend/data"),
        "run 'comdefend download cifar100 --data-dir DIR' (needs internet) or point "
        "--data-dir / $COMDEFEND_DATA at a folder holding cifar-100-python/",
    ),
}


def _is_dataset_folder(name: str, folder: Path) -> bool:
    if name == "fashion-mnist":
        return _fashion_root_ok(folder)
    marker = "test_batch" if name == "cifar10" else "test"
    return (folder / marker).is_file()


def find_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding dataset ``name``; a clear error lists every place looked at."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}, or a folder")
    spec = DATASETS[name]
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
            if _is_dataset_folder(name, folder):
                return folder
    raise DatasetNotFoundError(
        f"dataset {name} not found; looked in: {', '.join(looked)}. To get it: {spec.how_to_get}"
    )


def load_dataset(
    name: str, split: str = "test", data_dir: str | os.PathLike | None = None
) -> ImageSet:
    """Load ``name`` (``fashion-mnist``, ``cifar10``, ``cifar100`` or ``folder``) into memory.

    ``split="sample"`` gives the 1,000 class-balanced test images embedded in the package
    (Fashion-MNIST and CIFAR-10 only), so that no dataset needs to be installed.

    For ``folder``, ``data_dir`` is a folder of class subfolders (or of ``train``/``test`` each
    holding class subfolders) of equally sized images.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if split == "sample":
        from comdefend.data.samples import load_sample

        return load_sample(name)
    if name == "folder":
        if data_dir is None or not Path(data_dir).is_dir():
            raise DatasetNotFoundError(f"--data-dir must name an image folder, got {data_dir}")
        return _load_folder(Path(data_dir), split)
    folder = find_dataset(name, data_dir)
    if name == "fashion-mnist":
        return _load_fashion(folder, split)
    return _load_cifar(folder, split, hundred=name == "cifar100")


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
