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

    array = np.empty(18, dtype=object)  # the expected count: the pickle itself is reached
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


def _reference_pipeline(official_dir: Path, image_uint8_rgb: np.ndarray) -> np.ndarray:
    """The authors' ImageNet pipeline written independently in NumPy from the raw HWIO arrays:
    OpenCV-style BGR, /255, 32x32 patches, ComCNN, sigmoid > 0.5, RecCNN, (x*255).astype(uint8).
    """

    def conv_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
        h, w, _ = x.shape
        padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
        out = np.zeros((h, w, kernel.shape[3]), dtype=np.float64)
        for dy in range(3):
            for dx in range(3):
                out += padded[dy : dy + h, dx : dx + w, :] @ kernel[dy, dx].astype(np.float64)
        return out + bias

    def network(x: np.ndarray, arrays: list[np.ndarray], last: str) -> np.ndarray:
        for layer in range(9):
            x = conv_same(x, arrays[2 * layer], arrays[2 * layer + 1])
            if layer < 8:
                x = np.where(x > 0, x, np.expm1(np.minimum(x, 0)))  # ELU
        return 1 / (1 + np.exp(-x)) if last == "sigmoid" else x

    encoder = read_official_arrays(official_dir / "enc20_0.0001.npy")
    decoder = read_official_arrays(official_dir / "dec20_0.0001.npy")
    bgr = image_uint8_rgb[..., ::-1].astype(np.float64) / 255
    out = np.zeros_like(bgr)
    for top in range(0, bgr.shape[0], 32):
        for left in range(0, bgr.shape[1], 32):
            patch = bgr[top : top + 32, left : left + 32]
            code = network(patch - 0.5, encoder, "none")
            bits = (1 / (1 + np.exp(-code)) > 0.5).astype(np.float64)
            out[top : top + 32, left : left + 32] = network(bits, decoder, "sigmoid")
    return (out * 255).astype(np.uint8)[..., ::-1]


def test_purify_cli_reproduces_the_authors_pipeline(official_dir: Path, tmp_path: Path) -> None:
    """``comdefend purify`` with the imported RGB checkpoint against an independent NumPy
    re-implementation of the authors' script, on a 64x64 corner (4 patches) of an FGSM image."""
    import subprocess
    import sys

    from PIL import Image

    source = official_dir / "attack_image" / "6.png"
    with Image.open(source) as image:
        rgb = np.asarray(image.convert("RGB"))
    corner = rgb[:64, :64]
    Image.fromarray(corner).save(tmp_path / "corner.png")
    model = import_official(official_dir / "enc20_0.0001.npy", official_dir / "dec20_0.0001.npy")
    model.save(tmp_path / "official.safetensors")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "comdefend.cli",
            "purify",
            str(tmp_path / "corner.png"),
            "--model",
            str(tmp_path / "official.safetensors"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out" / "corner.png") as image:
        ours = np.asarray(image).astype(np.float64)
    reference = _reference_pipeline(official_dir, corner).astype(np.float64)
    mean_absolute_error = np.abs(ours - reference).mean() / 255
    assert mean_absolute_error <= 1 / 255, mean_absolute_error
    assert np.abs(ours - corner).mean() > 1  # it did purify something


def _official_like(tmp_path: Path, name: str, items: list) -> Path:
    array = np.empty(len(items), dtype=object)
    for index, item in enumerate(items):
        array[index] = item
    np.savez(tmp_path / name, w=array)
    return tmp_path / f"{name}.npz"


def _valid_items() -> list[np.ndarray]:
    widths = [1, 32, 64, 128, 256, 128, 64, 64, 32, 4]
    items: list[np.ndarray] = []
    for c_in, c_out in zip(widths, widths[1:], strict=False):
        items += [np.zeros((3, 3, c_in, c_out), np.float32), np.zeros(c_out, np.float32)]
    return items


def test_small_crafted_npy_fails_fast(tmp_path: Path) -> None:
    """8 KB that unpickle to lists sharing one list: np.asarray would build 2**26 numbers."""
    import time

    nested: list = [0.0]
    for _ in range(26):
        nested = [nested, nested]
    raw = pickle.dumps(nested, protocol=2)
    header = {"descr": "|O", "fortran_order": False, "shape": (18,)}
    path = tmp_path / "crafted.npy"
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.write(raw)
    assert path.stat().st_size < 8192
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="holds a list, not 18 NumPy arrays"):
        read_official_arrays(path)
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"descr": "<f4", "fortran_order": False, "shape": (18,)}, "found dtype float32"),
        ({"descr": "|O", "fortran_order": False, "shape": (10**12,)}, "shape (1000000000000,)"),
    ],
)
def test_npy_header_is_checked_before_any_work(tmp_path: Path, header: dict, message: str) -> None:
    path = tmp_path / "bad.npy"
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_official_arrays(path)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    with pytest.raises(CheckpointError, match="not a NumPy array file"):
        read_official_arrays(tmp_path / "garbage.npy")


def test_official_arrays_must_be_finite_floats_of_bounded_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert len(read_official_arrays(_official_like(tmp_path, "ok", _valid_items()))) == 18
    items = _valid_items()
    items[3] = items[3].astype(np.int64)
    with pytest.raises(CheckpointError, match="array 3 \\(layer 1 bias\\) is int64"):
        read_official_arrays(_official_like(tmp_path, "int", items))
    items = _valid_items()
    items[4][0, 0, 0, 0] = np.nan
    with pytest.raises(CheckpointError, match="tensor 'array 4' holds 1 NaN"):
        read_official_arrays(_official_like(tmp_path, "nan", items))
    import comdefend.official as official

    monkeypatch.setattr(official, "MAX_ARRAY_ELEMENTS", 100_000)  # their largest has 294,912
    with pytest.raises(CheckpointError, match="has 294,912 elements, more than any"):
        read_official_arrays(tmp_path / "ok.npz")
    monkeypatch.setenv("COMDEFEND_MAX_OFFICIAL_BYTES", "1000")
    with pytest.raises(CheckpointError, match="raise \\$COMDEFEND_MAX_OFFICIAL_BYTES"):
        read_official_arrays(tmp_path / "ok.npz")
