"""Reading and writing image files as [0, 1] float tensors, with clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from comdefend import limits
from comdefend.checkpoint import atomic_write
from comdefend.errors import InputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}

#: Images above this many pixels are refused before their pixels are decoded (a small file can
#: declare a huge size: a decompression bomb). Override with ``max_pixels`` or the environment
#: variable named by :data:`MAX_PIXELS_ENV`.
MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS = limits.LIMITS["image_pixels"]

# Modes whose pixels are one gray value (with or without alpha).
_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


def max_image_pixels() -> int:
    """The pixel-count limit: ``$COMDEFEND_MAX_IMAGE_PIXELS`` if set, else 64,000,000
    (:func:`comdefend.limits.limit`, like every other size limit).

    Raises:
        UsageError: the environment variable is not a positive integer.
    """
    return limits.limit("image_pixels")


def _too_large(file: Path, width: int, height: int, limit: int) -> InputError:
    return InputError(
        f"{file} declares {width}x{height} = {width * height:,} pixels, more than the limit of "
        f"{limit:,} (a guard against decompression bombs); if the image is genuine, set "
        f"{MAX_PIXELS_ENV} to a larger number"
    )


@contextmanager
def open_bounded(path: str | os.PathLike, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``PIL.Image.open`` with the pixel-count check of :func:`max_image_pixels`, read from
    the header before any pixel is decoded (in place of PIL's own bomb check, a warning and
    then a traceback at twice its limit, which has no override and names no file). Every
    reader of image files opens them through here.

    Raises:
        InputError: the image declares more pixels than ``max_pixels`` (default:
            :func:`max_image_pixels`); PIL's own errors (missing, unreadable) pass through.
    """
    file = Path(path)
    limit = max_image_pixels() if max_pixels is None else max_pixels
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(file) as image:
            width, height = image.size
            if width * height > limit:
                raise _too_large(file, width, height, limit)
            yield image
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit


def _gray_array(image: Image.Image, file: Path) -> np.ndarray:
    """One gray channel as float in [0, 1], keeping 16-bit and float precision."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image).astype(np.float64)
        # PNG/TIFF 16-bit gray arrive as I;16 or I, with values 0..65535.
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise InputError(
                f"{file} holds 32-bit integer pixels outside 0..65535; convert it to an 8- or "
                "16-bit image"
            )
        return array / 65535.0
    if mode == "F":
        array = np.asarray(image).astype(np.float64)
        if array.size and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise InputError(
                f"{file} holds floating-point pixels outside [0, 1] (or NaN); convert it to an "
                "8- or 16-bit image"
            )
        return array
    return np.asarray(image.convert("L"), dtype=np.float64) / 255.0


def _over_white(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """Composite on a white background, as image viewers and browsers show transparency."""
    if alpha is None:
        return color
    weight = alpha[..., None] if color.ndim == 3 else alpha
    return color * weight + (1.0 - weight)


def _alpha_of(image: Image.Image) -> np.ndarray | None:
    if image.mode in ("LA", "La", "RGBA", "RGBa", "PA") or (
        image.mode == "P" and "transparency" in image.info
    ):
        return np.asarray(image.convert("RGBA"), dtype=np.float64)[..., 3] / 255.0
    return None


def read_image(
    path: str | os.PathLike, channels: int | None = None, max_pixels: int | None = None
) -> torch.Tensor:
    """Read an image file as a ``(C, H, W)`` float tensor in [0, 1], as a viewer shows it.

    - EXIF orientation is applied (a phone photo comes out upright).
    - 16-bit grayscale keeps its full range (65535 is white); 1-bit, 8-bit, 16-bit and [0, 1]
      float grayscale are grayscale; palette, CMYK, YCbCr and other colour modes become RGB.
    - Transparency (RGBA, gray + alpha, palette with a transparent colour) is composited on
      white, as viewers show it.
    - The pixel count is checked from the header, before any pixel is decoded.

    Args:
        path: the image file (PNG, JPEG, BMP, WebP, TIFF, ...).
        channels: 3 converts to RGB, 1 to grayscale (luma); ``None`` keeps what the file has
            (1 for grayscale files, with or without alpha; 3 otherwise).
        max_pixels: refuse images with more pixels (default: :func:`max_image_pixels`, i.e.
            ``$COMDEFEND_MAX_IMAGE_PIXELS`` or 64,000,000).

    Raises:
        InputError: missing, unreadable or truncated file, a pixel count above the limit, or
            pixel values with no defined brightness (32-bit integers beyond 16 bits, floats
            outside [0, 1]).

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> file = pathlib.Path(tempfile.mkdtemp()) / "gray.png"
        >>> Image.new("I;16", (4, 2), 65535).save(file)
        >>> read_image(file).shape, float(read_image(file).max())
        (torch.Size([1, 2, 4]), 1.0)
    """
    file = Path(path)
    limit = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with open_bounded(file, limit) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            gray = upright.mode in _GRAY_MODES
            if channels is None:
                channels = 1 if gray else 3
            alpha = _alpha_of(upright)
            if channels == 1:
                color = _gray_array(upright, file)
            elif gray and upright.mode not in ("LA", "La"):
                color = np.repeat(_gray_array(upright, file)[..., None], 3, axis=2)
            else:
                color = np.asarray(upright.convert("RGB"), dtype=np.float64) / 255.0
    except FileNotFoundError:
        raise InputError(f"image not found: {file}") from None
    except IsADirectoryError:
        raise InputError(f"{file} is a folder, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"cannot read image {file}: {error}") from error
    array = _over_white(color, alpha)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array)).float().clamp_(0, 1)


def image_channels_of(path: str | os.PathLike) -> int:
    """1 for grayscale files (with or without alpha), 3 for anything else (header only)."""
    limit = max_image_pixels()
    try:
        with open_bounded(path, limit) as image:
            return 1 if image.mode in _GRAY_MODES else 3
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise InputError(f"cannot read image {path}: {error}") from error


def to_pixels(x: torch.Tensor, quantization: str = "round") -> torch.Tensor:
    """Images in [0, 1] (any shape) -> the uint8 levels an 8-bit file holds, on the CPU;
    ``floor`` mimics ``astype(uint8)``.

    ``to_pixels(x).float() / 255`` gives back images that quantize to the same levels:

        >>> x = torch.tensor([0.0, 0.3, 0.50196, 1.2])
        >>> to_pixels(x)
        tensor([  0,  76, 128, 255], dtype=torch.uint8)
        >>> torch.equal(to_pixels(to_pixels(x).float() / 255), to_pixels(x))
        True
    """
    scaled = x.detach().clamp(0, 1).mul(255).cpu()
    scaled = torch.floor(scaled) if quantization == "floor" else torch.round(scaled)
    return scaled.to(torch.uint8)


def to_uint8(x: torch.Tensor, quantization: str = "round") -> np.ndarray:
    """``(C, H, W)`` in [0, 1] -> ``(H, W, C)`` uint8 (:func:`to_pixels`)."""
    return to_pixels(x, quantization).permute(1, 2, 0).numpy()


def write_png(path: str | os.PathLike, x: torch.Tensor, quantization: str = "round") -> Path:
    """Write a ``(C, H, W)`` [0, 1] tensor as an 8-bit PNG, atomically.

    Raises:
        OSError: the file cannot be written (full disk, permissions); it names ``path``, not
            the temporary file written first.
    """
    array = to_uint8(x, quantization)
    image = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    try:
        return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error


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
