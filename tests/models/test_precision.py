"""Purification precision (fp32, tf32, bf16): what each runs and what it is allowed to change."""

from __future__ import annotations

import pytest
import torch

from comdefend import ComDefend, ComDefendConfig
from comdefend.errors import UsageError
from comdefend.models import precision as precision_module
from comdefend.models.precision import check_precision, cpu_bf16_missing, precision_context


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
    other = "fp32 or bf16" if cpu_bf16_missing() is None else "fp32"
    with pytest.raises(UsageError, match=f"tf32 needs a CUDA GPU.*use {other}$"):
        check_precision("tf32", "cpu")
    model = ComDefend(ComDefendConfig(preset="normal", precision="tf32")).eval()
    with pytest.raises(UsageError, match="tf32 needs a CUDA GPU"):
        model.purify(torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_refused_where_the_cpu_would_emulate_it(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision_module, "_probe", lambda namespace, name: native)
    assert (cpu_bf16_missing() is None) is native
    if native:
        assert check_precision("bf16", "cpu") == "bf16"
        with pytest.raises(UsageError, match="tf32 needs a CUDA GPU.*use fp32 or bf16$"):
            check_precision("tf32", "cpu")
    else:
        with pytest.raises(UsageError, match="bf16 needs a CPU with AVX512-BF16 or AMX.*use fp32$"):
            check_precision("bf16", torch.device("cpu"))
        with pytest.raises(UsageError, match="tf32 needs a CUDA GPU.*use fp32$"):
            check_precision("tf32", "cpu")
    assert check_precision("bf16") == "bf16"  # no device: only the name is checked
    assert check_precision("bf16", "meta") == "bf16"  # not a CPU: not this probe's question
    # the pass itself still runs it (emulated where the CPU lacks bfloat16: slowly)
    with precision_context("bf16", torch.device("cpu")):
        y = torch.nn.functional.conv2d(torch.rand(1, 3, 4, 4), torch.rand(2, 3, 3, 3))
    assert y.dtype == torch.bfloat16


def test_the_probe_reads_onednn_off_x86(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "aarch64")
    asked: list[str] = []
    monkeypatch.setattr(
        precision_module, "_probe", lambda namespace, name: asked.append(name) or False
    )
    assert cpu_bf16_missing() == "oneDNN has no bfloat16 kernels for this CPU"
    assert asked == ["_is_mkldnn_bf16_supported"]


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
