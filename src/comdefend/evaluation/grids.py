"""Image grids for reports: rows of equally sized images, written as PNG with Pillow."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from comdefend.checkpoint import atomic_write
from comdefend.data.images import to_uint8


def image_grid(
    rows: Sequence[torch.Tensor],
    labels: Sequence[str] | None = None,
    scale: int = 3,
    gap: int = 2,
    label_width: int = 110,
) -> Image.Image:
    """Stack rows of ``(N, C, H, W)`` images in [0, 1] into one RGB picture.

    Args:
        rows: each row a batch of N images of the same size (grayscale is shown as gray).
        labels: optional text drawn at the left of each row (e.g. "clean", "purified").
        scale: nearest-neighbour upscaling of small images (CIFAR, Fashion-MNIST).
        gap: pixels between images.
    """
    if not rows:
        raise ValueError("image_grid needs at least one row")
    n, _, h, w = rows[0].shape
    cell_h, cell_w = h * scale, w * scale
    left = label_width if labels else 0
    canvas = Image.new(
        "RGB", (left + n * (cell_w + gap) + gap, len(rows) * (cell_h + gap) + gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = gap + r * (cell_h + gap)
        if labels:
            draw.text((4, top + cell_h // 2 - 6), labels[r], fill="black")
        for c, image in enumerate(row):
            array = to_uint8(image.expand(3, -1, -1) if image.shape[0] == 1 else image)
            tile = Image.fromarray(array).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (left + gap + c * (cell_w + gap), top))
    return canvas


def save_grid(path: str | os.PathLike, rows: Sequence[torch.Tensor], **kwargs) -> Path:
    picture = image_grid(rows, **kwargs)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def amplified_difference(a: torch.Tensor, b: torch.Tensor, gain: float = 10.0) -> torch.Tensor:
    """``0.5 + gain * (a - b)`` clipped to [0, 1]: makes small perturbations visible."""
    return (0.5 + gain * (a - b)).clamp(0, 1)
