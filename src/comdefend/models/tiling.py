"""Run a fully convolutional image-to-image network on images of any size.

``run_patches``: the authors' scheme, non-overlapping P x P tiles (the image padded by reflection
to a multiple of P, the result cropped back). ``run_overlapping``: tiles with a margin at least
the network's receptive radius, so that the stitched result equals one pass over the whole image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ImageFn = Callable[[torch.Tensor], torch.Tensor]


def reflect_pad(x: torch.Tensor, bottom: int, right: int) -> torch.Tensor:
    """Pad the bottom/right of ``(N, C, H, W)`` by reflection, repeating it for tiny images."""
    while bottom > 0 or right > 0:
        step_b = min(bottom, x.shape[-2] - 1)
        step_r = min(right, x.shape[-1] - 1)
        if (bottom and step_b == 0) or (right and step_r == 0):
            # A 1-pixel-wide side cannot be reflected: replicate what is left.
            return F.pad(x, (0, right, 0, bottom), mode="replicate")
        x = F.pad(x, (0, step_r, 0, step_b), mode="reflect")
        bottom -= step_b
        right -= step_r
    return x


def _chunks(batch: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    return list(torch.split(batch, chunk)) if chunk > 0 else [batch]


def run_patches(fn: ImageFn, x: torch.Tensor, patch: int, max_batch: int = 1024) -> torch.Tensor:
    """Apply ``fn`` independently to non-overlapping ``patch`` x ``patch`` tiles of ``x``."""
    n, c, h, w = x.shape
    rows, cols = -(-h // patch), -(-w // patch)
    padded = reflect_pad(x, rows * patch - h, cols * patch - w)
    tiles = (
        padded.reshape(n, c, rows, patch, cols, patch)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(n * rows * cols, c, patch, patch)
    )
    outputs = torch.cat([fn(chunk) for chunk in _chunks(tiles, max_batch)])
    c_out = outputs.shape[1]
    stitched = (
        outputs.reshape(n, rows, cols, c_out, patch, patch)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(n, c_out, rows * patch, cols * patch)
    )
    return stitched[..., :h, :w]


def run_overlapping(fn: ImageFn, x: torch.Tensor, tile: int, margin: int) -> torch.Tensor:
    """Apply ``fn`` to ``tile`` x ``tile`` cores with ``margin`` pixels of context on each side.

    The network's zero padding is seen only at the true image border, so with ``margin`` at least
    the receptive radius the output equals ``fn(x)`` (up to float rounding), with less memory.
    """
    n, _, h, w = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    out: torch.Tensor | None = None
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            y0, x0 = max(top - margin, 0), max(left - margin, 0)
            y1, x1 = min(top + tile + margin, h), min(left + tile + margin, w)
            result = fn(x[..., y0:y1, x0:x1])
            if out is None:
                out = result.new_empty((n, result.shape[1], h, w))
            core_h, core_w = min(tile, h - top), min(tile, w - left)
            out[..., top : top + core_h, left : left + core_w] = result[
                ..., top - y0 : top - y0 + core_h, left - x0 : left - x0 + core_w
            ]
    assert out is not None
    return out
