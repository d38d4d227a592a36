"""ImageNet-1k images for evaluation: the sample layout and the usual validation layout.

Two folder layouts are read:

* **labels.csv layout** (the project's 1,000-image sample): ``labels.csv`` with the columns
  ``file,label,wnid,name`` beside an ``images/`` folder holding the files it names.
* **class-folder layout** (ImageNet's validation set as usually prepared, e.g. for torchvision's
  ``ImageFolder``): one subfolder per WordNet id (``n01440764/``, ...), directly in the folder or
  in its ``val/`` (test split) or ``train/`` (train split) subfolder.

Labels are the standard ImageNet-1k class indices: the 1,000 WordNet ids in sorted order
(``n01440764`` = 0 ... ``n15075141`` = 999, the order torchvision, Keras and timm use), listed
with their names in ``imagenet_classes.tsv`` beside this module. A class folder that holds only
some classes keeps each class's standard index.

The evaluation transform: the shorter side is resized to ``resize_size`` (default
``round(image_size / 0.875)``, i.e. 256 for 224; PIL bicubic, skipped when it already has that
size, so the sample's 256x256 images are only cropped), then the image is center-cropped to
``image_size`` x ``image_size`` (default 224).

Bad input, and what happens (each tested):

* an unreadable or non-image file (a file with an image suffix that PIL cannot decode): an
  :class:`~comdefend.errors.InputError` naming up to three such files and their count;
  files without an image suffix in a class folder are ignored;
* a class folder that is not an ImageNet-1k WordNet id, or a ``labels.csv`` row whose label,
  WordNet id or file is wrong: an :class:`~comdefend.errors.InputError` naming it;
* grayscale, CMYK, palette or alpha images (JPEG or PNG): converted to RGB by PIL (gray is
  repeated in the three channels, alpha is dropped), as every ImageNet pipeline does;
* images smaller than the crop: upscaled by the resize step like every other image (their
  shorter side becomes ``resize_size``); a warning says how many there were;
* an image declaring more pixels than the pixel budget of every image reader
  (:func:`comdefend.data.images.max_image_pixels`: 64 megapixels, ``$COMDEFEND_MAX_IMAGE_PIXELS``),
  or one so long and thin that resizing its shorter side would exceed it: an
  :class:`~comdefend.errors.InputError` naming it, before its pixels are decoded;
* a crop size above ``$COMDEFEND_MAX_IMAGE_SIZE`` (default 1024, see :mod:`comdefend.limits`):
  a :class:`~comdefend.errors.UsageError`;
* ``labels.csv``: its columns may come in any order, a UTF-8 byte order mark is accepted; a row
  with more or fewer fields than the header, bytes that are not UTF-8, or an image listed twice
  (the same file, however spelled) are errors naming the file and line(s);
* paths leading out of the dataset folder (an absolute path or ``..`` in ``labels.csv``, a
  symbolic link inside the folder to a file outside it) are refused: a dataset folder's files
  must lie in it. The folder itself (or its ``val/``) may be a link.

All images are decoded into memory as uint8 (150 KB per 224x224 image: 150 MB for the sample,
7.5 GB for the 50,000 validation images).

Example:
    >>> from comdefend.data.imagenet import IMAGENET_CLASSES, IMAGENET_WNIDS
    >>> IMAGENET_WNIDS[0], IMAGENET_CLASSES[0], len(IMAGENET_WNIDS)
    ('n01440764', 'tench', 1000)
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from comdefend.data.images import MAX_PIXELS_ENV, max_image_pixels, open_bounded
from comdefend.errors import ComDefendError, DatasetNotFoundError, InputError, UsageError
from comdefend.limits import check_int

CLASSES_FILE = "imagenet_classes.tsv"
LABELS_FILE = "labels.csv"
WNID_PATTERN = re.compile(r"^n\d{8}$")
#: The evaluation crop's share of the resized image (224 of 256), as in torchvision and timm.
CROP_FRACTION = 0.875
DEFAULT_IMAGE_SIZE = 224
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def _read_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = resources.files("comdefend.data").joinpath(CLASSES_FILE).read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(row[0] for row in rows), tuple(row[1] for row in rows)


#: The 1,000 ImageNet-1k WordNet ids in label order, and their class names.
IMAGENET_WNIDS, IMAGENET_CLASSES = _read_classes()
WNID_TO_LABEL: dict[str, int] = {wnid: label for label, wnid in enumerate(IMAGENET_WNIDS)}


@dataclass(frozen=True)
class ImageNetTransform:
    """Resize the shorter side, then center-crop a square (the evaluation transform).

    Args:
        image_size: side of the square crop (default 224).
        resize_size: shorter side before cropping (default ``round(image_size / 0.875)``).
    """

    image_size: int = DEFAULT_IMAGE_SIZE
    resize_size: int | None = None

    def __post_init__(self) -> None:
        check_int("image size", self.image_size, 1, limit="image_size")
        if self.resize_size is not None:
            check_int("resize size", self.resize_size, 1)
            if self.resize_size < self.image_size:
                raise UsageError(
                    f"resize size {self.resize_size} is smaller than the crop {self.image_size}"
                )

    @property
    def shorter_side(self) -> int:
        return self.resize_size or round(self.image_size / CROP_FRACTION)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """The size an image of ``width`` x ``height`` has after the resize step."""
        side = self.shorter_side
        if min(width, height) == side:
            return width, height
        scale = side / min(width, height)
        return max(side, round(width * scale)), max(side, round(height * scale))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image -> ``(3, image_size, image_size)`` uint8 array."""
        width, height = image.size
        size = self.resized_size(width, height)
        if size != (width, height):
            image = image.resize(size, Image.Resampling.BICUBIC)
            width, height = image.size
        left = (width - self.image_size) // 2
        top = (height - self.image_size) // 2
        crop = image.crop((left, top, left + self.image_size, top + self.image_size))
        return np.ascontiguousarray(np.asarray(crop, dtype=np.uint8).transpose(2, 0, 1))


