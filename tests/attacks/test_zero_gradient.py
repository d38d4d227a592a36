"""Attacks refuse models without input gradient instead of returning the images unchanged.

Issue 15, item 1: ``FGSM(DefendedClassifier(ComDefendDefense(model), classifier))`` returned
``x`` unchanged (the hard threshold has no gradient), so a defense looked perfectly robust.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from comdefend.attacks import (
    ATTACKS,
    FGSM,
    PGD,
    ZeroGradientError,
    ZeroGradientWarning,
    make_attack,
)
from comdefend.defenses import (
    ComDefendDefense,
    DefendedClassifier,
    make_threat_model_defense,
    parse_defense,
)
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from support import tiny_classifier as _classifier

FAST = {
    "fgsm": {},
    "bim": {"steps": 2},
    "pgd": {"steps": 2},
    "mifgsm": {"steps": 2},
    "apgd-ce": {"steps": 2},
    "apgd-dlr": {"steps": 2},
    "deepfool": {"steps": 2},
    "cw": {"steps": 2, "binary_search_steps": 1},
}
L2 = ("deepfool", "cw")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch() -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    """Images, the classifier's own predictions as labels (all correct) and the classifier."""
    classifier = _classifier()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = classifier(x).argmax(1)
    return x, y, classifier


def _comdefend() -> ComDefendDefense:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ComDefendDefense(ComDefend(ComDefendConfig(image_channels=1)))


def _attack(name: str, model: nn.Module) -> object:
    eps = None if name in L2 else 8 / 255
    return make_attack(name, model, eps=eps, **FAST[name])


@pytest.mark.parametrize("defense_spec", ["comdefend", "jpeg:75", "bits:3"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_attack_refuses_a_non_differentiable_defense(name: str, defense_spec: str) -> None:
    x, y, classifier = _batch()
    defense = _comdefend() if defense_spec == "comdefend" else parse_defense(defense_spec)
    with pytest.raises(ZeroGradientError) as info:
        _attack(name, DefendedClassifier(defense, classifier))(x, y)  # type: ignore[operator]
    message = str(info.value)
    assert "exactly zero" in message or "does not depend differentiably" in message
    assert "make_threat_model_defense(defense, 'bpda', classifier)" in message
    assert "bpda+eot" in message and name in message


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_bpda_view_of_the_same_defense_is_attacked(name: str) -> None:
    x, y, classifier = _batch()
    view = make_threat_model_defense(_comdefend(), "bpda", classifier)
    x_adv = _attack(name, view)(x, y)  # type: ignore[operator]
    if name not in L2:  # two steps of a minimum-norm attack may not flip any image: no change
        assert (x_adv != x).any()


def test_issue_example_fgsm_and_pgd_without_random_start() -> None:
    x, y, classifier = _batch()
    defended = DefendedClassifier(_comdefend(), classifier)
    for attack in (FGSM(defended, eps=8 / 255), PGD(defended, eps=8 / 255, random_start=False)):
        with pytest.raises(ZeroGradientError, match="bpda"):
            attack(x, y)


def test_frozen_classifier_behind_detached_defense_names_the_wrappers() -> None:
    x, y, classifier = _batch()
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ZeroGradientError, match="does not depend differentiably.*bpda"):
        FGSM(DefendedClassifier(parse_defense("jpeg:75"), classifier))(x, y)


class _FlatForSome(nn.Module):
    """The classifier, but images whose first pixel is above 0.5 are replaced by a constant."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = (x[:, :1, :1, :1] > 0.5).to(x.dtype)
        return self.classifier(x * (1 - flat) + 0.5 * flat)


def test_some_flat_images_warn_and_the_others_are_attacked() -> None:
    x, y, classifier = _batch()
    x[:2, 0, 0, 0], x[2:, 0, 0, 0] = 0.9, 0.1
    model = _FlatForSome(classifier)
    with torch.no_grad():
        y = model(x).argmax(1)
    with pytest.warns(ZeroGradientWarning, match="2 of 4"):
        x_adv = FGSM(model, eps=8 / 255)(x, y)
    assert torch.equal(x_adv[:2], x[:2]) and (x_adv[2:] != x[2:]).any()


def test_only_correctly_classified_images_matter() -> None:
    x, y, classifier = _batch()
    defended = DefendedClassifier(_comdefend(), classifier)
    with torch.no_grad():
        wrong = (defended(x).argmax(1) + 1) % 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(FGSM(defended)(x, wrong), x)  # nothing left to attack: no error


def test_saturated_cross_entropy_is_not_mistaken_for_a_flat_model() -> None:
    # logit margin 400: the cross-entropy gradient underflows to exactly 0 in float32, but
    # the model has a gradient (the margin's), so no error; FGSM's step is then zero.
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[100.0] * 4, [-100.0] * 4]))
        model[1].bias.zero_()
    x = torch.full((2, 1, 2, 2), 0.5)
    y = torch.zeros(2, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(FGSM(model, eps=0.1)(x, y), x)


# Issue 21, item 5: whether an attack raises must not depend on how the batch is composed. A
# differentiable model that is flat on some images (here black and white ones, in front of a
# clamp) warns on a batch of only those images as on a mixed one; a non-differentiable defense
# raises on both.


class _ClampedInput(nn.Module):
    """A differentiable classifier behind a clamp to [0.1, 0.9]: flat on black and white images."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.clamp(0.1, 0.9))


def _saturated_and_mixed() -> tuple[torch.Tensor, torch.Tensor]:
    """Two black and two white images, and the same four followed by four mid-grey ones."""
    saturated = torch.cat([torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)])
    middle = 0.3 + 0.4 * torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    return saturated, torch.cat([saturated, middle])


