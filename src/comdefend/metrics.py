"""Image-quality metrics, each formula written once."""

from __future__ import annotations

import math

import torch


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] images to the 256 levels an 8-bit file would hold (as CompressAI does)."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, peak 1.

    ``quantize=True`` rounds both images to 8 bits first, so the number is what a PNG would give
    (CompressAI's convention). Identical images give ``inf``.
    """
    if quantize:
        a, b = quantize_8bit(a), quantize_8bit(b)
    mse = mse_per_image(a.double(), b.double())
    return (-10 * torch.log10(mse)).float()


def mean_psnr(a: torch.Tensor, b: torch.Tensor, quantize: bool = True) -> float:
    """PSNR of the mean MSE over a batch (the dataset-level figure reported in tables)."""
    if quantize:
        a, b = quantize_8bit(a), quantize_8bit(b)
    mse = float(mse_per_image(a.double(), b.double()).mean())
    return math.inf if mse == 0 else -10 * math.log10(mse)


def psnr_from_mse(mse: float) -> float:
    return math.inf if mse <= 0 else -10 * math.log10(mse)
