"""Every ART attack through :func:`art_classifier` gets the zero-gradient guard of comdefend's own.

Issue 21, item 1: ART's FGSM on ``art_classifier(DefendedClassifier(parse_defense("bits:4"),
classifier))`` returned ``x`` unchanged (rounding has a zero gradient), so the defense looked
perfectly robust, while comdefend's FGSM raises :class:`ZeroGradientError` on the same model.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from comdefend.attacks import ZeroGradientError, ZeroGradientWarning
from comdefend.defenses import DefendedClassifier, parse_defense

art = pytest.importorskip("art")

from art.attacks.evasion import (  # noqa: E402
    AutoProjectedGradientDescent,
    BasicIterativeMethod,
    CarliniL2Method,
    DeepFool,
    FastGradientMethod,
    ProjectedGradientDescent,
    ProjectedGradientDescentPyTorch,
)

from comdefend.interop import art_classifier  # noqa: E402
from support import tiny_classifier as _classifier  # noqa: E402

EPS = 8 / 255
#: ART's gradient-based attacks, each reaching the model another way: loss_gradient (NumPy and
#: torch tensors), class_gradient, and a new estimator built from ``estimator.model`` (APGD).
ART_ATTACKS: dict[str, Callable[[Any], Any]] = {
    "fgsm": lambda est: FastGradientMethod(est, eps=EPS),
    "bim": lambda est: BasicIterativeMethod(
        est, eps=EPS, eps_step=EPS / 2, max_iter=2, verbose=False
    ),
    "pgd": lambda est: ProjectedGradientDescent(
        est, eps=EPS, eps_step=EPS / 2, max_iter=2, num_random_init=0, verbose=False
    ),
    "pgd-pytorch": lambda est: ProjectedGradientDescentPyTorch(
        est, eps=EPS, eps_step=EPS / 2, max_iter=2, verbose=False
    ),
    "apgd-ce": lambda est: AutoProjectedGradientDescent(
        est, eps=EPS, eps_step=EPS / 2, max_iter=2, nb_random_init=1, verbose=False
    ),
    "apgd-dlr": lambda est: AutoProjectedGradientDescent(
        est,
        eps=EPS,
        eps_step=EPS / 2,
        max_iter=2,
        nb_random_init=1,
        loss_type="difference_logits_ratio",
        verbose=False,
    ),
    "deepfool": lambda est: DeepFool(est, max_iter=2, verbose=False),
    "cw": lambda est: CarliniL2Method(est, max_iter=2, binary_search_steps=1, verbose=False),
}
MINIMUM_NORM = ("deepfool", "cw")


pytestmark = pytest.mark.usefixtures("one_thread")


def _images() -> np.ndarray:
    return np.random.default_rng(1).random((4, 1, 8, 8), dtype=np.float32)


def _estimator(model: nn.Module, defense: nn.Module | None = None) -> Any:
    return art_classifier(model, defense, input_shape=(1, 8, 8))


@pytest.mark.parametrize("defense_spec", ["bits:4", "jpeg:75"])
@pytest.mark.parametrize("name", list(ART_ATTACKS))
def test_art_attacks_refuse_a_model_that_contains_a_non_differentiable_defense(
    name: str, defense_spec: str
) -> None:
    estimator = _estimator(DefendedClassifier(parse_defense(defense_spec), _classifier()))
    with pytest.raises(ZeroGradientError) as info:
        ART_ATTACKS[name](estimator).generate(_images())
    message = str(info.value)
    assert message.startswith("art_classifier: ")
    assert "exactly zero" in message or "does not depend differentiably" in message  # jpeg
    assert "art_classifier(classifier, defense" in message  # the ART way: a BPDA preprocessor
    assert "make_threat_model_defense(defense, 'bpda', classifier)" in message


@pytest.mark.parametrize("name", list(ART_ATTACKS))
def test_the_same_defense_as_a_bpda_preprocessor_is_attacked(name: str) -> None:
    estimator = _estimator(_classifier(), parse_defense("bits:4"))
    x = _images()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroGradientWarning)
        x_adv = ART_ATTACKS[name](estimator).generate(x)
    if name not in MINIMUM_NORM:
        assert np.abs(x_adv - x).max() > EPS / 2


class _ClampedInput(nn.Module):
    """A differentiable classifier behind a clamp to [0.1, 0.9]: flat on black and white images."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.clamp(0.1, 0.9))


@pytest.mark.parametrize("name", ["fgsm", "apgd-ce", "deepfool"])
def test_a_differentiable_model_flat_on_saturated_images_only_warns(name: str) -> None:
    estimator = _estimator(_ClampedInput(_classifier()))
    saturated = np.concatenate([np.zeros((2, 1, 8, 8)), np.ones((2, 1, 8, 8))]).astype(np.float32)
    for x in (saturated, np.concatenate([saturated, 0.3 + 0.4 * _images()])):
        with pytest.warns(ZeroGradientWarning, match="art_classifier"):
            x_adv = ART_ATTACKS[name](estimator).generate(x)
        if name != "apgd-ce":  # its random start moves them (within the flat region)
            assert np.array_equal(x_adv[:4], saturated)


def test_the_guard_keeps_predictions_and_the_layers_of_a_sequential() -> None:
    classifier = _classifier()
    estimator = _estimator(classifier)
    x = _images()
    with torch.no_grad():
        expected = classifier(torch.from_numpy(x)).numpy()
    assert np.allclose(estimator.predict(x), expected, atol=1e-6)
    assert {"0", "1", "2", "3"} <= set(estimator.layer_names)
    activations = estimator.get_activations(x, "1")
    with torch.no_grad():
        assert np.allclose(activations, classifier[:2](torch.from_numpy(x)).numpy(), atol=1e-6)
