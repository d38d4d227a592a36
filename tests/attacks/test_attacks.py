"""Tests of comdefend.attacks: closed forms on linear models, budgets, determinism, strength."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comdefend.attacks import ATTACKS, BIM, CW, FGSM, MIFGSM, PGD, Attack, DeepFool, make_attack
from comdefend.attacks.linf import uniform_start
from comdefend.errors import UsageError

LINF = ["fgsm", "bim", "pgd", "mifgsm", "apgd-ce", "apgd-dlr"]
L2 = ["deepfool", "cw"]


pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {  # small settings so that every test stays well under a second
    "fgsm": {},
    "bim": {"steps": 3},
    "pgd": {"steps": 3},
    "mifgsm": {"steps": 3},
    "apgd-ce": {"steps": 5},
    "apgd-dlr": {"steps": 5},
    "deepfool": {"steps": 5},
    "cw": {"steps": 5, "binary_search_steps": 2, "lr": 0.05},
}


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    return _seeded(
        seed,
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(16, classes),
        ),
    )


def random_batch(n: int = 4, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 6, 6, generator=g)
    x[:, 0, 0, :] = 0.0  # pixels on the box's faces: clipping must keep them in [0, 1]
    x[:, 0, 1, :] = 1.0
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def linear_model(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    model = model.to(weight.dtype)
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def l2_norms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1)


# ------------------------------------------------------------------ synthetic separable problem


def brightness_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0: mean brightness 0.35, class 1: 0.65, plus uniform noise of +-0.1 per pixel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    noise = (torch.rand(n, 1, 8, 8, generator=g) - 0.5) * 0.2
    return (0.35 + 0.3 * y.view(-1, 1, 1, 1).float() + noise).clamp(0, 1), y


@pytest.fixture(scope="module")
def synthetic() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = _seeded(
        0,
        lambda: nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        ),
    )
    x_train, y_train = brightness_data(64, seed=1)
    params = list(model.parameters())
    for _ in range(200):  # plain gradient descent: fast, and no optimizer start-up cost
        grads = torch.autograd.grad(F.cross_entropy(model(x_train), y_train), params)
        with torch.no_grad():
            for param, grad in zip(params, grads, strict=True):
                param -= 0.5 * grad
    model.eval()
    x, y = brightness_data(48, seed=2)
    assert accuracy(model, x, y) == 1.0  # the premise of every strength test below
    return model, x, y


# --------------------------------------------------------------------------------- closed forms


def test_fgsm_linear_model_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(2, 12, generator=g), torch.randn(2, generator=g)
    model = linear_model(weight, bias)
    x = 0.5 + 0.1 * (torch.rand(6, 3, 2, 2, generator=g) - 0.5)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    eps = 0.03
    x_adv = FGSM(model, eps=eps)(x, y)
    # d CE / d x = (p_wrong) * (W[wrong] - W[true]) with p_wrong > 0
    direction = (weight[1 - y] - weight[y]).sign().view_as(x)
    assert torch.allclose(x_adv, x + eps * direction, atol=1e-7)


@pytest.mark.parametrize("overshoot", [0.02, 0.0])
def test_deepfool_linear_binary_lands_past_boundary(overshoot: float) -> None:
    g = torch.Generator().manual_seed(1)
    weight = 0.3 * torch.randn(2, 12, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(2, generator=g, dtype=torch.float64)
    model = linear_model(weight, bias)
    x = 0.5 + 0.1 * (torch.rand(8, 3, 2, 2, generator=g, dtype=torch.float64) - 0.5)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    x_adv = DeepFool(model, overshoot=overshoot)(x, y)
    assert x_adv.dtype == torch.float64
    assert (model(x_adv).argmax(dim=1) != y).all()

    delta = (x_adv - x).flatten(1)
    w_diff = weight[1 - y] - weight[y]
    margin = (logits.gather(1, y.view(-1, 1)) - logits.gather(1, (1 - y).view(-1, 1))).squeeze(1)
    assert (margin > 0).all()
    # one linear step: (|margin| + 1e-4) / ||w|| along w, scaled by (1 + overshoot)
    expected = (margin + 1e-4) / w_diff.norm(dim=1) * (1 + overshoot)
    assert torch.allclose(delta.norm(dim=1), expected, rtol=1e-6)
    assert torch.allclose(F.cosine_similarity(delta, w_diff, dim=1), torch.ones(8, dtype=x.dtype))


# ------------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("eps", [0.0, 2 / 255, 8 / 255])
@pytest.mark.parametrize("name", LINF)
def test_linf_attacks_stay_in_budget_and_box(name: str, eps: float) -> None:
    model = tiny_cnn()
    x, y = random_batch()
    x_adv = make_attack(name, model, eps=eps, **FAST[name])(x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= eps + 1e-6
    if eps == 0:
        assert torch.equal(x_adv, x)
    else:
        assert (x_adv != x).any()


def test_pgd_restarts_stay_in_budget() -> None:
    x, y = random_batch()
    x_adv = PGD(tiny_cnn(), eps=4 / 255, steps=2, restarts=3)(x, y)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("name", L2)
def test_minimum_norm_attacks_respect_l2_budget(
    name: str, synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor]
) -> None:
    model, x, y = synthetic
    settings = {"cw": {"steps": 30, "lr": 0.05, "binary_search_steps": 3}}.get(name, {})
    free = make_attack(name, model, **settings)(x, y)
    budget = l2_norms(free, x).median().item()
    bounded = make_attack(name, model, eps=budget, **settings)(x, y)
    norms = l2_norms(bounded, x)
    unperturbed = norms == 0
    assert (norms <= budget + 1e-6).all()
    assert unperturbed.any() and (~unperturbed).any()  # the budget bites, but not everywhere
    assert torch.equal(bounded[unperturbed], x[unperturbed])
    assert torch.equal(bounded[~unperturbed], free[~unperturbed])
    assert torch.equal(make_attack(name, model, eps=0.0, **settings)(x, y), x)


# ------------------------------------------------------------------- determinism and hygiene


@pytest.mark.parametrize("name", list(ATTACKS))
def test_same_seed_gives_identical_output(name: str) -> None:
    model = tiny_cnn()
    x, y = random_batch()
    first = make_attack(name, model, seed=3, **FAST[name])(x, y)
    attack = make_attack(name, model, seed=3, **FAST[name])
    assert torch.equal(attack(x, y), first)
    assert torch.equal(attack(x, y), first)  # a second call on the same object too


def test_pgd_seed_changes_random_start() -> None:
    model = tiny_cnn()
    x, y = random_batch()
    a = PGD(model, eps=8 / 255, steps=1, seed=0)(x, y)
    b = PGD(model, eps=8 / 255, steps=1, seed=1)(x, y)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", list(ATTACKS))
def test_no_parameter_grads_and_mode_untouched(name: str, training: bool) -> None:
    model = tiny_cnn().train(training)
    x, y = random_batch()
    make_attack(name, model, **FAST[name])(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training == training for m in model.modules())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_works_under_no_grad_and_on_empty_batch(name: str) -> None:
    model = tiny_cnn()
    x, y = random_batch()
    attack = make_attack(name, model, **FAST[name])
    with torch.no_grad():
        inside = attack(x, y)
    assert torch.equal(inside, attack(x, y))
    empty = attack(x[:0], y[:0])
    assert empty.shape == (0, 3, 6, 6)


@pytest.mark.parametrize("name", ["bim", "deepfool"])
def test_per_example_result_does_not_depend_on_batch(name: str) -> None:
    model = tiny_cnn()
    x, y = random_batch(6)
    attack = make_attack(name, model, **FAST[name])
    assert torch.allclose(attack(x, y)[:2], attack(x[:2], y[:2]), atol=1e-6)


# ---------------------------------------------------------------------------------- strength


@pytest.mark.parametrize("name", [n for n in LINF if n != "apgd-dlr"])  # DLR: 3+ classes
def test_linf_attacks_break_the_synthetic_model(
    name: str, synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor]
) -> None:
    model, x, y = synthetic
    # The classes' mean brightness is 0.15 from the boundary: eps 0.05 cannot flip them,
    # eps 0.25 flips all of them.
    assert accuracy(model, make_attack(name, model, eps=0.05)(x, y), y) == 1.0
    assert accuracy(model, make_attack(name, model, eps=0.25)(x, y), y) <= 0.05


@pytest.mark.parametrize("eps", [0.14, 0.15, 0.16])
def test_pgd_at_least_as_strong_as_fgsm(
    eps: float, synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor]
) -> None:
    model, x, y = synthetic
    fgsm = FGSM(model, eps=eps)(x, y)
    pgd = PGD(model, eps=eps, steps=20)(x, y)
    with torch.no_grad():
        fgsm_fooled = model(fgsm).argmax(dim=1) != y
        pgd_fooled = model(pgd).argmax(dim=1) != y
    assert pgd_fooled.sum() >= fgsm_fooled.sum()
    if eps == 0.15:  # a partial success for FGSM: the comparison is not trivially 0 >= 0
        assert 0 < fgsm_fooled.sum() < len(y)


def test_pgd_restarts_keep_first_success_and_best_loss() -> None:
    # logit_1 - logit_0 = 10 (x[0] - 0.5): the true class 0 flips when pixel 0 passes 0.5.
    weight = torch.zeros(2, 4)
    weight[1, 0] = 10.0
    model = linear_model(weight, torch.tensor([0.0, -5.0]))
    x = torch.full((64, 1, 2, 2), 0.45)
    y = torch.zeros(64, dtype=torch.long)
    # alpha = 0: PGD is a pure random search, one uniform start per restart.
    one = PGD(model, eps=0.1, alpha=0.0, steps=1, restarts=1, seed=5)(x, y)
    many = PGD(model, eps=0.1, alpha=0.0, steps=1, restarts=5, seed=5)(x, y)
    with torch.no_grad():
        logits_one, logits_many = model(one), model(many)
    fooled_one = logits_one.argmax(dim=1) != y
    fooled_many = logits_many.argmax(dim=1) != y
    assert 0 < fooled_one.sum() < fooled_many.sum()
    assert fooled_many[fooled_one].all()
    assert torch.equal(many[fooled_one], one[fooled_one])  # the first success is kept
    loss_one = F.cross_entropy(logits_one, y, reduction="none")
    loss_many = F.cross_entropy(logits_many, y, reduction="none")
    assert (loss_many >= loss_one - 1e-6).all()


def test_deepfool_flips_synthetic_model_with_small_l2(
    synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = synthetic
    x_adv = DeepFool(model)(x, y)
    assert accuracy(model, x_adv, y) == 0.0
    # moving all 64 pixels by 0.15 costs an L2 of 1.2; DeepFool should be close to that
    assert l2_norms(x_adv, x).max() < 1.6


def test_cw_succeeds_with_smaller_l2_than_pgd(
    synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = synthetic
    x_adv = CW(model, steps=40, lr=0.05, binary_search_steps=3)(x, y)
    with torch.no_grad():
        fooled = model(x_adv).argmax(dim=1) != y
    assert fooled.float().mean() >= 0.9
    assert torch.equal(x_adv[~fooled], x[~fooled])  # failures come back clean
    cw_l2 = l2_norms(x_adv, x)[fooled]
    pgd_l2 = l2_norms(PGD(model, eps=0.25)(x, y), x)
    assert cw_l2.max() < 1.6
    assert cw_l2.median() < pgd_l2.median()


class _UnflippableModel(nn.Module):
    """Predicts class 0 whatever the input in [0, 1] (a tiny gradient): no attack can succeed."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([3.0, 0.0, -1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        only_class_0 = torch.tensor([1.0, 0.0, 0.0])
        return self.bias + 0.01 * x.mean(dim=(1, 2, 3)).unsqueeze(1) * only_class_0


