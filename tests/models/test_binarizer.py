"""Binarizer: every mode, gradients, noise reproducibility."""

from __future__ import annotations

import pytest
import torch

from comdefend.models.binarizer import Binarizer, binarize


def test_hard_threshold_gives_bits() -> None:
    code = torch.tensor([-5.0, -0.1, 0.1, 7.0])
    assert binarize(code, "hard").tolist() == [0.0, 0.0, 1.0, 1.0]


def test_threshold_is_applied_after_sigmoid() -> None:
    code = torch.tensor([0.5, 1.5])  # sigmoid: 0.62, 0.82
    assert binarize(code, "hard", threshold=0.7).tolist() == [0.0, 1.0]


def test_noisy_mode_is_sigmoid_of_code_minus_gaussian() -> None:
    code = torch.zeros(20000)
    generator = torch.Generator().manual_seed(0)
    out = binarize(code, "noisy", noise_std=20.0, generator=generator)
    expected_noise = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 20
    torch.testing.assert_close(out, torch.sigmoid(-expected_noise))
    # With std 20 almost every value saturates: the code becomes nearly binary.
    assert float(((out < 0.05) | (out > 0.95)).float().mean()) > 0.85  # P(|20z| > 2.94)


def test_noisy_mode_pushes_large_codes_to_binary() -> None:
    out = binarize(torch.full((1000,), 200.0), "noisy", noise_std=20.0)
    assert float(out.min()) > 0.999


def test_relaxed_is_differentiable_and_hard_is_not() -> None:
    code = torch.randn(10, requires_grad=True)
    binarize(code, "relaxed").sum().backward()
    assert code.grad is not None and float(code.grad.abs().min()) > 0
    hard = binarize(code, "hard")
    assert not hard.requires_grad


def test_straight_through_forward_hard_backward_identity() -> None:
    code = torch.randn(50, requires_grad=True)
    out = binarize(code, "straight_through")
    assert torch.equal(out.detach(), binarize(code.detach(), "hard"))
    out.sum().backward()
    torch.testing.assert_close(code.grad, torch.ones(50))


def test_module_uses_noise_in_training_and_threshold_in_eval() -> None:
    module = Binarizer(noise_std=20.0)
    code = torch.full((1000,), 0.3)
    module.train()
    assert float(module(code).std()) > 0.1
    module.eval()
    assert torch.equal(module(code), torch.ones(1000))


def test_inference_noise_is_seeded() -> None:
    code = torch.randn(500)
    a = Binarizer(inference_noise_std=1.0, seed=3).eval()
    b = Binarizer(inference_noise_std=1.0, seed=3).eval()
    c = Binarizer(inference_noise_std=1.0, seed=4).eval()
    out_a, out_b, out_c = a(code), b(code), c(code)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, out_c)
    assert not torch.equal(out_a, Binarizer().eval()(code))  # noise flips some bits


@pytest.mark.parametrize(
    "kwargs", [{"inference_mode": "noisy"}, {"threshold": 1.0}, {"noise_std": -1.0}]
)
def test_bad_settings_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Binarizer(**kwargs)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="valid modes"):
        binarize(torch.zeros(1), "soft")  # type: ignore[arg-type]
