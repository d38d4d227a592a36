"""Reading and writing image files as [0, 1] float tensors, with clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from comdefend.checkpoint import atomic_write
from comdefend.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def read_image(path: str | os.PathLike, channels: int | None = None) -> torch.Tensor:
    """Read an image file as a ``(C, H, W)`` float tensor in [0, 1].

    ``channels`` = 3 converts to RGB, 1 to grayscale; ``None`` keeps what the file has
    (grayscale stays 1 channel, anything else becomes RGB). An alpha channel is dropped.
    """
    file = Path(path)
    try:
        with Image.open(file) as image:
            image.load()
            mode = image.mode
            if channels is None:
                channels = 1 if mode in ("L", "I;16", "I", "1") else 3
            converted = image.convert("L" if channels == 1 else "RGB")
    except FileNotFoundError:
        raise InputError(f"image not found: {file}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot read image {file}: {error}") from error
    array = np.asarray(converted, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float().div_(255)


def image_channels_of(path: str | os.PathLike) -> int:
    """1 for grayscale files, 3 for anything else (without decoding the pixels)."""
    try:
        with Image.open(path) as image:
            return 1 if image.mode in ("L", "I;16", "I", "1", "LA") else 3
    except (UnidentifiedImageError, OSError) as error:
        raise InputError(f"cannot read image {path}: {error}") from error


def to_uint8(x: torch.Tensor, quantization: str = "round") -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, C)`` uint8; ``floor`` mimics ``astype(uint8)``."""
    scaled = x.detach().clamp(0, 1).mul(255).cpu()
    scaled = torch.floor(scaled) if quantization == "floor" else torch.round(scaled)
    return scaled.to(torch.uint8).permute(1, 2, 0).numpy()


def write_png(path: str | os.PathLike, x: torch.Tensor, quantization: str = "round") -> Path:
    """Write a ``(C, H, W)`` [0, 1] tensor as an 8-bit PNG, atomically."""
    array = to_uint8(x, quantization)
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (not recursive) into a sorted list of image files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"folder {path} holds no PNG/JPEG images")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"no such file or folder: {path}")
    return files