@pytest.mark.parametrize("name", L2)
def test_minimum_norm_attacks_return_clean_input_on_failure(name: str) -> None:
    x, y = random_batch(classes=1)
    model = _UnflippableModel()
    x_adv = make_attack(name, model, **FAST[name])(x, y)
    assert torch.equal(x_adv, x)
    assert model.bias.grad is None


def test_cw_binary_search_raises_c_until_success(
    synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = synthetic
    x, y = x[:8], y[:8]
    # c = 0.01 is far too small: one round fails everywhere and returns the clean images;
    # more rounds multiply c by 10 until the attack succeeds.
    assert torch.equal(CW(model, c=0.01, steps=30, lr=0.05, binary_search_steps=1)(x, y), x)
    x_adv = CW(model, c=0.01, steps=30, lr=0.05, binary_search_steps=4)(x, y)
    assert accuracy(model, x_adv, y) == 0.0


# ------------------------------------------------------------------ registry, settings, errors


def test_registry_names_and_norms() -> None:
    assert set(ATTACKS) == {"fgsm", "bim", "pgd", "mifgsm", "deepfool", "cw", "apgd-ce", "apgd-dlr"}
    for name, cls in ATTACKS.items():
        assert issubclass(cls, Attack) and cls.name == name
        assert cls.norm == ("l2" if name in L2 else "linf")


@pytest.mark.parametrize("name", list(ATTACKS))
def test_settings_list_every_hyperparameter(name: str) -> None:
    attack = make_attack(name.upper(), nn.Linear(2, 2), seed=7)
    settings = attack.settings()
    params = set(inspect.signature(type(attack).__init__).parameters) - {"self", "model"}
    assert settings["name"] == name and settings["norm"] == attack.norm
    assert params <= set(settings) and settings["seed"] == 7
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in settings.values())


