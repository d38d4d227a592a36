"""Purification precision (fp32, tf32, bf16): what each runs and what it is allowed to change."""

from __future__ import annotations

import pytest
import torch

from comdefend import ComDefend, ComDefendConfig
from comdefend.errors import UsageError
from comdefend.models.precision import check_precision, precision_context


@pytest.fixture()
def rgb_model() -> ComDefend:
    torch.manual_seed(0)
    return ComDefend(ComDefendConfig(preset="normal")).eval()


def test_bf16_runs_the_convolutions_in_bfloat16_and_returns_float32(rgb_model: ComDefend) -> None:
    x = torch.rand(4, 3, 16, 16)
    seen: list[torch.dtype] = []
    first_conv = next(m for m in rgb_model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    with torch.no_grad():
        exact = rgb_model.purify(x)
        rgb_model.config.precision = "bf16"
        rounded = rgb_model.purify(x)
    assert seen == [torch.float32, torch.bfloat16]
    assert rounded.dtype == torch.float32 and rounded.shape == x.shape
    assert 0 <= float(rounded.min()) and float(rounded.max()) <= 1
    assert not torch.equal(exact, rounded)  # really another arithmetic
    # bf16 keeps 8 mantissa bits: on a random untrained model the outputs stay close
    assert float((exact - rounded).abs().mean()) < 0.05
    # float64 input: purified at the model's precision, returned as float64
    assert rgb_model.purify(x.double()).dtype == torch.float64


def test_bf16_keeps_gradients_for_adaptive_attacks(rgb_model: ComDefend) -> None:
    rgb_model.config.precision = "bf16"
    rgb_model.binarizer.inference_mode = "straight_through"
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    rgb_model.purify(x).sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_precision_is_checked_where_it_is_given() -> None:
    assert check_precision(" BF16 ") == "bf16"
    with pytest.raises(UsageError, match="one of fp32, tf32, bf16"):
        ComDefendConfig(precision="fp16")
    with pytest.raises(UsageError, match="tf32 needs a CUDA GPU.*use fp32 or bf16"):
        check_precision("tf32", "cpu")
    model = ComDefend(ComDefendConfig(preset="normal", precision="tf32")).eval()
    with pytest.raises(UsageError, match="tf32 needs a CUDA GPU"):
        model.purify(torch.rand(1, 3, 8, 8))


def test_fp32_context_changes_nothing_on_the_cpu() -> None:
    x, w = torch.rand(1, 3, 8, 8), torch.rand(4, 3, 3, 3)
    with precision_context("fp32", torch.device("cpu")):
        inside = torch.nn.functional.conv2d(x, w)
    assert torch.equal(inside, torch.nn.functional.conv2d(x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_turns_tf32_off_for_the_pass_only() -> None:
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with precision_context("fp32", torch.device("cuda")):
        assert conv.fp32_precision == "ieee"
    with precision_context("tf32", torch.device("cuda")):
        assert conv.fp32_precision == "tf32"
    assert conv.fp32_precision == before