def _labelled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_flat_images_of_a_differentiable_model_warn_whatever_the_batch(name: str) -> None:
    model = _ClampedInput(_classifier())
    for x in _saturated_and_mixed():
        y = _labelled(model, x)
        with pytest.warns(ZeroGradientWarning, match=f"{name}: 4 of {x.shape[0]}|{name}: all 4"):
            x_adv = _attack(name, model)(x, y)  # type: ignore[operator]
        if name not in L2 and x.shape[0] > 4:
            assert (x_adv[4:] != x[4:]).any()  # the images with a gradient are attacked


def test_flat_images_fgsm_result_does_not_depend_on_the_batch() -> None:
    model = _ClampedInput(_classifier())
    saturated, mixed = _saturated_and_mixed()
    results = []
    for x in (saturated, mixed):
        with pytest.warns(ZeroGradientWarning):
            results.append(FGSM(model, eps=8 / 255)(x, _labelled(model, x))[:4])
    assert torch.equal(results[0], saturated) and torch.equal(results[1], saturated)


@pytest.mark.parametrize("defense_spec", ["comdefend", "jpeg:75", "bits:3"])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_non_differentiable_defense_raises_on_saturated_batches_too(
    name: str, defense_spec: str
) -> None:
    defense = _comdefend() if defense_spec == "comdefend" else parse_defense(defense_spec)
    model = DefendedClassifier(defense, _classifier())
    for x in _saturated_and_mixed():
        with pytest.raises(ZeroGradientError, match="bpda"):
            _attack(name, model)(x, _labelled(model, x))  # type: ignore[operator]


def test_an_adapted_attack_gets_the_same_decision() -> None:
    from comdefend.attacks import adapt_attack

    adapted = adapt_attack("identity", lambda model, eps: lambda x, y: x, register=False)
    saturated, _ = _saturated_and_mixed()
    model = _ClampedInput(_classifier())
    with pytest.warns(ZeroGradientWarning):
        adapted(model, eps=8 / 255)(saturated, _labelled(model, saturated))
    defended = DefendedClassifier(parse_defense("bits:3"), _classifier())
    with pytest.raises(ZeroGradientError, match="bpda"):
        adapted(defended, eps=8 / 255)(saturated, _labelled(defended, saturated))