def test_defaults_and_derived_step_sizes() -> None:
    model = nn.Linear(2, 2)
    assert math.isclose(BIM(model).alpha, 2 / 255)
    assert math.isclose(BIM(model, eps=0.1, steps=5).alpha, 0.05)
    assert math.isclose(PGD(model).alpha, 2 / 255)
    assert math.isclose(MIFGSM(model, eps=0.1, steps=4).alpha, 0.025)
    assert make_attack("pgd", model, eps=0.1, alpha=0.01).settings()["alpha"] == 0.01


def test_make_attack_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UsageError) as info:
        make_attack("carlini", nn.Linear(2, 2))
    assert all(name in str(info.value) for name in ATTACKS)
    with pytest.raises(UsageError, match="decay"):
        make_attack("pgd", nn.Linear(2, 2), decay=0.5)


@pytest.mark.parametrize("eps", [-0.01, 1.5, float("nan"), float("inf"), "8/255", True])
@pytest.mark.parametrize("name", LINF)
def test_bad_linf_eps_raises(name: str, eps: object) -> None:
    with pytest.raises(UsageError, match="eps"):
        make_attack(name, nn.Linear(2, 2), eps=eps)


@pytest.mark.parametrize(
    ("cls", "kwargs", "word"),
    [
        (BIM, {"steps": 0}, "steps"),
        (PGD, {"steps": 2.5}, "steps"),
        (PGD, {"alpha": -1.0}, "alpha"),
        (PGD, {"restarts": 0}, "restarts"),
        (PGD, {"restarts": 2, "random_start": False}, "random_start"),
        (MIFGSM, {"decay": -1.0}, "decay"),
        (DeepFool, {"num_classes": 1}, "num_classes"),
        (DeepFool, {"overshoot": -0.1}, "overshoot"),
        (DeepFool, {"eps": -1.0}, "eps"),
        (CW, {"c": 0.0}, "c"),
        (CW, {"lr": 0.0}, "lr"),
        (CW, {"kappa": -1.0}, "kappa"),
        (CW, {"binary_search_steps": 0}, "binary_search_steps"),
        (FGSM, {"seed": -1}, "seed"),
    ],
)
def test_bad_hyperparameters_raise(cls: type[Attack], kwargs: dict, word: str) -> None:
    with pytest.raises(UsageError, match=word):
        cls(nn.Linear(2, 2), **kwargs)


