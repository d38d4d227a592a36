"""Untargeted evasion attacks on image classifiers (native PyTorch, batched, seeded).

L-inf: :class:`FGSM`, :class:`BIM`, :class:`PGD`, :class:`MIFGSM`. Minimum-norm L2:
:class:`DeepFool`, :class:`CW`. Build one by name with :func:`make_attack`.
"""

from comdefend.attacks.base import Attack, restrict_l2
from comdefend.attacks.cw import CW
from comdefend.attacks.deepfool import DeepFool
from comdefend.attacks.linf import BIM, FGSM, MIFGSM, PGD, project_linf
from comdefend.attacks.registry import ATTACKS, make_attack

__all__ = [
    "ATTACKS",
    "BIM",
    "CW",
    "FGSM",
    "MIFGSM",
    "PGD",
    "Attack",
    "DeepFool",
    "make_attack",
    "project_linf",
    "restrict_l2",
]
