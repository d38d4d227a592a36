"""The inference fast path of ComDefend: chunked on the CPU, same numbers, gradients intact."""

from __future__ import annotations

import pytest
import torch

from comdefend import ComDefend, ComDefendConfig
from comdefend.models import comdefend as comdefend_module


@pytest.fixture()
def rgb_model() -> ComDefend:
    torch.manual_seed(0)
    return ComDefend(ComDefendConfig(preset="normal")).eval()


@pytest.fixture()
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 256 channels x 8 x 8 pixels x 4 bytes = 64 KiB per image: chunks of 2 images.
    monkeypatch.setattr(comdefend_module, "CPU_CHUNK_BYTES", 2 * 256 * 8 * 8 * 4)


class _CountCalls:
    def __init__(self, module: torch.nn.Module) -> None:
        self.batches: list[int] = []
        module.register_forward_pre_hook(lambda _, args: self.batches.append(args[0].shape[0]))


def test_chunk_size_fits_the_budget(rgb_model: ComDefend) -> None:
    assert rgb_model.widest_channels == 256
    x = torch.rand(300, 3, 32, 32)
    # 4 MiB / (256 channels x 32 x 32 x 4 bytes) = 4 images
    assert rgb_model.inference_chunk_size(x) == 4
    assert rgb_model.inference_chunk_size(torch.rand(1, 3, 512, 512)) == 2  # never 1


@pytest.mark.usefixtures("small_chunks")
def test_inference_runs_in_chunks_with_the_plain_result(rgb_model: ComDefend) -> None:
    x = torch.rand(5, 3, 8, 8)
    encoder_calls, decoder_calls = _CountCalls(rgb_model.encoder), _CountCalls(rgb_model.decoder)
    with torch.no_grad():
        fast = rgb_model.purify(x)
    # the chunks run in worker threads, in no fixed order; no chunk holds a lone image
    assert sorted(encoder_calls.batches) == sorted(decoder_calls.batches) == [2, 3]
    plain = rgb_model.decoder(rgb_model.binarizer(rgb_model.encoder(x))).detach()
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("small_chunks")
def test_patch_mode_chunks_the_patches(rgb_model: ComDefend) -> None:
    x = torch.rand(1, 3, 16, 24)  # six 8x8 patches
    model = ComDefend(rgb_model.config, patch_size=8).eval()
    model.load_state_dict(rgb_model.state_dict())
    calls = _CountCalls(model.encoder)
    with torch.no_grad():
        fast = model.purify(x, mode="patch")
    assert calls.batches == [2, 2, 2]
    with torch.no_grad():
        one_patch = model.reconstruct(x[..., 8:16, 16:24])[0]
    torch.testing.assert_close(fast[..., 8:16, 16:24], one_patch, rtol=0, atol=1e-6)


@pytest.mark.usefixtures("small_chunks")
def test_gradients_take_the_plain_path(rgb_model: ComDefend) -> None:
    rgb_model.binarizer.inference_mode = "straight_through"
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    calls = _CountCalls(rgb_model.encoder)
    rgb_model.purify(x).sum().backward()
    assert calls.batches == [5]
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.usefixtures("small_chunks")
def test_noisy_binarizer_draws_the_same_noise_as_one_pass(rgb_model: ComDefend) -> None:
    rgb_model.binarizer.inference_noise_std = 1.0
    x = torch.rand(5, 3, 8, 8)
    with torch.no_grad():
        rgb_model.binarizer.reseed(7)
        fast = rgb_model.purify(x)
        after_fast = rgb_model.binarizer.generator.get_state()
    rgb_model.binarizer.reseed(7)
    plain = rgb_model.purify(x).detach()  # autograd records: one unchunked pass
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
    assert torch.equal(after_fast, rgb_model.binarizer.generator.get_state())


@pytest.mark.usefixtures("small_chunks")
def test_training_mode_is_never_chunked() -> None:
    model = ComDefend(ComDefendConfig(preset="residual-both-1")).train()
    calls = _CountCalls(model.encoder)
    with torch.no_grad():
        model.encode(torch.rand(5, 3, 8, 8))
    assert calls.batches == [5]  # BatchNorm statistics of the whole batch
