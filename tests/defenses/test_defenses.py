"""Purifiers, ComDefend as a defense, BPDA / EOT and the threat-model helper, spec parsing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comdefend.defenses import (
    BPDA,
    EOT,
    JPEG,
    THREAT_MODELS,
    BitDepthReduction,
    ComDefendDefense,
    Compose,
    DefendedClassifier,
    Defense,
    Identity,
    MedianSmoothing,
    adaptive,
    eot_grad,
    make_threat_model_defense,
    parse_defense,
)
from comdefend.errors import InputError, UsageError
from comdefend.models import ComDefend, ComDefendConfig


def smooth_images(n: int = 2, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Low-frequency random images: bilinear upsampling of 4 x 4 noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=generator) * 0.8 + 0.1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


@pytest.fixture(scope="module")
def tiny_comdefend() -> ComDefend:
    torch.manual_seed(0)
    return ComDefend(ComDefendConfig(preset="plain", image_channels=1)).eval()


# -- purifiers ---------------------------------------------------------------------------------
def test_identity_returns_input() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert Identity()(x) is x
    assert Identity().name == "none"


def test_jpeg_changes_smooth_image_a_little() -> None:
    x = smooth_images()
    y = JPEG(75)(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert not torch.equal(y, x)
    assert psnr(x, y) > 25.0
    # Output is on the 8-bit grid.
    torch.testing.assert_close(y * 255, (y * 255).round(), rtol=0, atol=1e-4)


def test_jpeg_quality_100_is_nearly_lossless_and_lower_quality_is_worse() -> None:
    x = smooth_images(channels=1)
    error_100 = float((JPEG(100)(x) - x).abs().max())
    assert error_100 <= 3 / 255
    assert psnr(x, JPEG(100)(x)) > psnr(x, JPEG(10)(x))


def test_jpeg_grayscale_and_dtype() -> None:
    x = smooth_images(n=3, channels=1, size=16).double()
    y = JPEG(50)(x)
    assert y.shape == (3, 1, 16, 16) and y.dtype == torch.float64
    assert psnr(x, y) > 25.0


def test_jpeg_is_not_differentiable_and_rejects_bad_input() -> None:
    jpeg = JPEG(75)
    assert jpeg.differentiable is False and jpeg.randomized is False
    x = torch.rand(1, 3, 8, 8, requires_grad=True)
    assert not jpeg(x).requires_grad  # detached: attack it through BPDA
    with pytest.raises(InputError, match="channels"):
        jpeg(torch.rand(1, 2, 8, 8))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        jpeg(torch.full((1, 3, 8, 8), 2.0))
    with pytest.raises(UsageError):
        JPEG(0)


def test_bit_depth_one_gives_binary_values_and_eight_bits_the_grid() -> None:
    x = torch.rand(2, 3, 8, 8)
    y = BitDepthReduction(1)(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(y, (x > 0.5).float())
    y4 = BitDepthReduction(4)(x)
    assert (y4 - x).abs().max() <= 0.5 / 15 + 1e-6
    assert len(y4.unique()) <= 16
    assert BitDepthReduction(4).differentiable is False
    with pytest.raises(UsageError):
        BitDepthReduction(9)


def test_median_removes_a_salt_pixel() -> None:
    for k in (2, 3):
        x = torch.full((1, 1, 6, 6), 0.25)
        x[0, 0, 3, 3] = 1.0
        y = MedianSmoothing(k)(x)
        assert y.shape == x.shape
        torch.testing.assert_close(y, torch.full_like(x, 0.25))


def test_median_2x2_window_and_even_padding() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 16  # defenses take images in [0, 1]
    # bottom_right: window = pixel and its right/bottom neighbours; upper median of 4 values.
    y = MedianSmoothing(2)(x) * 16
    assert float(y[0, 0, 0, 0]) == 4.0  # {0, 1, 4, 5} -> 4
    # top_left + symmetric padding = scipy.ndimage.median_filter(size=2, mode="reflect").
    y = MedianSmoothing(2, padding="symmetric", even_padding="top_left")(x) * 16
    assert y[0, 0].tolist()[1] == [4.0, 4.0, 5.0, 6.0]


def test_median_matches_scipy() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    for k in (2, 3):
        ours = MedianSmoothing(k, padding="symmetric", even_padding="top_left")(x)
        ref = ndimage.median_filter(x.numpy(), size=(1, 1, k, k), mode="reflect")
        torch.testing.assert_close(ours, torch.from_numpy(ref))


def test_median_is_differentiable_and_tiny_images_work() -> None:
    x = torch.rand(2, 1, 5, 5, requires_grad=True)
    MedianSmoothing(3)(x).sum().backward()
    assert x.grad is not None and float(x.grad.sum()) == pytest.approx(2 * 25)
    assert MedianSmoothing(3).differentiable is True
    assert MedianSmoothing(3)(torch.rand(1, 1, 1, 2)).shape == (1, 1, 1, 2)


def test_compose_name_flags_order_and_flattening() -> None:
    chain = Compose(JPEG(75), MedianSmoothing(2))
    assert chain.name == "jpeg:75+median:2"
    assert chain.differentiable is False and chain.randomized is False
    assert Compose(MedianSmoothing(2), Identity()).differentiable is True
    nested = Compose(chain, BitDepthReduction(3))
    assert nested.name == "jpeg:75+median:2+bits:3" and len(nested.parts) == 3
    x = smooth_images(n=1, size=16)
    torch.testing.assert_close(chain(x), MedianSmoothing(2)(JPEG(75)(x)))
    settings = chain.settings()
    assert settings["name"] == "jpeg:75+median:2"
    assert [p["name"] for p in settings["parts"]] == ["jpeg:75", "median:2"]
    with pytest.raises(UsageError):
        Compose()
    with pytest.raises(UsageError):
        Compose(nn.Identity())  # type: ignore[arg-type]


def test_settings_describe_each_defense() -> None:
    assert JPEG(60).settings()["quality"] == 60
    assert BitDepthReduction(5).settings() == {
        "name": "bits:5",
        "type": "BitDepthReduction",
        "differentiable": False,
        "randomized": False,
        "bits": 5,
    }


# -- ComDefend ---------------------------------------------------------------------------------
def test_comdefend_defense_output_and_flags(tiny_comdefend: ComDefend) -> None:
    defense = ComDefendDefense(tiny_comdefend)
    x = torch.rand(3, 1, 8, 8)
    y = defense(x).detach()
    assert y.shape == x.shape
    assert 0.0 <= float(y.min()) and float(y.max()) <= 1.0
    assert defense.randomized is False and defense.differentiable is False
    assert defense.name == "comdefend:plain"
    torch.testing.assert_close(defense(x), y)  # deterministic without noise


def test_comdefend_noise_is_reproducible_by_seed(tiny_comdefend: ComDefend) -> None:
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    a = ComDefendDefense(tiny_comdefend, noise_std=1.0, seed=3)
    b = ComDefendDefense(tiny_comdefend, noise_std=1.0, seed=3)
    assert a.randomized is True
    first = a(x)
    torch.testing.assert_close(b(x), first)
    second = a(x)
    assert not torch.equal(first, second)  # fresh noise on every call
    a.reseed(3)
    torch.testing.assert_close(a(x), first)
    c = ComDefendDefense(tiny_comdefend, noise_std=1.0, seed=4)
    assert not torch.equal(c(x), first)
    # The shared model's binarizer is left as it was.
    assert tiny_comdefend.binarizer.inference_noise_std == 0.0
    assert tiny_comdefend.binarizer.generator is None


def test_comdefend_gradient_mode_and_training_flag(tiny_comdefend: ComDefend) -> None:
    defense = ComDefendDefense(tiny_comdefend)
    with defense.gradient_mode("relaxed") as relaxed:
        assert relaxed.differentiable is True
        assert relaxed.name == "comdefend:plain@binarizer=relaxed"
    assert defense.binarizer_mode == "hard"
    with pytest.raises(UsageError):
        with defense.gradient_mode("noisy"):
            pass
    defense.train()
    assert not tiny_comdefend.training
    with pytest.raises(UsageError):
        ComDefendDefense(tiny_comdefend, noise_std=-1.0)


def test_straight_through_gradient_is_nonzero_where_hard_is_zero(
    tiny_comdefend: ComDefend,
) -> None:
    defense = ComDefendDefense(tiny_comdefend)
    x = torch.rand(1, 1, 8, 8, requires_grad=True)
    (hard_grad,) = torch.autograd.grad(defense(x).sum(), x, allow_unused=True)
    assert hard_grad is None or float(hard_grad.abs().sum()) == 0.0
    view = make_threat_model_defense(defense, "bpda")
    assert isinstance(view, ComDefendDefense) and view.binarizer_mode == "straight_through"
    out = view(x)
    torch.testing.assert_close(out, defense(x))  # same forward as the defense
    (st_grad,) = torch.autograd.grad(out.sum(), x)
    assert float(st_grad.abs().sum()) > 0.0
    relaxed = make_threat_model_defense(defense, "relaxed")
    assert isinstance(relaxed, ComDefendDefense) and relaxed.binarizer_mode == "relaxed"
    (relaxed_grad,) = torch.autograd.grad(relaxed(x).sum(), x)
    assert float(relaxed_grad.abs().sum()) > 0.0


# -- BPDA, EOT, threat models ------------------------------------------------------------------
def test_bpda_gradient_equals_identity_gradient() -> None:
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    for inner in (JPEG(75), BitDepthReduction(3)):
        wrapped = BPDA(inner)
        out = wrapped(x)
        torch.testing.assert_close(out, inner(x))
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(grad, torch.ones_like(x))
    assert BPDA(JPEG(75)).name == "bpda(jpeg:75)" and BPDA(JPEG(75)).differentiable


def test_bpda_uses_the_forward_substitute_gradient() -> None:
    x = torch.rand(1, 1, 4, 4, requires_grad=True)
    wrapped = BPDA(BitDepthReduction(2), forward_substitute=lambda t: 3 * t)
    (grad,) = torch.autograd.grad(wrapped(x).sum(), x)
    torch.testing.assert_close(grad, torch.full_like(x, 3.0))
    torch.testing.assert_close(wrapped(x), BitDepthReduction(2)(x))


class RandomShift(Defense):
    """A randomized differentiable test defense: ``x + std * noise``."""

    randomized = True

    def __init__(self, std: float) -> None:
        super().__init__()
        self.std = std

    @property
    def name(self) -> str:
        return f"shift:{self.std}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.std * torch.randn_like(x)


def test_eot_averages_draws_and_reduces_gradient_variance() -> None:
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    model = DefendedClassifier(RandomShift(0.5), classifier)
    x = torch.rand(1, 1, 4, 4)
    y = torch.tensor([1])

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def spread(samples: int) -> float:
        grads = torch.stack([eot_grad(model, x, loss_fn, samples)[0] for _ in range(12)])
        return float(grads.var(dim=0).sum())

    assert spread(16) < 0.5 * spread(1)

    eot = EOT(model, samples=16)
    grads = []
    for _ in range(12):
        leaf = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(loss_fn(eot(leaf)), leaf)[0])
    single = []
    for _ in range(12):
        leaf = x.clone().requires_grad_(True)
        single.append(torch.autograd.grad(loss_fn(model(leaf)), leaf)[0])
    assert float(torch.stack(grads).var(0).sum()) < 0.5 * float(torch.stack(single).var(0).sum())


@pytest.mark.parametrize("seeded", [False, True])
def test_eot_recompute_gives_the_same_outputs_gradients_and_noise_stream(
    tiny_comdefend: ComDefend, seeded: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Draw by draw: the same mean logits, the same input gradient and, after the backward
    pass, the same state of every noise stream as the one-graph loop; kept and recomputed
    draws agree bit for bit, so ``"auto"`` may pick either."""
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = smooth_images(3, channels=1, size=8), torch.tensor([0, 1, 2])

    def attacker(recompute: bool | str) -> EOT:
        # seeded: the defense's own generator; else PyTorch's global RNG (seed None)
        noisy = ComDefendDefense(tiny_comdefend, noise_std=1.0, seed=7 if seeded else None)
        view = make_threat_model_defense(noisy, "bpda")
        return EOT(DefendedClassifier(view, classifier), samples=4, recompute=recompute)  # type: ignore[arg-type]

    def run(model: EOT) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(1)
        leaf = x.clone().requires_grad_(True)
        logits = model(leaf)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), leaf)
        with torch.no_grad():
            after = model(x)  # the next draws: the streams must have continued alike
        return logits.detach(), grad / grad.abs().max(), after

    plain, redone = run(attacker(False)), run(attacker(True))
    torch.testing.assert_close(redone[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(redone[1], plain[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(redone[2], plain[2], rtol=0, atol=0)
    for fits in (True, False):  # "auto" keeping the draws, or recomputing them
        monkeypatch.setattr(adaptive, "_keeps_all_draws", lambda *args, fits=fits: fits)
        for got, expected in zip(run(attacker("auto")), redone, strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # without its random states the backward pass draws other noise: another gradient
    monkeypatch.setattr(adaptive, "_restore_random_states", lambda states: None)
    unrestored = run(attacker(True))
    assert float((unrestored[1] - plain[1]).abs().max()) > 1e-2
    model = make_threat_model_defense(
        ComDefendDefense(tiny_comdefend, noise_std=1.0, seed=1), "bpda+eot", classifier
    )
    assert model.settings()["recompute"] == "auto"
    with pytest.raises(UsageError, match="recompute"):
        EOT(classifier, 2, recompute="sometimes")  # type: ignore[arg-type]


def test_eot_recompute_keeps_one_draw_of_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-graph loop keeps every draw's activations until the backward pass; the
    recomputing one keeps none (the saved tensors of the autograd graph are counted), and
    ``"auto"`` recomputes only when the draws would not fit in the free memory."""
    wide = nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model = DefendedClassifier(RandomShift(0.1), wide)
    x = torch.rand(2, 1, 8, 8)
    model(x)  # materialize the lazy layer

    def saved_bytes(eot: EOT) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        leaf = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = eot(leaf)
        out.sum().backward()
        return total

    one_graph, redone = saved_bytes(EOT(model, 8)), saved_bytes(EOT(model, 8, recompute=True))
    assert redone * 4 < one_graph

    def passes(free_bytes: int) -> int:
        """Forward passes of the wrapped model in one forward and backward of "auto"."""
        monkeypatch.setattr(adaptive, "_free_memory_bytes", lambda device: free_bytes)
        calls = []
        hook = model.register_forward_hook(lambda *args: calls.append(1))
        saved_bytes(EOT(model, 8, recompute="auto"))
        hook.remove()
        return len(calls)

    one_draw = 2 * 64 * 8 * 8 * 4  # the ReLU's output of one draw, in bytes
    assert passes(100 * one_draw) == 8  # the draws fit: kept, no pass in the backward
    assert passes(4 * one_draw) == 16  # they do not: every draw run again


def test_eot_of_deterministic_module_is_the_module() -> None:
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(EOT(classifier, 4)(x), classifier(x))
    torch.testing.assert_close(EOT(classifier, 4, batched=True)(x), classifier(x))
    grad, loss = eot_grad(classifier, x, lambda z: z[:, 0].sum(), samples=3)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(classifier(leaf)[:, 0].sum(), leaf)
    torch.testing.assert_close(grad, expected)
    assert float(loss.detach()) == pytest.approx(
        float(classifier(x)[:, 0].sum().detach()), abs=1e-5
    )
    with pytest.raises(UsageError):
        EOT(classifier, 0)


def test_threat_models_for_classic_defenses() -> None:
    assert THREAT_MODELS.names() == ["oblivious", "bpda", "bpda+eot", "relaxed"]
    defense = Compose(JPEG(75), MedianSmoothing(2))
    assert make_threat_model_defense(defense, "oblivious") is None
    view = make_threat_model_defense(defense, "bpda")
    assert view is not None and view.name == "bpda(jpeg:75)+median:2"
    x = smooth_images(n=1, size=8).requires_grad_(True)
    out = view(x)
    torch.testing.assert_close(out, defense(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert float(grad.sum()) == pytest.approx(x.numel())  # identity then median: sum preserved
    # bpda+eot on a deterministic defense = bpda.
    eot_view = make_threat_model_defense(defense, "bpda+eot")
    assert eot_view is not None and eot_view.name == view.name
    assert make_threat_model_defense(MedianSmoothing(3), "bpda").name == "median:3"
    with pytest.raises(UsageError, match="ComDefend"):
        make_threat_model_defense(defense, "relaxed")
    with pytest.raises(UsageError, match="oblivious, bpda"):
        make_threat_model_defense(defense, "whitebox")


def test_threat_models_with_classifier(tiny_comdefend: ComDefend) -> None:
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    noisy = Compose(ComDefendDefense(tiny_comdefend, noise_std=1.0, seed=5), JPEG(90))
    assert make_threat_model_defense(noisy, "oblivious", classifier) is classifier
    with pytest.raises(UsageError, match="classifier"):
        make_threat_model_defense(noisy, "bpda+eot")
    model = make_threat_model_defense(noisy, "bpda+eot", classifier, eot_samples=3)
    assert isinstance(model, EOT) and model.samples == 3
    inner = model.module
    assert isinstance(inner, DefendedClassifier)
    view_name = "comdefend:plain@noise=1,seed=6,binarizer=straight_through+bpda(jpeg:90)"
    assert inner.defense.name == view_name  # attacker noise stream: seed + 1
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert float(grad.abs().sum()) > 0
    plain = make_threat_model_defense(noisy, "bpda", classifier)
    assert isinstance(plain, DefendedClassifier)


# -- spec parsing ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec", ["none", "jpeg:75", "bits:4", "median:2", "median:5", "jpeg:75+median:2", "bits:1"]
)
def test_parse_defense_round_trip(spec: str) -> None:
    defense = parse_defense(spec)
    assert defense.name == spec
    assert parse_defense(defense.name).name == spec


def test_parse_defense_types_and_case() -> None:
    assert isinstance(parse_defense("JPEG:30"), JPEG) and parse_defense("JPEG:30").quality == 30
    assert isinstance(parse_defense(" bits:3 + median:3 "), Compose)
    assert isinstance(parse_defense("none"), Identity)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("blur:3", "unknown defense 'blur'.*jpeg:Q"),
        ("jpeg:0", "out of range.*1..100"),
        ("jpeg:101", "out of range"),
        ("jpeg:abc", "integer"),
        ("jpeg", "needs a quality"),
        ("bits:9", "1..8"),
        ("bits:0", "out of range"),
        ("median:1", "2..5"),
        ("median:6", "2..5"),
        ("", "empty defense spec"),
        ("jpeg:75+", "empty part"),
        ("none:3", "no argument"),
        ("comdefend:", "checkpoint path"),
    ],
)
def test_parse_defense_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_defense(spec)


def test_parse_comdefend_checkpoint_with_options(
    tiny_comdefend: ComDefend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiny.safetensors"
    tiny_comdefend.save(path)
    defense = parse_defense(f"comdefend:{path}")
    assert isinstance(defense, ComDefendDefense)
    assert defense.name == f"comdefend:{path}" and not defense.randomized
    x = torch.rand(1, 1, 8, 8)
    torch.testing.assert_close(defense(x), ComDefendDefense(tiny_comdefend)(x))

    spec = f"comdefend:{path}@noise=1.5,seed=7,purify=patch"
    noisy = parse_defense(spec)
    assert isinstance(noisy, ComDefendDefense)
    assert noisy.noise_std == 1.5 and noisy.seed == 7 and noisy.randomized
    assert noisy.model.config.purify_mode == "patch"
    assert noisy.name == spec
    assert parse_defense(noisy.name).name == spec

    chain = parse_defense(f"jpeg:80+comdefend:{path}@noise=1")
    assert isinstance(chain, Compose) and chain.randomized and not chain.differentiable

    with pytest.raises(UsageError, match="unknown option"):
        parse_defense(f"comdefend:{path}@strength=2")
    with pytest.raises(UsageError, match="noise"):
        parse_defense(f"comdefend:{path}@noise=-1")
    with pytest.raises(UsageError, match="binarizer"):
        parse_defense(f"comdefend:{path}@binarizer=soft")

    from comdefend.models import precision as precision_module

    monkeypatch.setattr(precision_module, "cpu_bf16_missing", lambda: "no bfloat16 here")
    with pytest.raises(UsageError, match="bf16 needs a CPU with AVX512-BF16 or AMX"):
        parse_defense(f"comdefend:{path}@precision=bf16")
    monkeypatch.setattr(precision_module, "cpu_bf16_missing", lambda: None)
    bf16 = parse_defense(f"comdefend:{path}@precision=BF16")
    assert isinstance(bf16, ComDefendDefense) and bf16.model.config.precision == "bf16"
    assert bf16.name == f"comdefend:{path}@precision=bf16" and bf16.params()["precision"] == "bf16"
    with pytest.raises(UsageError, match="precision must be one of fp32, tf32, bf16"):
        parse_defense(f"comdefend:{path}@precision=fp16")
    with pytest.raises(UsageError, match="tf32 needs a CUDA GPU"):
        parse_defense(f"comdefend:{path}@precision=tf32")


def test_user_defense_kind_enters_specs_and_messages() -> None:
    from comdefend.defenses import DEFENSES, DefenseKind, register_defense

    register_defense(
        DefenseKind(
            "darken",
            "darken:F (multiply by F/10)",
            lambda argument, device: BitDepthReduction(int(argument or 8)),
        )
    )
    try:
        defense = parse_defense("DARKEN:4+median:2")
        assert isinstance(defense, Compose) and defense.name == "bits:4+median:2"
        with pytest.raises(UsageError, match=r"valid: none \(no defense\);.*darken:F"):
            parse_defense("blur:3")
    finally:
        DEFENSES.remove("darken")
    assert isinstance(parse_defense("identity"), Identity)
    with pytest.raises(UsageError, match="'none' takes no argument"):
        parse_defense("none:3")


def test_threat_models_and_detectors_are_registries() -> None:
    from comdefend.defenses import DETECTORS

    assert DETECTORS.names() == ["pca", "squeeze"] and DETECTORS["pca"].fits_on_images
    assert "ComDefend's hard threshold" in THREAT_MODELS["RELAXED"].meaning
    with pytest.raises(UsageError, match="unknown threat model 'bpdaa'; valid: oblivious, bpda"):
        make_threat_model_defense(Identity(), "bpdaa")
    assert make_threat_model_defense(Identity(), " BPDA ") is not None


def test_option_without_value_is_named_not_a_missing_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    ComDefend(ComDefendConfig(image_channels=1)).save(path)
    with pytest.raises(UsageError, match=r"option 'noise' needs a value \(noise=...\)"):
        parse_defense(f"comdefend:{path}@noise")
    with pytest.raises(UsageError, match="option 'seed' needs a value"):
        parse_defense(f"comdefend:{path}@Seed")
    odd = tmp_path / "odd@noise"  # a file really named so still loads
    odd.write_bytes(path.read_bytes())
    assert parse_defense(f"comdefend:{odd}").name == f"comdefend:{odd}"


@pytest.mark.parametrize("spec", ["none", "bits:4", "median:2", "jpeg:75", "comdefend"])
@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lambda x: x.clone().fill_(float("nan")), "NaN or infinite"),
        (lambda x: x * 255, r"must lie in \[0, 1\].*divide by 255"),
        (lambda x: x - 0.5, r"must lie in \[0, 1\]"),
        (lambda x: x[0], "NCHW"),
        (lambda x: (x * 255).to(torch.uint8), "float tensor"),
    ],
)
def test_every_defense_checks_its_input_the_same_way(spec: str, bad, message: str) -> None:
    if spec == "comdefend":
        defense: nn.Module = ComDefendDefense(ComDefend(ComDefendConfig(image_channels=3)))
    else:
        defense = parse_defense(spec)
    x = smooth_images(2, 3, 16)
    with pytest.raises(InputError, match=message):
        defense(bad(x))


def test_comdefend_checks_channels_and_encode_checks_too() -> None:
    model = ComDefend(ComDefendConfig(image_channels=1)).eval()
    with pytest.raises(InputError, match="3 channels but this model expects 1"):
        ComDefendDefense(model)(smooth_images(1, 3, 8))
    with pytest.raises(InputError, match="encode input contains NaN"):
        model.encode(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(InputError, match=r"encode input must lie in \[0, 1\]"):
        model.encode(torch.full((1, 1, 8, 8), 2.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_purify_and_encode_take_other_float_dtypes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = ComDefend(ComDefendConfig(image_channels=1)).eval()
    x32 = smooth_images(2, 1, 16)
    x = x32.to(dtype)
    with torch.no_grad():
        purified, code = model.purify(x), model.encode(x)
        reference = model.purify(x.to(torch.float32))
        reference_code = model.encode(x.to(torch.float32))
    assert purified.dtype == dtype and code.dtype == dtype
    # computed in float32 on the same (rounded) input, returned in the caller's dtype
    assert torch.equal(purified, reference.to(dtype)) and torch.equal(
        code, reference_code.to(dtype)
    )
    assert ComDefendDefense(model)(x).dtype == dtype


def test_float64_gradients_flow_through_the_cast() -> None:
    model = ComDefend(ComDefendConfig(image_channels=1)).eval()
    view = make_threat_model_defense(ComDefendDefense(model), "bpda")
    x = smooth_images(1, 1, 16).double().requires_grad_(True)
    view(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float64 and x.grad.abs().sum() > 0
