"""Explicit downloads (checksum-verified, atomic) and image-folder training data."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch

from comdefend.data import download as download_module
from comdefend.data.images import write_png
from comdefend.errors import ComDefendError, UsageError
from comdefend.training import TrainConfig, train
from comdefend.training.batches import FolderPatches


def _tarball() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        data = b"hello"
        info = tarfile.TarInfo("cifar-10-batches-py/readme.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_download_verifies_checksum_and_extracts(tmp_path: Path, monkeypatch) -> None:
    payload = _tarball()
    good = hashlib.md5(payload).hexdigest()
    monkeypatch.setattr(
        download_module.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload)
    )
    monkeypatch.setitem(download_module.SOURCES, "cifar10", [("https://x/c.tar.gz", good)])
    download_module.download_dataset("cifar10", tmp_path)
    assert (tmp_path / "cifar-10-batches-py" / "readme.txt").read_text() == "hello"

    monkeypatch.setitem(download_module.SOURCES, "cifar100", [("https://x/d.tar.gz", "0" * 32)])
    with pytest.raises(ComDefendError, match="checksum"):
        download_module.download_dataset("cifar100", tmp_path)
    assert not list(tmp_path.glob("*.part")) and not (tmp_path / "d.tar.gz").exists()
    with pytest.raises(UsageError, match="valid"):
        download_module.download_dataset("imagenet", tmp_path)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    for label in ("cats", "dogs"):
        for index in range(3):
            write_png(tmp_path / "imgs" / label / f"{index}.png", torch.rand(3, 40, 50))
    write_png(tmp_path / "imgs" / "dogs" / "tiny.png", torch.rand(3, 8, 8))  # too small: skipped
    return tmp_path / "imgs"


def test_folder_patches_are_random_crops_and_deterministic(image_folder: Path) -> None:
    batches = FolderPatches(image_folder, batch_size=4, patch=32, seed=1)
    assert len(batches.images) == 6
    first = batches(0)
    assert first.shape == (4, 3, 32, 32) and 0 <= float(first.min()) <= float(first.max()) <= 1
    assert torch.equal(first, FolderPatches(image_folder, 4, 32, seed=1)(0))
    assert not torch.equal(first, batches(1))


def test_training_on_an_image_folder(image_folder: Path, tmp_path: Path) -> None:
    summary = train(
        TrainConfig(
            dataset="folder",
            data_dir=str(image_folder),
            out=str(tmp_path / "run"),
            iterations=2,
            batch_size=2,
            checkpoint_every=1,
        ),
        progress=False,
    )
    assert summary["iterations"] == 2 and (tmp_path / "run" / "model.safetensors").exists()
    with pytest.raises(UsageError, match="data-dir"):
        train(TrainConfig(dataset="folder", out=str(tmp_path / "r2"), iterations=1), progress=False)