def test_bad_inputs_raise() -> None:
    attack = FGSM(tiny_cnn())
    x, y = random_batch()
    bad = [
        (x[0], y, "4-D"),
        ((x * 255).to(torch.uint8), y, "floating"),
        (x + 1.0, y, r"\[0, 1\]"),
        (x.masked_fill(x > 0.5, float("nan")), y, "NaN"),
        (x, y.int(), "int64"),
        (x, y[:2], "one label per image"),
        (x, y.view(2, 2), "one label per image"),
        (x, -y - 1, "non-negative"),
        (x, y + 10, "out of range"),
        (x.tolist(), y, "Tensor"),
    ]
    for xb, yb, message in bad:
        with pytest.raises(UsageError, match=message):
            attack(xb, yb)


def test_non_differentiable_model_and_inference_mode_raise() -> None:
    x, y = random_batch()
    model = tiny_cnn()
    with pytest.raises(UsageError, match="differentiabl"):
        FGSM(lambda images: model(images).detach())(x, y)
    with torch.inference_mode(), pytest.raises(UsageError, match="inference_mode"):
        FGSM(model)(x, y)


def test_mifgsm_without_momentum_is_bim() -> None:
    model = tiny_cnn()
    x, y = random_batch()
    no_momentum = MIFGSM(model, eps=8 / 255, alpha=1 / 255, steps=4, decay=0.0)(x, y)
    assert torch.equal(no_momentum, BIM(model, eps=8 / 255, alpha=1 / 255, steps=4)(x, y))
    with_momentum = MIFGSM(model, eps=8 / 255, alpha=1 / 255, steps=4, decay=1.0)(x, y)
    assert not torch.equal(with_momentum, no_momentum)