def _decode(path: Path) -> Image.Image:
    """The RGB image in ``path`` (gray, CMYK, palette, alpha -> RGB), within the pixel budget.

    Raises:
        InputError: the header declares more pixels than :func:`max_image_pixels`.
    """
    with open_bounded(path) as image:
        image.load()
        return image.convert("RGB")


def _check_resize(path: Path, image: Image.Image, transform: ImageNetTransform) -> None:
    """The resize step keeps the image's shape: a long thin image within the budget can become
    a huge one (2 x 4,000 pixels -> 256 x 512,000). Refused before resizing."""
    width, height = transform.resized_size(*image.size)
    limit = max_image_pixels()
    if width * height > limit:
        raise InputError(
            f"{path}: resizing its {image.size[0]}x{image.size[1]} pixels to a shorter side of "
            f"{transform.shorter_side} would make it {width}x{height} = {width * height:,} "
            f"pixels, more than the limit of {limit:,}; crop it, or set {MAX_PIXELS_ENV} to a "
            "larger number"
        )


def read_images(files: list[Path], transform: ImageNetTransform) -> tuple[torch.Tensor, list[Path]]:
    """Decode and transform ``files``; returns ``(N, 3, S, S)`` uint8 and the small ones.

    Raises:
        InputError: some files cannot be decoded (names up to three and the count); a file
            above the pixel budget (at once, naming it).
    """
    arrays: list[np.ndarray] = []
    unreadable: list[str] = []
    small: list[Path] = []
    for path in files:
        try:
            image = _decode(path)
        except ComDefendError:
            raise  # above the pixel budget (or a bad limit): another remedy than unreadable
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            unreadable.append(f"{path} ({type(error).__name__}: {str(error)[:80]})")
            continue
        _check_resize(path, image, transform)
        if min(image.size) < transform.image_size:
            small.append(path)
        arrays.append(transform(image))
    if unreadable:
        shown = "; ".join(unreadable[:3])
        raise InputError(
            f"{len(unreadable)} of {len(files)} ImageNet files cannot be read as images: {shown}"
            + (" ..." if len(unreadable) > 3 else "")
        )
    side = transform.image_size
    if not arrays:
        return torch.zeros(0, 3, side, side, dtype=torch.uint8), small
    return torch.from_numpy(np.stack(arrays)), small


def _labels_table(table: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped) and the non-empty rows with their line numbers.

    Raises:
        InputError: bytes that are not UTF-8, a malformed CSV line, a row whose field count
            differs from the header's; each names the file and line.
    """
    raw = table.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte order mark (Excel's "CSV UTF-8") is dropped
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise InputError(
            f"{table}, line {line}: byte 0x{raw[error.start]:02x} is not UTF-8 text; save the "
            "file as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    header: list[str] = []
    try:
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # blank line
            if not header:
                header = [name.strip() for name in fields]
                continue
            if len(fields) != len(header):
                raise InputError(
                    f"{table}, line {reader.line_num}: {len(fields)} field"
                    f"{'' if len(fields) == 1 else 's'} where the header has {len(header)} "
                    f"({','.join(header)})"
                )
            rows.append((reader.line_num, [field.strip() for field in fields]))
    except csv.Error as error:
        raise InputError(f"{table}, line {reader.line_num}: {error}") from None
    return header, rows


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symbolic links followed, lies in ``root`` (already resolved)."""
    return path.resolve().is_relative_to(root)


