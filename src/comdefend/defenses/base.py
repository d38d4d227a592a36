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

from torch import nn

from comdefend.models.comdefend import check_batch, check_images

__all__ = ["Defense", "check_batch", "check_images"]


class Defense(nn.Module):
    """Base class of the purifiers in :mod:`comdefend.defenses`.

    Subclasses implement ``forward`` and ``name`` and may override ``differentiable`` /
    ``randomized`` (class attributes or properties) and :meth:`params`. Every built-in
    defense starts ``forward`` with :func:`check_images` (NCHW float, finite, in [0, 1], the
    right channel count where known), so that bad input fails the same way everywhere; a
    user's defense should do the same.

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
