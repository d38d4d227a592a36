"""Numeric precision of a purification pass: ``fp32``, ``tf32`` or ``bf16``.

- ``fp32`` (the default): true float32 everywhere. On a CUDA GPU this *turns off* TF32 for the
  pass: PyTorch lets cuDNN convolutions use TF32 by default, which would quietly round their
  inputs to 10 mantissa bits.
- ``tf32``: float32 storage, TF32 tensor-core math for convolutions and matrix products (CUDA
  GPUs of the Ampere generation or later). There is no TF32 on the CPU: asking for it there is an
  error rather than a silent fp32 run.
- ``bf16``: convolutions in bfloat16 through :func:`torch.autocast` (CPUs with AVX512-BF16 or
  AMX, and CUDA GPUs); the code's threshold decision is taken on bfloat16 logits, so bits whose
  logit is close to 0 can flip. ``benchmarks/precision.py`` measures how many, and the effect on
  PSNR and robust accuracy (docs/PERFORMANCE.md).

Example:
    >>> import torch
    >>> with precision_context("bf16", torch.device("cpu")):
    ...     y = torch.nn.functional.conv2d(torch.rand(1, 3, 8, 8), torch.rand(4, 3, 3, 3))
    >>> y.dtype
    torch.bfloat16
    >>> check_precision("fp16")
    Traceback (most recent call last):
    ...
    comdefend.errors.UsageError: precision must be one of fp32, tf32, bf16, got 'fp16'
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from comdefend.errors import UsageError

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def check_precision(precision: object, device: torch.device | str | None = None) -> Precision:
    """``precision`` checked (and lower-cased); ``tf32`` is refused on a device without it."""
    text = precision.strip().lower() if isinstance(precision, str) else precision
    if text not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if text == "tf32" and device is not None and torch.device(device).type != "cuda":
        raise UsageError(
            "precision tf32 needs a CUDA GPU (Ampere or later); on the "
            f"{torch.device(device).type} use fp32 or bf16"
        )
    return text  # type: ignore[return-value]


@contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed pass at ``precision`` on ``device`` (see the module's description)."""
    precision = check_precision(precision, device)
    if device.type == "cuda":
        conv = torch.backends.cudnn.conv  # type: ignore[attr-defined]
        matmul = torch.backends.cuda.matmul
        saved = (conv.fp32_precision, matmul.fp32_precision)
        mode = "tf32" if precision == "tf32" else "ieee"
        conv.fp32_precision, matmul.fp32_precision = mode, mode
        try:
            if precision == "bf16":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    yield
            else:
                yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = saved
        return
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


__all__ = ["PRECISIONS", "Precision", "check_precision", "precision_context"]
