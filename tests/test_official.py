"""The authors' released checkpoints: safe import, architecture detection, their numbers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from comdefend import ComDefend, import_official
from comdefend.data import load_dataset, read_image
from comdefend.errors import CheckpointError
from comdefend.official import read_official_arrays


def test_rgb_import_records_the_authors_pipeline(official_dir: Path) -> None:
    model = import_official(official_dir / "enc20_0.0001.npy", official_dir / "dec20_0.0001.npy")
    config = model.config
    assert (config.image_channels, config.code_channels) == (3, 12)
    assert (config.channel_order, config.purify_mode, config.patch_size) == ("BGR", "patch", 32)
    assert config.inference_noise_std == 0.0 and config.output_quantization == "floor"
    # HWIO -> OIHW: kernel [kh, kw, in, out] must land at weight[out, in, kh, kw].
    arrays = read_official_arrays(official_dir / "enc20_0.0001.npy")
    weight = model.encoder[0].weight
    assert weight[5, 2, 0, 1] == torch.tensor(arrays[0][0, 1, 2, 5])


def test_import_round_trip_through_safetensors(official_dir: Path, tmp_path: Path) -> None:
    model = import_official(official_dir / "enc_mnist.npy", official_dir / "dec_mnist.npy")
    model.save(tmp_path / "fm.safetensors")
    loaded = ComDefend.from_checkpoint(tmp_path / "fm.safetensors")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])


def test_swapped_files_are_a_clear_error(official_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="swap"):
        import_official(official_dir / "dec_mnist.npy", official_dir / "enc_mnist.npy")
    with pytest.raises(CheckpointError):
        import_official(official_dir / "enc_mnist.npy", official_dir / "dec20_0.0001.npy")


def test_malicious_object_array_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    array = np.empty(1, dtype=object)
    array[0] = Evil()
    np.savez(tmp_path / "evil.npz", w=array)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        read_official_arrays(tmp_path / "evil.npz")
    assert not marker.exists()
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError):
        read_official_arrays(tmp_path / "plain.pkl")


def test_fashion_mnist_reconstruction_psnr(official_dir: Path, fashion_dir: Path) -> None:
    """The authors' Fashion-MNIST model gives about 28.5 dB (measured on the full test set)."""
    from comdefend.evaluation.reconstruction import reconstruction_report

    model = import_official(official_dir / "enc_mnist.npy", official_dir / "dec_mnist.npy")
    report = reconstruction_report(model, "fashion-mnist", "test", n=300)
    assert 27.5 < report["psnr_db"] < 29.5
    assert report["bits_per_pixel"] == 4
    assert 0.2 < report["bit_density"] < 0.8


def test_rgb_purification_of_the_authors_examples(official_dir: Path) -> None:
    """Purified 224x224 FGSM images stay close to the input, and patch tiling is 32x32."""
    model = import_official(official_dir / "enc20_0.0001.npy", official_dir / "dec20_0.0001.npy")
    adversarial = read_image(official_dir / "attack_image" / "6.png").unsqueeze(0)
    with torch.no_grad():
        purified = model.purify(adversarial)
        corner = model.reconstruct(adversarial[..., 32:64, 64:96])[0]
    assert purified.shape == (1, 3, 224, 224)
    torch.testing.assert_close(purified[..., 32:64, 64:96], corner)
    mse = float(((purified - adversarial) ** 2).mean())
    assert 20 < -10 * np.log10(mse) < 35


def test_dataset_loads(fashion_dir: Path) -> None:
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.max() == 9