def _link_out(path: Path, folder: Path) -> str:
    return (
        f"{path} leads through a symbolic link to {path.resolve()}, outside the dataset folder "
        f"{folder}; a dataset folder's images must lie in it (copy the image in)"
    )


def _rows_of_labels_csv(folder: Path) -> tuple[list[Path], list[int]]:
    table = folder / LABELS_FILE
    root = folder.resolve()
    header, rows = _labels_table(table)
    missing = {"file", "label"} - set(header)
    if missing:
        raise InputError(f"{table} lacks the column(s) {sorted(missing)}")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(f"{table} has the column {repeated[0]!r} twice")
    column = {name: header.index(name) for name in header}
    files: list[Path] = []
    labels: list[int] = []
    lines_of: dict[Path, list[int]] = {}
    for line, fields in rows:
        where = f"{table}, line {line}"
        name, text = fields[column["file"]], fields[column["label"]]
        try:
            label = int(text)
        except ValueError:
            raise InputError(f"{where}: label {text!r} is not an integer") from None
        if not 0 <= label < len(IMAGENET_WNIDS):
            raise InputError(f"{where}: label {label} is not an ImageNet-1k class (0-999)")
        wnid = fields[column["wnid"]] if "wnid" in column else ""
        if wnid and WNID_TO_LABEL.get(wnid) != label:
            expected = IMAGENET_WNIDS[label]
            what = "unknown WordNet id" if wnid not in WNID_TO_LABEL else "WordNet id"
            raise InputError(f"{where}: {what} {wnid} does not match label {label} ({expected})")
        if not name:
            raise InputError(f"{where}: empty file name")
        if os.path.isabs(name) or ".." in Path(name).parts:
            raise InputError(
                f"{where}: {name!r} points outside the dataset folder {folder}; entries are "
                "paths relative to its images/ folder (or to the folder itself)"
            )
        path = folder / "images" / name
        if not path.is_file():
            path = folder / name
        if not path.is_file():
            raise InputError(f"{where}: image {name} not found in {folder / 'images'}")
        if not _inside(path, root):
            raise InputError(f"{where}: {_link_out(path, folder)}")
        lines_of.setdefault(path.resolve(), []).append(line)
        files.append(path)
        labels.append(label)
    repeated_files = [(path, lines) for path, lines in lines_of.items() if len(lines) > 1]
    if repeated_files:
        path, lines = repeated_files[0]
        others = len(repeated_files) - 1
        raise InputError(
            f"{table}: image {path.relative_to(root)} is listed {len(lines)} times (lines "
            f"{', '.join(map(str, lines))}); each image must be listed once"
            + (f" ({others} other image(s) are listed more than once too)" if others else "")
        )
    return files, labels


def _class_folder_root(folder: Path, split: str) -> Path:
    named = folder / ("train" if split == "train" else "val")
    return named if named.is_dir() else folder