ITERATIVE = {"bim": BIM, "pgd": PGD, "mifgsm": MIFGSM}


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_stop_when_fooled_leaves_each_image_at_its_first_fooling_iterate(name: str) -> None:
    # A fixed alpha: the k-step attack's output is then the k-th iterate of a longer one.
    model = tiny_cnn(seed=3)
    x, y = random_batch(n=16, seed=3)
    kwargs = {"eps": 0.2, "alpha": 0.02, "seed": 1}
    steps = 8
    iterates = [ITERATIVE[name](model, steps=k, **kwargs)(x, y) for k in range(1, steps + 1)]
    start = uniform_start(x, 0.2, torch.Generator().manual_seed(1)) if name == "pgd" else x
    iterates.insert(0, start)  # PGD's 0-th iterate is its random start
    with torch.no_grad():
        fooled = torch.stack([model(it).argmax(dim=1) != y for it in iterates[:steps]])
    expected = iterates[steps].clone()
    for i in range(len(y)):
        first = fooled[:, i].nonzero()
        if len(first):
            expected[i] = iterates[int(first[0])][i]
    stopped = ITERATIVE[name](model, steps=steps, stop_when_fooled=True, **kwargs)(x, y)
    assert torch.allclose(stopped, expected, atol=1e-6)
    # a real mix: some images stop early, some are fooled only at the end, some never
    assert 0 < int(fooled.any(dim=0).sum()) < len(y)
    assert accuracy(model, stopped, y) <= accuracy(model, iterates[steps], y)


@pytest.mark.parametrize("name", list(ITERATIVE))
def test_stop_when_fooled_spends_no_steps_on_fooled_images(name: str) -> None:
    recorder = _Recorder(tiny_cnn(seed=4))
    x, y = random_batch(n=8, seed=4)
    with torch.no_grad():
        y = recorder.model(x).argmax(dim=1)
    y[:3] = (y[:3] + 1) % 10  # three images the model gets wrong to begin with
    attack = ITERATIVE[name](recorder, eps=1 / 255, steps=5, stop_when_fooled=True)
    x_adv = attack(x, y)
    sizes = [len(batch) for batch in recorder.seen]
    assert sizes[0] == 8 and all(size <= 5 for size in sizes[1:])
    if name != "pgd":  # no random start: the misclassified images come back untouched
        assert torch.equal(x_adv[:3], x[:3])
    assert attack.settings()["stop_when_fooled"] is True


def test_stop_when_fooled_must_be_a_bool() -> None:
    with pytest.raises(UsageError, match="stop_when_fooled"):
        BIM(nn.Linear(2, 2), stop_when_fooled="yes")


