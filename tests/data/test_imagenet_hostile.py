"""Hostile ImageNet folders: duplicated rows, paths leading out, odd labels.csv encodings and
layouts, decompression bombs and crop sizes that would exhaust memory. Each ends in one
:class:`~comdefend.errors.InputError` or :class:`~comdefend.errors.UsageError` naming the file."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comdefend.data.imagenet import IMAGENET_WNIDS, ImageNetTransform, load_imagenet
from comdefend.errors import InputError, UsageError

pytestmark = pytest.mark.filterwarnings("ignore:.*smaller than the.*crop were upscaled")

TENCH = IMAGENET_WNIDS[0]


def _png(path: Path, size: tuple[int, int] = (40, 36), value: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(path.name))
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    if value is not None:
        array[...] = value
    Image.fromarray(array).save(path)
    return path


def _sample(folder: Path, names: list[str], header: str = "file,label,wnid,name") -> Path:
    """A labels.csv folder whose rows all name class 0 (tench)."""
    for name in dict.fromkeys(names):
        if "/" not in name and not name.startswith(".."):
            _png(folder / "images" / name)
    rows = [f"{name},0,{TENCH},tench" for name in names]
    (folder / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return folder


def _bomb(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` gray pixels (a few hundred bytes:
    one compressed row; PIL reads the size from the header alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


# --- duplicated rows (issue 21, item 3) ---------------------------------------------------------


def test_an_image_listed_twice_is_refused_naming_it_and_its_rows(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "s", ["a.png", "b.png", "a.png", "a.png", "a.png"])
    with pytest.raises(InputError, match=r"labels\.csv.*a\.png.*4 times.*lines 2, 4, 5, 6"):
        load_imagenet(folder)


def test_the_same_file_spelled_twice_is_a_duplicate(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "s", ["a.png", "./a.png"])
    with pytest.raises(InputError, match=r"a\.png.*2 times.*lines 2, 3"):
        load_imagenet(folder)
    # images/a.png and a.png, found through the images/ folder or the folder itself
    (folder / "labels.csv").write_text("file,label\na.png,0\nimages/a.png,0\n")
    with pytest.raises(InputError, match="2 times"):
        load_imagenet(folder)


# --- paths leading out of the dataset folder (item 7) ------------------------------------------


def test_absolute_and_parent_paths_in_labels_csv_are_refused(tmp_path: Path) -> None:
    outside = _png(tmp_path / "secret.png")
    folder = _sample(tmp_path / "s", ["a.png"])
    for entry in (str(outside), "../secret.png", "../../s/../secret.png"):
        (folder / "labels.csv").write_text(f"file,label\na.png,0\n{entry},0\n")
        with pytest.raises(InputError, match=r"labels\.csv, line 3: .*outside"):
            load_imagenet(folder)


def test_symbolic_links_leading_out_are_refused_in_both_layouts(tmp_path: Path) -> None:
    outside = _png(tmp_path / "elsewhere" / "secret.png")
    folder = _sample(tmp_path / "s", ["a.png"])
    os.symlink(outside, folder / "images" / "link.png")
    (folder / "labels.csv").write_text("file,label\na.png,0\nlink.png,0\n")
    with pytest.raises(InputError, match=r"line 3: .*link\.png.*symbolic link.*outside"):
        load_imagenet(folder)
    # a link that stays inside the folder is fine
    os.symlink(folder / "images" / "a.png", folder / "images" / "inside.png")
    (folder / "labels.csv").write_text("file,label\ninside.png,0\n")
    assert len(load_imagenet(folder)) == 1

    classes = tmp_path / "classes"
    _png(classes / TENCH / "good.png")
    os.symlink(outside, classes / TENCH / "link.png")
    with pytest.raises(InputError, match=r"link\.png.*symbolic link.*outside"):
        load_imagenet(classes)
    (classes / TENCH / "link.png").unlink()
    os.symlink(outside.parent, classes / IMAGENET_WNIDS[1])  # a class folder leading out
    with pytest.raises(InputError, match=r"secret\.png.*outside"):
        load_imagenet(classes)


def test_a_linked_dataset_folder_itself_is_fine(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "real", ["a.png"])
    os.symlink(folder, tmp_path / "alias")
    assert len(load_imagenet(tmp_path / "alias")) == 1


# --- labels.csv layouts and encodings (item 12) -------------------------------------------------


def test_columns_in_any_order_and_a_byte_order_mark(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "s", ["a.png", "b.png"])
    (folder / "labels.csv").write_text(f"name,wnid,label,file\ntench,{TENCH},0,a.png\nx,,0,b.png\n")
    assert load_imagenet(folder).labels.tolist() == [0, 0]
    (folder / "labels.csv").write_bytes(b"\xef\xbb\xbffile,label\r\na.png,0\r\n")
    assert load_imagenet(folder).labels.tolist() == [0]
    (folder / "labels.csv").write_text(" file , label \n a.png , 0 \n")  # spaces around fields
    assert load_imagenet(folder).labels.tolist() == [0]


def test_short_and_long_rows_name_the_file_and_line(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "s", ["a.png"])
    for rows, message in [
        ("a.png,0,n01440764,tench\na.png\n", "line 3: 1 field"),
        ("label,file\n0\n", "line 2: 1 field"),
        ("a.png,0,n01440764,tench,extra\n", "line 2: 5 fields"),
    ]:
        text = rows if rows.startswith("label") else "file,label,wnid,name\n" + rows
        (folder / "labels.csv").write_text(text)
        with pytest.raises(InputError, match=rf"labels\.csv, {message}"):
            load_imagenet(folder)


def test_undecodable_bytes_name_the_file_and_line(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "s", ["a.png"])
    (folder / "labels.csv").write_bytes(b"file,label,wnid,name\na.png,0,n01440764,caf\xe9\n")
    with pytest.raises(InputError, match=r"labels\.csv, line 2: .*UTF-8"):
        load_imagenet(folder)


def test_empty_or_headerless_tables_are_named(tmp_path: Path) -> None:
    folder = _sample(tmp_path / "s", ["a.png"])
    (folder / "labels.csv").write_text("")
    with pytest.raises(InputError, match=r"labels\.csv lacks the column"):
        load_imagenet(folder)
    (folder / "labels.csv").write_text("file,file,label\na.png,a.png,0\n")
    with pytest.raises(InputError, match=r"labels\.csv.*column 'file' twice"):
        load_imagenet(folder)
    (folder / "labels.csv").write_text("file,label\n,0\n")
    with pytest.raises(InputError, match=r"line 2: empty file name"):
        load_imagenet(folder)


def _classifier(folder: Path) -> str:
    """An untrained ResNet-20 with ImageNet's 1,000 classes (takes any image size)."""
    from comdefend.models.classifiers import build_classifier, save_classifier

    model = build_classifier("resnet20", 1000, dataset="imagenet")
    return str(save_classifier(model, folder / "resnet20-imagenet.safetensors"))


