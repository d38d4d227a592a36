"""Attacks by name: :data:`ATTACKS` and :func:`make_attack`."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from comdefend.attacks.base import Attack
from comdefend.attacks.cw import CW
from comdefend.attacks.deepfool import DeepFool
from comdefend.attacks.linf import BIM, FGSM, MIFGSM, PGD
from comdefend.errors import UsageError

ATTACKS: dict[str, type[Attack]] = {cls.name: cls for cls in (FGSM, BIM, PGD, MIFGSM, DeepFool, CW)}


def make_attack(
    name: str, model: nn.Module, eps: float | None = None, seed: int = 0, **kwargs: Any
) -> Attack:
    """Build the attack called ``name`` (case-insensitive) around ``model``.

    Args:
        name: one of :data:`ATTACKS`' keys: ``fgsm, bim, pgd, mifgsm, deepfool, cw``.
        model: classifier mapping images in [0, 1] to logits.
        eps: budget (L-inf for ``fgsm/bim/pgd/mifgsm``, optional L2 for ``deepfool/cw``);
            ``None`` keeps the attack's default.
        seed: seed of the attack's random choices.
        **kwargs: other hyper-parameters of the attack (e.g. ``steps``, ``alpha``).

    Raises:
        UsageError: unknown name or hyper-parameter, or a value out of range.

    Example:
        >>> attack = make_attack("PGD", nn.Linear(2, 2), eps=4 / 255, steps=3)
        >>> attack.settings()["name"], attack.settings()["steps"]
        ('pgd', 3)
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS)}")
    cls = ATTACKS[key]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "model")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UsageError(
            f"{key} does not take {', '.join(unknown)}; its parameters: {', '.join(accepted)}"
        )
    if eps is not None:
        kwargs["eps"] = eps
    return cls(model, seed=seed, **kwargs)