class _Recorder(nn.Module):
    """Wraps a model and keeps every batch it is called on."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.model(x)


def test_cw_returns_the_smallest_successful_iterate(
    synthetic: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = synthetic
    x, y = x[:6], y[:6]
    recorder = _Recorder(model)
    x_adv = CW(recorder, c=10.0, steps=15, lr=0.05, binary_search_steps=2)(x, y)
    assert len(recorder.seen) == 31  # the gradient probe on x, then 2 rounds of 15 steps
    assert torch.equal(recorder.seen[0], x)
    iterates = torch.stack(recorder.seen[1:])  # (30, N, C, H, W)
    with torch.no_grad():
        fooled = torch.stack([model(it).argmax(dim=1) != y for it in iterates])  # (30, N)
    l2 = (iterates - x).flatten(2).norm(dim=2).masked_fill(~fooled, float("inf"))
    best = l2.argmin(dim=0)
    assert fooled.any(dim=0).all()
    assert torch.allclose(x_adv, iterates[best, torch.arange(len(y))], atol=1e-6)


@pytest.mark.parametrize("num_classes", [3, 2])
def test_deepfool_linear_multiclass_steps_to_the_closest_candidate(num_classes: int) -> None:
    g = torch.Generator().manual_seed(2)
    weight = 0.3 * torch.randn(3, 12, generator=g, dtype=torch.float64)
    model = linear_model(weight, torch.zeros(3, dtype=torch.float64))
    x = 0.5 + 0.1 * (torch.rand(16, 3, 2, 2, generator=g, dtype=torch.float64) - 0.5)
    with torch.no_grad():
        logits = model(x)
    y = logits.argmax(dim=1)
    # distance to each linear boundary y-vs-k; the true class itself is excluded
    w_diff = weight.unsqueeze(0) - weight[y].unsqueeze(1)  # (N, 3, D)
    dist = (logits.gather(1, y.view(-1, 1)) - logits + 1e-4) / w_diff.norm(dim=2)
    dist = dist.scatter(1, y.view(-1, 1), float("inf"))
    if num_classes == 2:  # only the runner-up by logit is a candidate
        runner_up = logits.scatter(1, y.view(-1, 1), -float("inf")).argmax(dim=1, keepdim=True)
        dist = torch.full_like(dist, float("inf")).scatter(1, runner_up, dist.gather(1, runner_up))
    expected = dist.min(dim=1).values * 1.02
    # one step moves to the (over-shot) closest linearised boundary; keep examples that flipped
    x_adv = DeepFool(model, steps=1, num_classes=num_classes)(x, y)
    flipped = model(x_adv).argmax(dim=1) != y
    assert flipped.sum() >= 8
    assert torch.allclose(l2_norms(x_adv, x)[flipped], expected[flipped], rtol=1e-6)
    assert torch.equal(x_adv[~flipped], x[~flipped])


def test_mifgsm_matches_the_paper_update() -> None:
    # (a setting where per-example L1 normalisation changes the result: neither the raw
    # gradient nor a batch-wide normalisation would give the same images)
    model = tiny_cnn(seed=2)
    x, y = random_batch(seed=2)
    eps, alpha, steps, decay = 0.3, 0.05, 8, 0.5
    x_ref, g = x.clone(), torch.zeros_like(x)
    for _ in range(steps):  # g <- mu g + grad / ||grad||_1, per example
        x_var = x_ref.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_var), y, reduction="sum"), x_var)
        g = decay * g + grad / grad.abs().sum(dim=(1, 2, 3), keepdim=True)
        x_ref = torch.min(torch.max(x_ref + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    x_adv = MIFGSM(model, eps=eps, alpha=alpha, steps=steps, decay=decay)(x, y)
    assert torch.allclose(x_adv, x_ref, atol=1e-6)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_model_only_sees_valid_images(name: str) -> None:
    recorder = _Recorder(tiny_cnn())
    x, y = random_batch()
    make_attack(name, recorder, eps=16 / 255 if name in LINF else None, **FAST[name])(x, y)
    seen = torch.cat(recorder.seen)
    assert seen.min() >= 0 and seen.max() <= 1


def test_cw_defaults_move_saturated_pixels() -> None:
    """Issue 15, item 6: pixels at exactly 0 start far out in tanh space (w = atanh(-1 + 1e-6)
    ~ -7.25); Adam moves w by about lr per step, so the old default lr 0.01 could not bring
    them into play within 100 steps. Here only black pixels can flip the label."""
    weight = torch.zeros(2, 16)
    weight[1] = 1.0  # logit_1 - logit_0 = sum(x) - 0.5: brighten the black image by 0.5 in sum
    model = linear_model(weight, torch.tensor([0.5, 0.0]))
    x = torch.zeros(4, 1, 4, 4)
    y = torch.zeros(4, dtype=torch.long)
    assert accuracy(model, x, y) == 1.0
    x_adv = CW(model)(x, y)  # the defaults
    assert accuracy(model, x_adv, y) == 0.0
    # the smallest L2 change of the sum by 0.5 spreads it evenly: 16 pixels of 1/32, L2 0.125
    assert l2_norms(x_adv, x).max() < 0.2
    assert accuracy(model, CW(model, lr=0.01)(x, y), y) == 1.0  # the old default fails
