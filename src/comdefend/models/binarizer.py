"""The binarizer between ComCNN and RecCNN: noisy sigmoid in training, threshold at inference.

This is the one place where ComDefend's training-time relaxation and its test-time quantisation
live (the role CompressAI gives its entropy bottleneck). Every mode is a plain function
(:func:`binarize`) with an ``nn.Module`` twin (:class:`Binarizer`).

Modes:
    ``noisy``: ``sigmoid(code - n)``, ``n ~ N(0, sigma^2)`` (training; sigma = 20 in the paper).
        The large noise makes any code value near 0 useless to the decoder, so the encoder learns
        to push the code far from 0 and the sigmoid output becomes nearly binary.
    ``hard``: ``sigmoid(code - n) > threshold`` as {0, 1}; ``n`` has ``inference_noise_std``
        (0 by default; the authors' test scripts used 1.0). Zero gradient almost everywhere.
    ``relaxed``: ``sigmoid(code - n)``, fully differentiable (an attacker's surrogate).
    ``straight_through``: forward as ``hard``, backward as the identity on the code (BPDA).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

BinarizerMode = Literal["noisy", "hard", "relaxed", "straight_through"]
BINARIZER_MODES: tuple[str, ...] = ("noisy", "hard", "relaxed", "straight_through")


def _gaussian_like(
    code: torch.Tensor, std: float, generator: torch.Generator | None
) -> torch.Tensor:
    if std == 0.0:
        return torch.zeros((), dtype=code.dtype, device=code.device)
    if generator is not None and generator.device != code.device:
        noise = torch.randn(code.shape, generator=generator, device=generator.device)
        return noise.to(device=code.device, dtype=code.dtype) * std
    return torch.randn(code.shape, generator=generator, device=code.device, dtype=code.dtype) * std


class _HardThresholdStraightThrough(torch.autograd.Function):
    """Forward: threshold the sigmoid; backward: pass the gradient to the code unchanged."""

    @staticmethod
    def forward(ctx, shifted_code: torch.Tensor, threshold: float) -> torch.Tensor:
        return (torch.sigmoid(shifted_code) > threshold).to(shifted_code.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def binarize(
    code: torch.Tensor,
    mode: BinarizerMode = "hard",
    *,
    noise_std: float = 20.0,
    inference_noise_std: float = 0.0,
    threshold: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Turn ComCNN's real-valued code into (nearly) binary values.

    Args:
        code: encoder output of any shape (usually ``(N, C, H, W)``).
        mode: one of ``noisy``, ``hard``, ``relaxed``, ``straight_through``.
        noise_std: std of the training noise (``noisy`` mode only).
        inference_noise_std: std of the noise subtracted before the sigmoid in the other modes.
        threshold: threshold on the sigmoid output (``hard`` and ``straight_through``).
        generator: optional generator for the noise, for reproducible randomness.

    Returns:
        A tensor shaped like ``code`` with values in [0, 1] ({0, 1} in the hard modes).

    Example:
        >>> bits = binarize(torch.tensor([-3.0, 0.2, 5.0]), "hard")
        >>> bits.tolist()
        [0.0, 1.0, 1.0]
    """
    if mode == "noisy":
        return torch.sigmoid(code - _gaussian_like(code, noise_std, generator))
    shifted = code - _gaussian_like(code, inference_noise_std, generator)
    if mode == "hard":
        return (torch.sigmoid(shifted) > threshold).to(code.dtype)
    if mode == "relaxed":
        return torch.sigmoid(shifted)
    if mode == "straight_through":
        return _HardThresholdStraightThrough.apply(shifted, threshold)
    raise ValueError(f"unknown binarizer mode {mode!r}; valid modes: {', '.join(BINARIZER_MODES)}")


class Binarizer(nn.Module):
    """Module twin of :func:`binarize`.

    In ``train()`` mode it always applies the ``noisy`` relaxation; in ``eval()`` mode it applies
    ``inference_mode`` (``hard`` unless changed, e.g. to ``relaxed`` or ``straight_through`` for
    gradient-based attacks).

    Args:
        noise_std: training noise std (20 in the paper).
        inference_mode: mode used in eval mode.
        inference_noise_std: test-time noise std (0 by default; 1.0 in the authors' scripts).
        threshold: threshold on the sigmoid output (0.5).
        seed: seeds the test-time noise generator, so that noisy inference is reproducible.

    Shape:
        - Input: any, usually ``(N, C, H, W)``.
        - Output: same as input.
    """

    def __init__(
        self,
        noise_std: float = 20.0,
        inference_mode: BinarizerMode = "hard",
        inference_noise_std: float = 0.0,
        threshold: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if inference_mode not in BINARIZER_MODES or inference_mode == "noisy":
            valid = ", ".join(m for m in BINARIZER_MODES if m != "noisy")
            raise ValueError(f"unknown inference mode {inference_mode!r}; valid: {valid}")
        if noise_std < 0 or inference_noise_std < 0:
            raise ValueError("noise standard deviations must be >= 0")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.noise_std = float(noise_std)
        self.inference_mode: BinarizerMode = inference_mode
        self.inference_noise_std = float(inference_noise_std)
        self.threshold = float(threshold)
        self.generator: torch.Generator | None = None
        if seed is not None:
            self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the test-time noise stream from ``seed``."""
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, code: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mode: BinarizerMode = "noisy" if self.training else self.inference_mode
        return binarize(
            code,
            mode,
            noise_std=self.noise_std,
            inference_noise_std=self.inference_noise_std,
            threshold=self.threshold,
            generator=generator if generator is not None else self.generator,
        )

    def extra_repr(self) -> str:
        return (
            f"noise_std={self.noise_std}, inference_mode={self.inference_mode!r}, "
            f"inference_noise_std={self.inference_noise_std}, threshold={self.threshold}"
        )
