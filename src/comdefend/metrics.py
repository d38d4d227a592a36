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


def proportion_interval(
    successes: int, total: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / total`` (e.g. an accuracy).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or ``total``
    successes, where small evaluation sets often land. ``total == 0`` gives ``(0.0, 1.0)``.

    Example:
        >>> low, high = proportion_interval(45, 50)
        >>> round(low, 3), round(high, 3)
        (0.786, 0.957)
        >>> proportion_interval(0, 20)[0], round(proportion_interval(0, 20)[1], 3)
        (0.0, 0.161)
    """
    if total < 0 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total, got {successes} of {total}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if total == 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return low, high
