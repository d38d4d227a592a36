"""ComDefend's training objective."""

from __future__ import annotations

import torch


def comdefend_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    code: torch.Tensor,
    code_penalty: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mean((reconstruction - target)^2) + code_penalty * mean(code^2)``.

    Args:
        reconstruction: RecCNN output in [0, 1], ``(N, C, H, W)``.
        target: the clean input, same shape.
        code: the (noisy-sigmoid) binary code fed to RecCNN.
        code_penalty: lambda (1e-4 in the paper).

    Returns:
        ``(total, mse, code_term)`` where ``code_term = mean(code^2)`` (before lambda).
    """
    mse = torch.mean((reconstruction - target) ** 2)
    code_term = torch.mean(code**2)
    return mse + code_penalty * code_term, mse, code_term
