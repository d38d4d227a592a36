"""Untargeted evasion attacks on image classifiers (native PyTorch, batched, seeded).

L-inf: :class:`FGSM`, :class:`BIM`, :class:`PGD`, :class:`MIFGSM`, :class:`APGD` (APGD-CE) and
:class:`APGDDLR` (APGD-DLR). Minimum-norm L2: :class:`DeepFool`, :class:`CW`. Build one by name
with :func:`make_attack`; add your own with :func:`register_attack` or, for another library's
attack, :func:`adapt_attack`.

Attacks need input gradients: on a model whose gradient is exactly zero (a non-differentiable
defense such as ComDefend's hard threshold, JPEG or bit-depth reduction inside it) they raise
:class:`ZeroGradientError` instead of returning the images unchanged. Attack what the attacker of
your threat model differentiates through:
``make_threat_model_defense(defense, "bpda", classifier)`` (see :mod:`comdefend.defenses`).
"""

from comdefend.attacks.apgd import APGD, APGDDLR, apgd_checkpoints, dlr_loss
from comdefend.attacks.base import (
    Attack,
    ZeroGradientError,
    ZeroGradientWarning,
    restrict_l2,
)
from comdefend.attacks.cw import CW
from comdefend.attacks.deepfool import DeepFool
from comdefend.attacks.linf import BIM, FGSM, MIFGSM, PGD, project_linf
from comdefend.attacks.registry import (
    ATTACKS,
    ForeignAttack,
    adapt_attack,
    make_attack,
    register_attack,
)

__all__ = [
    "APGD",
    "APGDDLR",
    "ATTACKS",
    "BIM",
    "CW",
    "FGSM",
    "MIFGSM",
    "PGD",
    "Attack",
    "DeepFool",
    "ForeignAttack",
    "ZeroGradientError",
    "ZeroGradientWarning",
    "adapt_attack",
    "apgd_checkpoints",
    "dlr_loss",
    "make_attack",
    "project_linf",
    "register_attack",
    "restrict_l2",
]
