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
and would silently do nothing.

The estimator must see images the way comdefend does: NCHW floats (``channels_first=True``)
with ``clip_values=(0, 1)``; :func:`art_classifier` builds such a ``PyTorchClassifier``. Its
model carries the guard of comdefend's own attacks (:func:`guard_zero_gradient`): an ART
attack on a model without input gradient (``art_classifier(DefendedClassifier(defense,
classifier))``) raises :class:`~comdefend.attacks.ZeroGradientError` instead of returning its
input unchanged, whichever way the attack reaches the gradient.

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

from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from comdefend.attacks.base import (
    GRADIENT_HELP,
    ZeroGradientError,
    report_flat_images,
    zero_input_jacobian,
)
from comdefend.defenses.adaptive import BPDA
from comdefend.defenses.detectors import MissingDependencyError
from comdefend.errors import UsageError

INSTALL_HINT = 'pip install "comdefend[interop]" (or: pip install adversarial-robustness-toolbox)'

#: Who speaks in the guard's errors and warnings.
GUARD_NAME = "art_classifier"
#: What to do about a model without input gradient under ART; ends the guard's messages.
ART_GRADIENT_HELP = (
    "give ART the defense as a BPDA preprocessor, art_classifier(classifier, defense, "
    "input_shape=..., substitute=...), not a model that contains it; or " + GRADIENT_HELP
)
#: Seed of the guard's random probes (fixed: the same model gets the same verdict).
GUARD_SEED = 0


