"""The ART adapter: a comdefend defense as an ART preprocessor with BPDA in its backward pass."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch import nn

from comdefend.attacks import PGD
from comdefend.defenses import BPDA, ComDefendDefense, DefendedClassifier, parse_defense

art = pytest.importorskip("art")


@pytest.fixture(scope="module")
def fashion() -> tuple[nn.Module, ComDefendDefense, torch.Tensor, torch.Tensor]:
    """The shipped Fashion-MNIST classifier and ComDefend, and 8 embedded sample images."""
    from comdefend import load_dataset
    from comdefend.zoo import load_pretrained

    torch.set_num_threads(1)
    images = load_dataset("fashion-mnist", "sample")
    defense = ComDefendDefense(load_pretrained("comdefend-fashion-mnist"))
    classifier = load_pretrained("fashion-cnn").eval()
    return classifier, defense, images.float_images()[:8], images.labels[:8]


def test_art_pgd_through_the_adapter_equals_the_built_in_bpda_pgd(fashion) -> None:
    from art.attacks.evasion import ProjectedGradientDescent

    from comdefend.interop import art_classifier

    classifier, defense, x, y = fashion
    estimator = art_classifier(classifier, defense, input_shape=(1, 28, 28))
    # forward: the real (hard-threshold) defense
    with torch.no_grad():
        defended_logits = classifier(defense(x))
    assert np.allclose(estimator.predict(x.numpy()), defended_logits.numpy(), atol=1e-5)

    settings = {"eps": 8 / 255, "eps_step": 2 / 255, "max_iter": 5}
    art_pgd = ProjectedGradientDescent(estimator, num_random_init=0, verbose=False, **settings)
    theirs = torch.from_numpy(art_pgd.generate(x.numpy(), y=y.numpy()))
    ours = PGD(
        DefendedClassifier(BPDA(defense), classifier),
        eps=8 / 255,
        alpha=2 / 255,
        steps=5,
        random_start=False,
    )(x, y)
    assert (theirs - x).abs().max() > 7 / 255  # it did attack
    assert torch.allclose(theirs, ours, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(
            classifier(defense(theirs)).argmax(1), classifier(defense(ours)).argmax(1)
        )


def test_without_the_adapter_art_gets_no_gradient(fashion) -> None:
    """Why the adapter exists: with the defense inside the model ART gets no gradient (and the
    guard of :func:`art_classifier` says so, with the fix, instead of ART's own error)."""
    from art.attacks.evasion import FastGradientMethod

    from comdefend.attacks import ZeroGradientError
    from comdefend.interop import art_classifier

    classifier, defense, x, y = fashion
    naive = art_classifier(DefendedClassifier(defense, classifier), input_shape=(1, 28, 28))
    adapted = art_classifier(classifier, defense, input_shape=(1, 28, 28))
    x_np = x.numpy()
    with pytest.raises(ZeroGradientError, match="does not depend differentiably.*BPDA"):
        FastGradientMethod(naive, eps=8 / 255).generate(x_np, y=y.numpy())
    adapted_adv = FastGradientMethod(adapted, eps=8 / 255).generate(x_np, y=y.numpy())
    assert np.abs(adapted_adv - x_np).max() > 7 / 255


def test_substitute_and_errors() -> None:
    from comdefend.errors import UsageError
    from comdefend.interop import art_preprocessor

    calls = []

    def doubled(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * x

    pre = art_preprocessor(parse_defense("bits:4"), substitute=doubled)
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    out, _ = pre.forward(x)
    out.sum().backward()
    assert torch.allclose(out, parse_defense("bits:4")(x.detach()))  # forward: the defense
    assert torch.equal(x.grad, torch.full_like(x, 2.0)) and calls  # backward: the substitute
    with pytest.raises(UsageError, match="nn.Module"):
        art_preprocessor(lambda x: x)  # type: ignore[arg-type]


def test_module_examples_run() -> None:
    import comdefend.interop.art as module

    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