def _rows_of_class_folders(root: Path) -> tuple[list[Path], list[int]]:
    class_dirs = sorted(path for path in root.iterdir() if path.is_dir())
    unknown = [path.name for path in class_dirs if path.name not in WNID_TO_LABEL]
    if unknown:
        raise InputError(
            f"{root}: {len(unknown)} class folder(s) are not ImageNet-1k WordNet ids: "
            f"{', '.join(unknown[:5])}" + (" ..." if len(unknown) > 5 else "")
        )
    files: list[Path] = []
    labels: list[int] = []
    inside = root.resolve()
    seen: dict[Path, Path] = {}
    for class_dir in class_dirs:
        for path in sorted(class_dir.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                if not _inside(path, inside):
                    raise InputError(_link_out(path, root))
                first = seen.setdefault(path.resolve(), path)
                if first != path:
                    raise InputError(
                        f"{path} and {first} are the same image (a symbolic link): it would "
                        "be counted twice"
                    )
                files.append(path)
                labels.append(WNID_TO_LABEL[class_dir.name])
    return files, labels


def _has_wnid_folders(root: Path) -> bool:
    return root.is_dir() and any(
        path.is_dir() and WNID_PATTERN.match(path.name) for path in root.iterdir()
    )


def is_imagenet_folder(folder: Path) -> bool:
    """Whether ``folder`` has the labels.csv layout or holds WordNet-id class folders (in
    itself or in its ``val/`` or ``train/``)."""
    if (folder / LABELS_FILE).is_file():
        return True
    return any(_has_wnid_folders(root) for root in (folder / "val", folder / "train", folder))


def list_imagenet(folder: Path, split: str = "test") -> tuple[list[Path], list[int], str]:
    """The image files, their labels and the folder they were listed from.

    Raises:
        DatasetNotFoundError: ``folder`` has neither layout.
        InputError: a bad labels.csv row or a class folder that is not a WordNet id.
    """
    if split not in ("train", "test"):
        raise UsageError(f"ImageNet has the splits train and test (validation), not {split!r}")
    if split == "test" and (folder / LABELS_FILE).is_file():
        files, labels = _rows_of_labels_csv(folder)
        return files, labels, str(folder / LABELS_FILE)
    root = _class_folder_root(folder, split)
    if not _has_wnid_folders(root):
        raise DatasetNotFoundError(
            f"{folder} holds no ImageNet {split} images: expected labels.csv with images/, or "
            "one folder per WordNet id (n01440764/, ...) in it or in its "
            f"{'train' if split == 'train' else 'val'}/ subfolder"
        )
    files, labels = _rows_of_class_folders(root)
    if not files:
        raise DatasetNotFoundError(f"{root}'s class folders hold no images")
    return files, labels, str(root)


def load_imagenet(
    folder: str | Path,
    split: str = "test",
    image_size: int = DEFAULT_IMAGE_SIZE,
    resize_size: int | None = None,
    max_images: int | None = None,
):
    """ImageNet images from ``folder`` as an :class:`~comdefend.data.datasets.ImageSet`.

    Args:
        folder: a labels.csv folder or a class-folder root (see the module docs).
        split: ``test`` (labels.csv, ``val/`` or the folder itself) or ``train`` (``train/``).
        image_size: side of the center crop.
        resize_size: shorter side before the crop (default ``round(image_size / 0.875)``).
        max_images: decode only the first this many images (in label order); ``None``: all.

    Returns:
        ``ImageSet`` named ``imagenet`` with ``(N, 3, image_size, image_size)`` uint8 images
        and the standard class indices; ``classes`` holds the 1,000 class names.

    Example:
        >>> data = load_imagenet("../shared/data/imagenet-sample")  # doctest: +SKIP
        >>> data.images.shape  # doctest: +SKIP
        torch.Size([1000, 3, 224, 224])
    """
    from comdefend.data.datasets import ImageSet

    transform = ImageNetTransform(image_size, resize_size)
    files, labels, source = list_imagenet(Path(folder), split)
    if max_images is not None:
        files, labels = files[:max_images], labels[:max_images]
    images, small = read_images(files, transform)
    if small:
        warnings.warn(
            f"{len(small)} ImageNet image(s) smaller than the {image_size}-pixel crop were "
            f"upscaled (shorter side to {transform.shorter_side}), e.g. {small[0]}",
            stacklevel=2,
        )
    return ImageSet(
        "imagenet",
        split,
        images,
        torch.tensor(labels, dtype=torch.long),
        list(IMAGENET_CLASSES),
        source,
    )


@dataclass(frozen=True)
class ImageNetLoader:
    """The registered dataset's loader: ``loader(folder, split)`` with a fixed crop size;
    :meth:`with_image_size` gives the same loader for another crop (``--image-size``),
    :meth:`with_max_images` one that decodes only the first images (``--n``)."""

    image_size: int = DEFAULT_IMAGE_SIZE
    max_images: int | None = None

    def __call__(self, folder: Path, split: str):
        return load_imagenet(folder, split, self.image_size, max_images=self.max_images)

    def with_image_size(self, image_size: int) -> ImageNetLoader:
        return replace(self, image_size=image_size)

    def with_max_images(self, max_images: int) -> ImageNetLoader:
        return replace(self, max_images=max_images)


__all__ = [
    "CROP_FRACTION",
    "DEFAULT_IMAGE_SIZE",
    "IMAGENET_CLASSES",
    "IMAGENET_WNIDS",
    "WNID_TO_LABEL",
    "ImageNetLoader",
    "ImageNetTransform",
    "is_imagenet_folder",
    "list_imagenet",
    "load_imagenet",
    "read_images",
]
