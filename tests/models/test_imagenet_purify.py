"""ImageNet-size (224x224) purification: patch mode (the authors' 49 tiles of 32x32) and full
mode, with every ComDefend in the zoo and the authors' RGB model, and gradients for the
bpda / relaxed threat models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comdefend.zoo as zoo
from comdefend import ComDefend, ComDefendConfig, import_official
from comdefend.defenses import ComDefendDefense
from comdefend.defenses.adaptive import make_threat_model_defense

SIZE = 224
ZOO_PURIFIERS = zoo.list_pretrained("purifier")


def _images(n: int, channels: int, seed: int = 0) -> torch.Tensor:
    # Smooth images with texture: closer to photographs than uniform noise.
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 14, 14, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear")
    return (0.8 * smooth + 0.2 * torch.rand(n, channels, SIZE, SIZE, generator=generator)).clamp(
        0, 1
    )


def _official(official_dir: Path) -> ComDefend:
    return import_official(official_dir / "enc20_0.0001.npy", official_dir / "dec20_0.0001.npy")


def test_patch_mode_sends_one_batch_of_49_tiles_per_image_and_stitches_them_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch of 224x224 images is one batch of N*49 patches, each back in its place."""
    model = ComDefend(ComDefendConfig(purify_mode="patch")).eval()
    calls: list[tuple[int, ...]] = []

    def tile_mean(tiles: torch.Tensor) -> torch.Tensor:  # each tile becomes its own mean
        calls.append(tuple(tiles.shape))
        return tiles.mean(dim=(1, 2, 3), keepdim=True).expand_as(tiles).clone()

    monkeypatch.setattr(model, "_reconstruction_only", tile_mean)
    x = _images(3, 3)
    out = model.purify(x)
    assert calls == [(3 * 49, 3, 32, 32)]
    for image, row, col in [(0, 0, 0), (1, 3, 6), (2, 6, 2)]:
        tile = x[image, :, 32 * row : 32 * row + 32, 32 * col : 32 * col + 32]
        assert torch.allclose(out[image, :, 32 * row : 32 * row + 32, 32 * col], tile.mean())


@pytest.mark.slow
@pytest.mark.parametrize("name", [*ZOO_PURIFIERS, "official-rgb"])
def test_every_comdefend_purifies_224_in_patch_and_full_mode(
    name: str, request: pytest.FixtureRequest
) -> None:
    if name == "official-rgb":
        model = _official(request.getfixturevalue("official_dir"))
    else:
        model = zoo.load_pretrained(name)
    channels = model.config.image_channels
    x = _images(1, channels)
    with torch.no_grad():
        patch = model.purify(x, mode="patch")
        full = model.purify(x, mode="full")
        corner = model.purify(x[..., 32:64, 64:96], mode="full")  # one tile on its own
    for out in (patch, full):
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert 0 <= out.min() and out.max() <= 1
    # Patch mode purifies each 32x32 tile independently of its neighbours.
    assert torch.allclose(patch[..., 32:64, 64:96], corner, atol=1e-5)
    assert not torch.allclose(patch, full, atol=1e-3)  # full mode sees across tile borders
    # The purification is a reconstruction, not an unrelated image.
    assert (patch - x).abs().mean() < 0.12 and (full - x).abs().mean() < 0.12


@pytest.mark.slow
@pytest.mark.parametrize("purify_mode", ["patch", "full"])
def test_official_model_at_224_is_differentiable_for_bpda_and_relaxed(
    official_dir: Path, purify_mode: str
) -> None:
    model = _official(official_dir)
    model.config.purify_mode = purify_mode
    defense = ComDefendDefense(model)
    x = _images(2, 3).requires_grad_(True)
    for threat_model in ("bpda", "relaxed"):
        view = make_threat_model_defense(defense, threat_model)
        assert view is not None
        (gradient,) = torch.autograd.grad(view(x).square().sum(), x)
        assert gradient.shape == x.shape and torch.isfinite(gradient).all()
        # Every image and every one of the 49 tiles gets a gradient.
        per_tile = gradient.abs().reshape(2, 3, 7, 32, 7, 32).sum(dim=(1, 3, 5))
        assert (per_tile > 0).all(), f"{threat_model}: tiles without gradient"
        assert not torch.equal(gradient[0], gradient[1])
