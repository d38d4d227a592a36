"""Datasets: formats, key types, errors that say where we looked."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from comdefend.data import class_balanced_indices, load_dataset
from comdefend.data.images import read_image, write_png
from comdefend.errors import DatasetNotFoundError, InputError, UsageError


def _fake_cifar(folder: Path, bytes_keys: bool) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def key(name: str):
        return name.encode() if bytes_keys else name

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            key("data"): rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            key("labels"): [0, 1, 2, 3],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {key("label_names"): [b"a", b"b", b"c", b"d"] if bytes_keys else ["a", "b", "c", "d"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_accepts_str_and_bytes_keys(tmp_path: Path, bytes_keys: bool) -> None:
    _fake_cifar(tmp_path / "cifar-10-batches-py", bytes_keys)
    train = load_dataset("cifar10", "train", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and train.classes == ["a", "b", "c", "d"]


def test_real_cifar_layout(cifar_dir: Path) -> None:
    test = load_dataset("cifar10", "test", cifar_dir.parent)
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes[0] == "airplane"


def test_missing_dataset_names_where_and_how(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("COMDEFEND_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFoundError, match="looked in.*comdefend download cifar10"):
        load_dataset("cifar10", "test")
    with pytest.raises(UsageError, match="valid"):
        load_dataset("imagenet21k", "test")


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(InputError, match="refusing"):
        load_dataset("cifar10", "test", tmp_path)


def test_class_balanced_indices() -> None:
    labels = torch.arange(100) % 10
    chosen = class_balanced_indices(labels, 3, seed=1)
    assert torch.bincount(labels[chosen]).tolist() == [3] * 10
    assert torch.equal(chosen, class_balanced_indices(labels, 3, seed=1))


def test_image_round_trip_and_bad_files(tmp_path: Path) -> None:
    x = torch.rand(3, 5, 7)
    write_png(tmp_path / "a.png", x)
    y = read_image(tmp_path / "a.png")
    assert y.shape == (3, 5, 7) and float((x - y).abs().max()) <= 0.5 / 255 + 1e-6
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cannot read"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(InputError):
        read_image(tmp_path / "text.png")
