"""A comdefend defense in front of an ART estimator, as a preprocessor with BPDA.

ART (the Adversarial Robustness Toolbox, ``pip install "comdefend[interop]"``) models a defense
as a *preprocessor* of its estimator. :func:`art_preprocessor` turns any comdefend defense
(an ``nn.Module`` mapping NCHW images in [0, 1] to images in [0, 1]: ComDefend, JPEG, bit depth,
median, compositions) into an ART ``PreprocessorPyTorch`` whose

* forward pass is the defense itself (hard threshold, real JPEG, ...), so predictions and
  accuracies are those of the defended model, and whose
* backward pass is BPDA (Athalye et al. 2018): the identity by default, or the gradient of a
  differentiable ``substitute`` you pass (e.g. ComDefend's straight-through view,
  ``make_threat_model_defense(defense, "bpda")``).

ART's estimators chain PyTorch preprocessors inside autograd, so every gradient-based ART
attack (FGSM, PGD, C&W, DeepFool, AutoAttack, ...) then attacks the defended model with BPDA
gradients. Without it, an ART attack on a model that contains the defense gets a zero gradient
and silently does nothing.

The estimator must see images the way comdefend does: NCHW floats (``channels_first=True``)
with ``clip_values=(0, 1)``; :func:`art_classifier` builds such a ``PyTorchClassifier``.

Example:
    >>> import numpy as np
    >>> from torch import nn
    >>> from art.attacks.evasion import FastGradientMethod
    >>> from comdefend.defenses import parse_defense
    >>> from comdefend.interop import art_classifier
    >>> classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> estimator = art_classifier(classifier, parse_defense("jpeg:75"), input_shape=(1, 8, 8))
    >>> x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    >>> x_adv = FastGradientMethod(estimator, eps=8 / 255).generate(x)
    >>> bool(np.abs(x_adv - x).max() <= 8 / 255 + 1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from comdefend.defenses.adaptive import BPDA
from comdefend.defenses.detectors import MissingDependencyError
from comdefend.errors import UsageError

INSTALL_HINT = 'pip install "comdefend[interop]" (or: pip install adversarial-robustness-toolbox)'


def _require_art() -> Any:
    try:
        import art.defences.preprocessor.preprocessor as preprocessor
    except ImportError as error:
        raise MissingDependencyError(
            f"the ART adapter needs the Adversarial Robustness Toolbox: {INSTALL_HINT}"
        ) from error
    return preprocessor


@cache
def _preprocessor_class() -> type:
    base = _require_art().PreprocessorPyTorch

    class ComDefendPreprocessor(base):  # type: ignore[misc, valid-type]
        """A comdefend defense as an ART ``PreprocessorPyTorch`` (forward: the defense;
        backward: BPDA). Build it with :func:`comdefend.interop.art_preprocessor`."""

        params = ["bpda"]

        def __init__(
            self,
            defense: nn.Module,
            substitute: Callable[[torch.Tensor], torch.Tensor] | None,
            device_type: str,
            apply_fit: bool,
            apply_predict: bool,
        ) -> None:
            super().__init__(
                device_type=device_type,
                is_fitted=True,
                apply_fit=apply_fit,
                apply_predict=apply_predict,
            )
            self.defense = defense
            self.substitute = substitute
            self.bpda = BPDA(defense, substitute)

        def forward(self, x: torch.Tensor, y: Any | None = None) -> tuple[torch.Tensor, Any]:
            return self.bpda(x), y

        def estimate_forward(self, x: torch.Tensor, y: Any | None = None) -> torch.Tensor:
            return x if self.substitute is None else self.substitute(x)

        def fit(self, x: Any, y: Any | None = None, **kwargs: Any) -> None:
            return None

        def __repr__(self) -> str:
            return f"ComDefendPreprocessor({self.bpda.name})"

    return ComDefendPreprocessor


def art_preprocessor(
    defense: nn.Module,
    substitute: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    device_type: str = "cpu",
    apply_fit: bool = False,
    apply_predict: bool = True,
) -> Any:
    """Wrap ``defense`` as an ART ``PreprocessorPyTorch`` with a BPDA backward pass.

    Args:
        defense: a comdefend defense (``nn.Module``, NCHW [0, 1] -> NCHW [0, 1]).
        substitute: differentiable approximation whose gradient is used in the backward pass;
            ``None`` (default) is the identity, BPDA's usual choice for purifiers. For
            ComDefend, ``make_threat_model_defense(defense, "bpda")`` (straight-through
            threshold) or ``"relaxed"`` (sigmoid) are stronger choices.
        device_type: ART's device argument (``"cpu"`` or ``"gpu"``).
        apply_fit: also apply the defense to training data in ART's ``fit`` (default: no).
        apply_predict: apply it at prediction time (default: yes).

    Returns:
        An ART ``PreprocessorPyTorch`` to put in an estimator's ``preprocessing_defences``.

    Raises:
        MissingDependencyError: ART is not installed.
        UsageError: ``defense`` is not an ``nn.Module``.

    Example:
        >>> from comdefend.defenses import parse_defense
        >>> art_preprocessor(parse_defense("bits:4"))
        ComDefendPreprocessor(bpda(bits:4))
    """
    if not isinstance(defense, nn.Module):
        raise UsageError(f"defense must be an nn.Module, got {type(defense).__name__}")
    if substitute is not None and not callable(substitute):
        raise UsageError(f"substitute must be callable, got {type(substitute).__name__}")
    return _preprocessor_class()(defense, substitute, device_type, apply_fit, apply_predict)


def art_classifier(
    classifier: nn.Module,
    defense: nn.Module | None = None,
    *,
    input_shape: tuple[int, int, int],
    nb_classes: int = 10,
    substitute: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device_type: str = "cpu",
) -> Any:
    """An ART ``PyTorchClassifier`` of ``classifier`` behind ``defense`` (BPDA backward pass).

    Images are NCHW floats in [0, 1] (``channels_first=True``, ``clip_values=(0, 1)``); the
    loss is the cross-entropy; ``classifier`` maps such images to logits (normalisation inside
    it, as everywhere in comdefend).

    Args:
        classifier: images to logits.
        defense: an optional comdefend defense, applied by :func:`art_preprocessor`.
        input_shape: ``(C, H, W)`` of one image.
        nb_classes: number of classes.
        substitute: BPDA substitute (see :func:`art_preprocessor`).
        device_type: ``"cpu"`` or ``"gpu"``.

    Raises:
        MissingDependencyError: ART is not installed.

    Example:
        >>> import numpy as np
        >>> estimator = art_classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        ...                            input_shape=(1, 2, 2), nb_classes=3)
        >>> estimator.predict(np.zeros((1, 1, 2, 2), dtype=np.float32)).shape
        (1, 3)
    """
    _require_art()
    from art.estimators.classification import PyTorchClassifier

    defences = None
    if defense is not None:
        defences = [art_preprocessor(defense, substitute, device_type=device_type)]
    return PyTorchClassifier(
        model=classifier,
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        clip_values=(0.0, 1.0),
        channels_first=True,
        preprocessing_defences=defences,
        device_type=device_type,
    )