class _ZeroGradientCheck(torch.autograd.Function):
    """Identity whose backward pass checks the gradient that reached the classifier's input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, guard: _InputGuard) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.guard = guard
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        zero_rows = grad.flatten(1).abs().amax(dim=1) == 0
        if bool(zero_rows.any()):
            ctx.guard.check(x.detach(), zero_rows)
        return grad, None


class _InputGuard(nn.Module):
    """First layer of a guarded classifier: the identity, with the gradient check behind it.

    Its backward pass is free unless a row of the gradient is exactly zero. Such a row may come
    from a saturated loss (then the classifier's Jacobian there is not zero: nothing to say) or
    from images where the classifier is flat; those go to the decision that comdefend's attacks
    take (:func:`comdefend.attacks.base.report_flat_images`): an error for a classifier flat
    everywhere, a warning for one flat only on some images.
    """

    classifier: nn.Module

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        # Not a submodule: its layers are registered once, in the guarded Sequential.
        self.__dict__["classifier"] = classifier
        #: The autograd node of the check in the current forward pass (None: not armed), for
        #: the output guard, which clears it.
        self.node: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            self.node = None
            return x
        guarded = _ZeroGradientCheck.apply(x, self)
        self.node = guarded.grad_fn
        return guarded

    def check(self, x: torch.Tensor, zero_rows: torch.Tensor) -> None:
        generator = torch.Generator().manual_seed(GUARD_SEED)
        with torch.enable_grad():
            flat = torch.zeros_like(zero_rows)
            flat[zero_rows] = zero_input_jacobian(
                self.classifier, x[zero_rows], generator=generator
            )
            report_flat_images(
                self.classifier,
                x[flat],
                x.shape[0],
                name=GUARD_NAME,
                images="image(s)",
                advice=ART_GRADIENT_HELP,
                generator=generator,
                stacklevel=2,
            )


class _OutputGuard(nn.Module):
    """Last layer of a guarded classifier: the identity, refusing logits cut off from the input.

    When the input guard was armed (an input that requires a gradient, as in every white-box
    attack) but the logits' autograd graph does not reach it (JPEG or another detached step
    inside the classifier), ART would fail later with a message that does not say why
    (``Gradient term in PyTorch model is None``, or an ``AxisError`` in C&W and DeepFool).
    """

    input_guard: _InputGuard

    def __init__(self, input_guard: _InputGuard) -> None:
        super().__init__()
        self.__dict__["input_guard"] = input_guard

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        node, self.input_guard.node = self.input_guard.node, None
        if node is not None and not _reaches(logits, node):
            raise ZeroGradientError(
                f"{GUARD_NAME}: the model's output does not depend differentiably on its "
                f"input (no gradient at all), so a gradient-based attack cannot move the "
                f"images; {ART_GRADIENT_HELP}"
            )
        return logits


def _reaches(output: torch.Tensor, target: Any) -> bool:
    """Whether ``output``'s autograd graph holds the node ``target``."""
    stack = [output.grad_fn]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        if node is target:
            return True
        seen.add(id(node))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def guard_zero_gradient(classifier: nn.Module) -> nn.Sequential:
    """``classifier`` between two identity layers that refuse a model without input gradient.

    What :func:`art_classifier` hands to ART as the model, so that every ART attack, however it
    reaches the gradient (``loss_gradient``, ``class_gradient``, a new estimator built from
    ``estimator.model`` as ART's APGD and AutoAttack do, or autograd directly), gets the check of
    comdefend's own attacks: :class:`~comdefend.attacks.ZeroGradientError` when the classifier
    has no input gradient anywhere (a non-differentiable defense inside it), a
    :class:`~comdefend.attacks.ZeroGradientWarning` when it is flat on some images only
    (black or saturated ones, say). A check costs nothing unless a row of the gradient is
    exactly zero (then one or two extra forward and backward passes, see
    :func:`comdefend.attacks.base.report_flat_images`).

    It is an ``nn.Sequential`` (``zero_gradient_guard``, the layers, ``zero_gradient_check``):
    the layers of a plain ``nn.Sequential`` classifier keep their names there, so ART's
    ``layer_names`` and ``get_activations`` still see them; any other classifier is one layer,
    ``classifier``. Outputs are the classifier's own.

    Example:
        >>> guarded = guard_zero_gradient(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)))
        >>> list(dict(guarded.named_children()))
        ['zero_gradient_guard', '0', '1', 'zero_gradient_check']
    """
    if type(classifier) is nn.Sequential:
        layers = list(classifier.named_children())
    else:
        layers = [("classifier", classifier)]
    guard = _InputGuard(classifier)
    return nn.Sequential(
        OrderedDict(
            [("zero_gradient_guard", guard), *layers, ("zero_gradient_check", _OutputGuard(guard))]
        )
    )


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
        In an estimator of your own, pass ``guard_zero_gradient(classifier)`` as its model to
        keep the zero-gradient check that :func:`art_classifier` adds.

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
    it, as everywhere in comdefend). The estimator's model is ``classifier`` behind
    :func:`guard_zero_gradient`: an ART attack on a classifier without input gradient (one that
    contains a non-differentiable defense: pass the defense as ``defense`` instead) raises
    :class:`~comdefend.attacks.ZeroGradientError` rather than returning its input unchanged.

    Args:
        classifier: images to logits.
        defense: an optional comdefend defense, applied by :func:`art_preprocessor`.
        input_shape: ``(C, H, W)`` of one image.
        nb_classes: number of classes.
        substitute: BPDA substitute (see :func:`art_preprocessor`).
        device_type: ``"cpu"`` or ``"gpu"``.

    Raises:
        MissingDependencyError: ART is not installed.
        UsageError: ``classifier`` is not an ``nn.Module``.
        ZeroGradientError: later, from an ART attack, when the classifier has no input gradient.

    Example:
        >>> import numpy as np
        >>> estimator = art_classifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)),
        ...                            input_shape=(1, 2, 2), nb_classes=3)
        >>> estimator.predict(np.zeros((1, 1, 2, 2), dtype=np.float32)).shape
        (1, 3)
    """
    _require_art()
    from art.estimators.classification import PyTorchClassifier

    if not isinstance(classifier, nn.Module):
        raise UsageError(f"classifier must be an nn.Module, got {type(classifier).__name__}")
    defences = None
    if defense is not None:
        defences = [art_preprocessor(defense, substitute, device_type=device_type)]
    return PyTorchClassifier(
        model=guard_zero_gradient(classifier),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=nb_classes,
        clip_values=(0.0, 1.0),
        channels_first=True,
        preprocessing_defences=defences,
        device_type=device_type,
    )
