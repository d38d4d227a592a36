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
  PSNR and robust accuracy (docs/PERFORMANCE.md). An x86 CPU without AVX512-BF16 or AMX has no
  bfloat16 arithmetic: torch emulates it, hundreds of times slower than fp32, so the checks of
  the command line and of defense specs (:func:`check_precision` with a device) refuse it there.
  :func:`precision_context` itself still runs it, in the emulation.

Example:
    >>> import torch
    >>> with precision_context("bf16", torch.device("cpu")):
    ...     y = torch.nn.functional.conv2d(torch.rand(1, 3, 8, 8), torch.rand(4, 3, 3, 3))
    >>> y.dtype
    torch.bfloat16
    >>> check_precision("fp32", torch.device("cpu"))
    'fp32'
    >>> check_precision("fp16")
    Traceback (most recent call last):
    ...
    comdefend.errors.UsageError: precision must be one of fp32, tf32, bf16, got 'fp16'
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

from comdefend.errors import UsageError

Precision = Literal["fp32", "tf32", "bf16"]
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")


def _probe(namespace: object, name: str) -> bool:
    """A hardware probe of torch's (private, so absent in some versions: False then)."""
    try:
        return bool(getattr(namespace, name)())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_missing() -> str | None:
    """Why this CPU has no native bfloat16 arithmetic (None: it has).

    On x86 that takes AVX512-BF16 or AMX; without them oneDNN emulates bfloat16 in float32,
    which is slower than float32 itself (a ComDefend pass measured hundreds of times slower).
    On other architectures oneDNN says whether it has bfloat16 kernels.
    """
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        native = _probe(torch.cpu, "_is_avx512_bf16_supported") or _probe(
            torch.cpu, "_is_amx_tile_supported"
        )
        return None if native else "this CPU has neither AVX512-BF16 nor AMX"
    onednn_bf16 = _probe(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    if torch.backends.mkldnn.is_available() and onednn_bf16:
        return None
    return "oneDNN has no bfloat16 kernels for this CPU"


def _checked_name(precision: object) -> Precision:
    text = precision.strip().lower() if isinstance(precision, str) else precision
    if text not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return text  # type: ignore[return-value]


def _tf32_refusal(device: torch.device) -> str:
    other = "fp32" if cpu_bf16_missing() is not None else "fp32 or bf16"
    return f"precision tf32 needs a CUDA GPU (Ampere or later); on the {device.type} use {other}"


def check_precision(precision: object, device: torch.device | str | None = None) -> Precision:
    """``precision`` checked (and lower-cased).

    With a ``device``, a precision that device cannot run at its speed is refused: ``tf32``
    off CUDA, ``bf16`` on a CPU without native bfloat16 (:func:`cpu_bf16_missing`).
    """
    text = _checked_name(precision)
    if device is None:
        return text
    device = torch.device(device)
    if text == "tf32" and device.type != "cuda":
        raise UsageError(_tf32_refusal(device))
    if text == "bf16" and device.type == "cpu" and (reason := cpu_bf16_missing()) is not None:
        raise UsageError(
            f"precision bf16 needs a CPU with AVX512-BF16 or AMX ({reason}: torch would "
            "emulate bfloat16, hundreds of times slower than fp32); use fp32"
        )
    return text


@contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed pass at ``precision`` on ``device`` (see the module's description).

    Unlike :func:`check_precision` it runs ``bf16`` on a CPU without bfloat16 arithmetic too,
    in torch's (slow) emulation. ``tf32`` off CUDA is refused.
    """
    precision = _checked_name(precision)
    if precision == "tf32" and device.type != "cuda":
        raise UsageError(_tf32_refusal(device))
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


__all__ = ["PRECISIONS", "Precision", "check_precision", "cpu_bf16_missing", "precision_context"]