def test_hostile_folders_are_one_error_line_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from comdefend.cli import main

    classifier = _classifier(tmp_path)
    folder = _sample(tmp_path / "s", ["a.png", "a.png"])
    bombed = _sample(tmp_path / "b", ["a.png"])
    _bomb(bombed / "images" / "a.png", 20_000, 20_000)
    for data, named in [(folder, "a.png"), (bombed, "a.png declares 20000x20000")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["test-classifier", "-c", classifier, "--data-dir", str(data), "--json"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 1 and "Traceback" not in error
        assert error.startswith("error: ") and error.count("\n") == 1 and named in error


# --- the pixel budget and the crop size (item 6) ------------------------------------------------


def test_a_decompression_bomb_is_refused_in_both_layouts(tmp_path: Path) -> None:
    bomb = _bomb(tmp_path / "s" / "images" / "bomb.png", 20_000, 20_000)  # 400 megapixels
    assert bomb.stat().st_size < 100_000
    folder = _sample(tmp_path / "s", ["a.png"])
    (folder / "labels.csv").write_text("file,label\na.png,0\nbomb.png,0\n")
    with pytest.raises(InputError, match=r"bomb\.png declares 20000x20000.*COMDEFEND_MAX_IMAGE"):
        load_imagenet(folder)
    classes = tmp_path / "classes" / "val"
    _png(classes / TENCH / "good.png")
    _bomb(classes / TENCH / "bomb.png", 20_000, 20_000)
    with pytest.raises(InputError, match=r"bomb\.png declares"):
        load_imagenet(tmp_path / "classes")


def test_the_pixel_budget_is_the_one_of_the_other_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _sample(tmp_path / "s", ["a.png"])  # 40 x 36 = 1,440 pixels
    monkeypatch.setenv("COMDEFEND_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(InputError, match=r"a\.png declares 40x36"):
        load_imagenet(folder, image_size=8)
    monkeypatch.setenv("COMDEFEND_MAX_IMAGE_PIXELS", "2000")
    assert len(load_imagenet(folder, image_size=8, resize_size=8)) == 1


def test_resizing_a_long_thin_image_is_bounded_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 x 4,000 pixels pass the budget, but its shorter side resized to 256 would make it
    256 x 512,000 (131 megapixels): refused before resizing, naming the file."""
    folder = tmp_path / "s"
    _png(folder / "images" / "thin.png", size=(2, 4000))
    (folder / "labels.csv").write_text("file,label\nthin.png,0\n")
    with pytest.raises(InputError, match=r"thin\.png.*resiz.*256x512000.*limit"):
        load_imagenet(folder)
    _png(folder / "images" / "thin.png", size=(2, 400))  # 256 x 51,200 once resized
    assert load_imagenet(folder).images.shape == (1, 3, 224, 224)
    monkeypatch.setenv("COMDEFEND_MAX_IMAGE_PIXELS", "1000000")
    with pytest.raises(InputError, match=r"thin\.png.*256x51200"):
        load_imagenet(folder)


def test_the_crop_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    for size in (9000, 100_000):
        with pytest.raises(UsageError, match=rf"image size {size} is above the limit of 1024"):
            ImageNetTransform(size)
    monkeypatch.setenv("COMDEFEND_MAX_IMAGE_SIZE", "2048")
    assert ImageNetTransform(2048).image_size == 2048
    with pytest.raises(UsageError, match="must be"):
        ImageNetTransform(0)


def test_image_size_flag_and_config_are_bounded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from comdefend.cli import main
    from comdefend.evaluation.config import EvaluationConfig, validate_config

    folder = _sample(tmp_path / "s", ["a.png"])
    classifier = _classifier(tmp_path)
    for command in ("test-classifier", "evaluate"):
        arguments = [command, "-c", classifier, "--dataset", "imagenet", "--data-dir", str(folder)]
        with pytest.raises(SystemExit) as exit_info:
            main([*arguments, "--image-size", "100000"])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2, error
        assert error.strip() == (
            "error: --image-size 100000 is above the limit of 1024 (raise it with "
            "$COMDEFEND_MAX_IMAGE_SIZE if you need more)"
        )
    config = EvaluationConfig(dataset="imagenet", classifier="x", image_size=9000)
    with pytest.raises(UsageError, match="image size 9000 is above the limit"):
        validate_config(config)
