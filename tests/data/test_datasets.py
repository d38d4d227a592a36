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


def test_registered_dataset_loads_through_its_own_loader(tmp_path: Path) -> None:
    from comdefend.data.datasets import DATASETS, DatasetSpec, find_dataset, register_dataset
    from comdefend.data.datasets import ImageSet as Images
    from comdefend.models.classifiers import build_classifier, check_classifier_fits

    (tmp_path / "toy" / "marker").parent.mkdir()
    (tmp_path / "toy" / "marker").write_text("x")
    calls: list[tuple[Path, str]] = []

    def load_toy(folder: Path, split: str) -> Images:
        calls.append((folder, split))
        images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
        return Images("toy", split, images, torch.arange(6) % 3, ["a", "b", "c"], str(folder))

    spec = DatasetSpec(
        "toy",
        channels=3,
        num_classes=3,
        image_size=32,
        loader=load_toy,
        is_present=lambda folder: (folder / "marker").is_file(),
        class_names=("a", "b", "c"),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        subfolders=("toy",),
    )
    register_dataset(spec, aliases=("toy-set",))
    try:
        assert find_dataset("TOY-set", tmp_path) == tmp_path / "toy"
        data = load_dataset("toy", "train", tmp_path)
        assert len(data) == 6 and calls == [(tmp_path / "toy", "train")]
        with pytest.raises(DatasetNotFoundError, match="samples exist for fashion-mnist"):
            load_dataset("toy", "sample")
        with pytest.raises(DatasetNotFoundError, match="toy not found"):
            load_dataset("toy", "test", tmp_path / "elsewhere")
        # the one classifier check reads the new description: 3 channels fit, 10 classes do not
        check_classifier_fits("resnet20", "toy")
        model = build_classifier("resnet20", 10, dataset="toy")  # the toy normalisation
        assert model.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
        with pytest.raises(UsageError, match="10 classes but toy has 3"):
            check_classifier_fits(model, "toy")
        with pytest.raises(UsageError, match="already registered"):
            register_dataset(spec)
    finally:
        DATASETS.remove("toy")
    assert "toy" not in DATASETS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"channels": 0}, "channels must be >= 1"),
        ({"class_names": ("a",)}, "1 class names for 10 classes"),
        ({"mean": (0.5,)}, "both mean and std"),
        ({"mean": (0.5,), "std": (0.5, 0.5)}, "1 value"),
        ({"splits": ("valid",)}, "unknown splits"),
    ],
)
def test_dataset_description_is_checked(changes: dict, message: str) -> None:
    from comdefend.data.datasets import DatasetSpec

    base = {"channels": 1, "num_classes": 10, "image_size": 28}
    with pytest.raises(UsageError, match=message):
        DatasetSpec("bad", **{**base, **changes}, loader=None, is_present=None)  # type: ignore[arg-type]


def test_builtin_descriptions_hold_the_facts() -> None:
    from comdefend.data.datasets import DATASETS

    fashion, cifar10, cifar100 = (DATASETS[n] for n in ("fashion-mnist", "cifar10", "cifar100"))
    assert (fashion.channels, fashion.num_classes, fashion.image_size) == (1, 10, 28)
    assert (cifar10.channels, cifar100.num_classes, cifar100.image_size) == (3, 100, 32)
    assert cifar10.class_names[0] == "airplane" and len(fashion.class_names) == 10
    assert "sample" in cifar10.splits and "sample" not in cifar100.splits
    assert fashion.summary()["mean"] == [0.2860]
