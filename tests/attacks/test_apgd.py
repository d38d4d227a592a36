"""APGD (Croce & Hein 2020): checkpoints, DLR loss, step-size halving, EOT, and torchattacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comdefend.attacks import APGD, APGDDLR, PGD, apgd_checkpoints, dlr_loss, make_attack
from comdefend.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoints_follow_the_paper() -> None:
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); w_j = ceil(p_j N)
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    for steps in (1, 5, 10, 37, 1000):
        points = apgd_checkpoints(steps)
        assert points == sorted(set(points)) and 1 <= points[0] and points[-1] <= steps


def test_dlr_is_invariant_to_shifting_and_scaling_the_logits() -> None:
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6)
    assert torch.allclose(dlr_loss(3.0 * logits + 7.0, y), dlr_loss(logits, y), atol=1e-5)
    assert (dlr_loss(logits, logits.argmax(1)) < 0).all()  # correct: negative
    with pytest.raises(UsageError, match="at least 3 classes"):
        dlr_loss(logits[:, :2], torch.zeros(6, dtype=torch.long))


class _Peak(nn.Module):
    """Class 0 always wins; the loss of class 0 peaks at ``x = center`` (inside the ball)."""

    def __init__(self, center: torch.Tensor) -> None:
        super().__init__()
        self.center = center

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit_1 = -(x - self.center).square().flatten(1).sum(1)
        # class 0's logit is 1: large enough to always win, small enough that the loss
        # resolves d^2 ~ 1e-7 in float32
        return torch.stack([torch.full_like(logit_1, 1.0), logit_1, logit_1 - 1.0], dim=1)


def test_step_size_halving_converges_to_an_interior_maximum() -> None:
    x = torch.full((2, 1, 2, 2), 0.5)
    center = x + torch.tensor([0.03, -0.02, 0.01, 0.0]).view(1, 1, 2, 2)
    y = torch.zeros(2, dtype=torch.long)
    eps = 0.1
    apgd = APGD(_Peak(center), eps=eps, steps=100, random_start=False)(x, y)
    # the first step is 2 eps = 0.2 (clipped to the ball): without halving the iterates would
    # keep jumping between the faces of the ball, 0.07 or more from the peak
    assert (apgd - center).abs().max() < 0.005
    fixed = PGD(_Peak(center), eps=eps, alpha=0.05, steps=100, random_start=False)(x, y)
    assert (fixed - center).abs().max() > 0.01


class _Scaled(nn.Module):
    """A 3-class linear model with logits scaled by 1e4: the cross-entropy saturates."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0] * 4, [0.0] * 4, [-1.0] * 4]))
            self.linear.bias.copy_(torch.tensor([-1.6, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1e4 * self.linear(x.flatten(1))


def test_dlr_breaks_a_model_whose_cross_entropy_saturates() -> None:
    # class 0 wins while the pixel sum > 1.6, i.e. brightness > 0.4; the images are at 0.45
    model, x = _Scaled(), torch.full((4, 1, 2, 2), 0.45)
    y = torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        assert (model(x).argmax(1) == 0).all()
    ce = APGD(model, eps=0.1, steps=20, random_start=False)(x, y)
    dlr = APGDDLR(model, eps=0.1, steps=20, random_start=False)(x, y)
    with torch.no_grad():
        assert (model(ce).argmax(1) == 0).all()  # zero CE gradient: stuck
        assert (model(dlr).argmax(1) != 0).all()


class _CountingNoisy(nn.Module):
    """A randomized model that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.linear((x + 0.01 * torch.randn_like(x)).flatten(1))


def test_eot_averages_eot_iter_passes_per_step() -> None:
    model = _CountingNoisy()
    x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 2])
    APGD(model, eps=0.05, steps=4, eot_iter=5)(x, y)
    assert model.calls == 5 * (4 + 1)
    with pytest.raises(UsageError, match="eot_iter"):
        APGD(model, eot_iter=0)


def test_restarts_only_retry_unbroken_examples_and_names() -> None:
    model = _CountingNoisy()
    attack = make_attack("APGD-CE", model, eps=0.05, steps=2, restarts=3)
    assert isinstance(attack, APGD) and attack.settings()["restarts"] == 3
    assert make_attack("apgd-dlr", model).settings()["loss"] == "dlr"
    with pytest.raises(UsageError, match="random_start"):
        APGD(model, restarts=2, random_start=False)


class _Sizes(nn.Module):
    """A small fixed CNN that records how many images each call sees."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 10)
        )
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        return self.net(x)


@pytest.mark.parametrize("cls", [APGD, APGDDLR])
def test_stop_when_fooled_keeps_the_outcome_and_drops_fooled_images(cls: type[APGD]) -> None:
    model = _Sizes()
    x = torch.rand(24, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x).argmax(dim=1)
    y[:4] = (y[:4] + 1) % 10  # wrong from the start
    kwargs = {"eps": 0.03, "steps": 12, "seed": 2}
    model.sizes.clear()
    full = cls(model, **kwargs)(x, y)
    full_sizes, model.sizes = model.sizes, []
    stopped = cls(model, stop_when_fooled=True, **kwargs)(x, y)
    with torch.no_grad():
        fooled_full = model.net(full).argmax(dim=1) != y
        fooled_stopped = model.net(stopped).argmax(dim=1) != y
    assert 4 < int(fooled_full.sum()) < len(y)  # a mix, beyond the images wrong from the start
    assert torch.equal(fooled_stopped, fooled_full)  # same trajectories until the first success
    assert torch.allclose(stopped[~fooled_full], full[~fooled_full], atol=1e-6)
    assert full_sizes.count(24) == 13 and model.sizes[0] == 24  # the start and 12 steps
    assert model.sizes.count(24) == 1 and max(model.sizes[1:]) <= 20  # the 4 left at once
    assert sum(model.sizes) < sum(full_sizes)
    assert (stopped - x).abs().max() <= 0.03 + 1e-6
    with pytest.raises(UsageError, match="stop_when_fooled"):
        cls(model, stop_when_fooled=1)


@pytest.fixture(scope="module")
def fashion() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from comdefend import load_dataset
    from comdefend.zoo import load_pretrained

    images = load_dataset("fashion-mnist", "sample")
    return load_pretrained("fashion-cnn").eval(), images.float_images()[:64], images.labels[:64]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_agrees_with_torchattacks_apgd(
    loss: str, fashion: tuple[nn.Module, torch.Tensor, torch.Tensor]
) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    classifier, x, y = fashion
    eps, steps = 2 / 255, 20
    ours = (APGD if loss == "ce" else APGDDLR)(classifier, eps=eps, steps=steps)(x, y)
    theirs = torchattacks.APGD(classifier, eps=eps, steps=steps, loss=loss, seed=0)(x, y)
    with torch.no_grad():
        ours_correct = classifier(ours).argmax(1) == y
        theirs_correct = classifier(theirs).argmax(1) == y
        clean_correct = classifier(x).argmax(1) == y
    assert (ours - x).abs().max() <= eps + 1e-6
    # different random starts: the robust accuracies agree to within 3 of 64 images
    assert abs(int(ours_correct.sum()) - int(theirs_correct.sum())) <= 3
    assert ours_correct.sum() < clean_correct.sum()  # the budget bites
