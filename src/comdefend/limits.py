"""Upper bounds on sizes that come from files or flags, checked before anything is allocated.

A checkpoint's metadata, a crafted file or a mistyped flag must not make us allocate terabytes:
every size is checked against a limit here first. The defaults are far above anything the
paper's models use; a user who really needs more raises a limit with its environment variable,
e.g. ``COMDEFEND_MAX_PATCH_SIZE=4096 comdefend purify ...``.

=====================  =================================  =========
limit                  environment variable               default
=====================  =================================  =========
code channels          ``COMDEFEND_MAX_CODE_CHANNELS``    256
patch size (pixels)    ``COMDEFEND_MAX_PATCH_SIZE``       1024
full-mode tile         ``COMDEFEND_MAX_TILE``             2048
authors' .npy (bytes)  ``COMDEFEND_MAX_OFFICIAL_BYTES``   256 MiB
classifier classes     ``COMDEFEND_MAX_CLASSES``          100000
crop size (pixels)     ``COMDEFEND_MAX_IMAGE_SIZE``       1024
pixels of image files  ``COMDEFEND_MAX_IMAGE_PIXELS``     64000000
=====================  =================================  =========

The crop size (``--image-size``, ImageNet's center crop) is above every usual ImageNet
evaluation resolution (224 to 600, 800 for the largest EfficientNets): at 1024 one image takes
3 MB as uint8 and 12.6 MB as float, so 1,000 images already take 15 GB; 9,000 took 11 GB for a
single image. The pixel count that an image file's header declares is checked by every image
reader before it decodes (:func:`comdefend.data.images.max_image_pixels`, a guard against
decompression bombs). A value may group its digits with underscores (``64_000_000``).

Example:
    >>> check_int("patch_size", 32, 1, limit="patch_size")
    32
    >>> check_int("patch_size", 100_000, 1, limit="patch_size")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    comdefend.errors.UsageError: patch_size 100000 is above the limit of 1024 (raise it with ...
"""

from __future__ import annotations

import math
import os
from typing import Any

from comdefend.errors import UsageError

#: name -> (environment variable, default)
LIMITS: dict[str, tuple[str, int]] = {
    "code_channels": ("COMDEFEND_MAX_CODE_CHANNELS", 256),
    "patch_size": ("COMDEFEND_MAX_PATCH_SIZE", 1024),
    "max_tile": ("COMDEFEND_MAX_TILE", 2048),
    "official_bytes": ("COMDEFEND_MAX_OFFICIAL_BYTES", 256 * 1024 * 1024),
    "num_classes": ("COMDEFEND_MAX_CLASSES", 100_000),
    "image_size": ("COMDEFEND_MAX_IMAGE_SIZE", 1024),
    "image_pixels": ("COMDEFEND_MAX_IMAGE_PIXELS", 64_000_000),
}


def limit(name: str) -> int:
    """The current value of limit ``name`` (its environment variable, else the default)."""
    variable, default = LIMITS[name]
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise UsageError(f"${variable} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise UsageError(f"${variable} must be a positive integer, got {text!r}")
    return value


def check_int(name: str, value: Any, low: int, high: int | None = None, *, limit: str = "") -> int:
    """``value`` if it is an integer (not a bool) in ``[low, high]``, else :class:`UsageError`.

    Args:
        name: the setting, for the message.
        value: what a file or flag gave.
        low: smallest allowed value.
        high: largest allowed value (``None``: no bound besides ``limit``).
        limit: a :data:`LIMITS` name bounding ``value`` from above (overridable).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise UsageError(f"{name} must be {'in ' if high is not None else ''}{bound}, got {value}")
    if limit:
        ceiling = globals()["limit"](limit)
        if value > ceiling:
            raise UsageError(
                f"{name} {value} is above the limit of {ceiling} (raise it with "
                f"${LIMITS[limit][0]} if you need more)"
            )
    return value


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None
) -> float:
    """``float(value)`` if it is a finite real number (not a bool) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise UsageError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (strings), else :class:`UsageError` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value
