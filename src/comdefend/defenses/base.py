"""The common interface of every input-transformation defense (purifier).

A defense is an ``nn.Module`` mapping a batch of NCHW float images in [0, 1] to images of the same
shape in [0, 1]. Besides ``forward`` it tells an evaluation harness three things:

``name``
    A short spec string (``jpeg:75``, ``bits:4``, ``jpeg:75+median:2``) that
    :func:`comdefend.defenses.parse_defense` turns back into an equivalent defense.
``differentiable``
    Whether back-propagating through ``forward`` gives a useful gradient. When ``False`` a
    gradient-based attacker needs BPDA (:class:`comdefend.defenses.BPDA`).
``randomized``
    Whether ``forward`` draws random numbers, so that an attacker needs EOT
    (:class:`comdefend.defenses.EOT`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comdefend.errors import InputError


def check_batch(x: torch.Tensor, name: str = "input") -> None:
    """Cheap structural check of a defense input (no device synchronisation).

    Raises :class:`InputError` unless ``x`` is a 4-dimensional floating-point tensor. Value checks
    (range, NaN) are left to defenses that leave the device anyway (JPEG, ComDefend).
    """
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} must be NCHW (4 dimensions), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")


class Defense(nn.Module):
    """Base class of the purifiers in :mod:`comdefend.defenses`.

    Subclasses implement ``forward`` and ``name`` and may override ``differentiable`` /
    ``randomized`` (class attributes or properties) and :meth:`params`.

    Shape:
        - Input: ``(N, C, H, W)`` float in [0, 1].
        - Output: same shape, float in [0, 1].
    """

    differentiable: bool = True
    randomized: bool = False

    @property
    def name(self) -> str:
        """Spec string of this defense (see :func:`comdefend.defenses.parse_defense`)."""
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Defense-specific parameters, merged into :meth:`settings`."""
        return {}

    def settings(self) -> dict[str, Any]:
        """A JSON-serialisable description for reports: name, flags and parameters."""
        return {
            "name": self.name,
            "type": type(self).__name__,
            "differentiable": bool(self.differentiable),
            "randomized": bool(self.randomized),
            **self.params(),
        }

    def extra_repr(self) -> str:
        return f"name={self.name!r}"
