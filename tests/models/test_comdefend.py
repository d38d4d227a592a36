"""ComDefend module: shapes at odd sizes, patch/full equivalences, loss, checkpoints, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from comdefend import ComDefend, ComDefendConfig, comdefend_loss
from comdefend.checkpoint import load_checkpoint, save_checkpoint
from comdefend.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def gray_model() -> ComDefend:
    torch.manual_seed(0)
    return ComDefend(ComDefendConfig(preset="normal", image_channels=1)).eval()


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (28, 28), (33, 45)])
@pytest.mark.parametrize("mode", ["patch", "full"])
def test_any_size_in_both_modes(gray_model: ComDefend, size: tuple[int, int], mode: str) -> None:
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        y = gray_model.purify(x, mode=mode)  # type: ignore[arg-type]
    assert y.shape == x.shape
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_patch_mode_is_independent_per_patch(gray_model: ComDefend) -> None:
    x = torch.rand(1, 1, 16, 24)
    model = ComDefend(gray_model.config, patch_size=8).eval()
    model.load_state_dict(gray_model.state_dict())
    with torch.no_grad():
        whole = model.purify(x, mode="patch")
        one_patch = model.reconstruct(x[..., 8:16, 16:24])[0]
    torch.testing.assert_close(whole[..., 8:16, 16:24], one_patch)


def test_full_mode_tiling_equals_one_pass(gray_model: ComDefend) -> None:
    # The relaxed code avoids threshold flips from float rounding, so the match is tight.
    model = ComDefend(gray_model.config, max_tile=12, inference_mode="relaxed").eval()
    model.load_state_dict(gray_model.state_dict())
    x = torch.rand(1, 1, 40, 31)
    with torch.no_grad():
        tiled = model.purify(x, mode="full")
        single = model.reconstruct(x)[0]
    torch.testing.assert_close(tiled, single, atol=1e-5, rtol=0)


def test_encode_gives_binary_code_with_configured_channels() -> None:
    model = ComDefend(ComDefendConfig(code_channels=6)).eval()
    bits = model.encode(torch.rand(3, 3, 8, 8))
    assert bits.shape == (3, 6, 8, 8)
    assert set(torch.unique(bits).tolist()) <= {0.0, 1.0}
    assert model.config.bits_per_pixel == 6
    assert model.config.compression_ratio == 4.0
    assert model.decode(bits).shape == (3, 3, 8, 8)


def test_bgr_order_flips_channels_in_and_out() -> None:
    torch.manual_seed(1)
    rgb = ComDefend(ComDefendConfig(inference_mode="relaxed")).eval()
    bgr = ComDefend(ComDefendConfig(inference_mode="relaxed", channel_order="BGR")).eval()
    bgr.load_state_dict(rgb.state_dict())
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(bgr.purify(x), rgb.purify(x.flip(1)).flip(1))


def test_loss_formula() -> None:
    x = torch.zeros(2, 1, 2, 2)
    reconstruction = torch.full_like(x, 0.5)
    code = torch.ones(2, 4, 2, 2)
    total, mse, code_term = comdefend_loss(reconstruction, x, code, code_penalty=1e-4)
    assert math.isclose(float(mse), 0.25) and math.isclose(float(code_term), 1.0)
    assert math.isclose(float(total), 0.25 + 1e-4, rel_tol=1e-6)


def test_loss_gradients_reach_both_networks() -> None:
    model = ComDefend(ComDefendConfig(image_channels=1)).train()
    x = torch.rand(2, 1, 8, 8)
    reconstruction, code = model.reconstruct(x)
    comdefend_loss(reconstruction, x, code)[0].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert float(model.encoder[0].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.full((1, 1, 4, 4), float("nan")), "NaN"),
        (torch.full((1, 1, 4, 4), float("inf")), "NaN or infinite"),
        (torch.full((1, 1, 4, 4), 200.0), "divide by 255"),
        (torch.rand(1, 3, 4, 4), "3 channels"),
        (torch.rand(4, 4), "NCHW"),
        (torch.zeros(1, 1, 4, 4, dtype=torch.uint8), "float"),
    ],
)
def test_bad_input_is_a_clear_error(gray_model: ComDefend, bad: torch.Tensor, message: str) -> None:
    with pytest.raises(InputError, match=message):
        gray_model.purify(bad)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = ComDefend(ComDefendConfig(preset="1_on_off", image_channels=1)).eval()
    model.save(tmp_path / "m.safetensors")
    loaded = ComDefend.from_checkpoint(tmp_path / "m.safetensors")
    assert loaded.config == model.config
    x = torch.rand(1, 1, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded.purify(x), model.purify(x))


def test_checkpoint_of_another_architecture(tmp_path: Path) -> None:
    model = ComDefend(ComDefendConfig(preset="normal", image_channels=1))
    model.save(tmp_path / "m.safetensors")
    tensors, metadata = load_checkpoint(tmp_path / "m.safetensors")
    metadata["config"]["preset"] = "residual-encoder-1"
    save_checkpoint(tmp_path / "other.safetensors", tensors, metadata)
    with pytest.raises(CheckpointError, match="do not fit"):
        ComDefend.from_checkpoint(tmp_path / "other.safetensors")


def test_classifier_checkpoint_is_not_a_purifier(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c.safetensors", {"w": torch.zeros(1)}, {"kind": "classifier"})
    with pytest.raises(CheckpointError, match="'classifier'"):
        ComDefend.from_checkpoint(tmp_path / "c.safetensors")


def test_pickle_is_refused_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        ComDefend.from_checkpoint(tmp_path / "evil.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "torch.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        ComDefend.from_checkpoint(tmp_path / "torch.pt")
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path: Path) -> None:
    ComDefend(ComDefendConfig(image_channels=1)).save(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        ComDefend.from_checkpoint(tmp_path / "cut.safetensors")
