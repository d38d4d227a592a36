"""Image files read as a viewer shows them (issue 15, item 5) and bounded before decoding."""

from __future__ import annotations

import errno
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comdefend.data.images import MAX_PIXELS_ENV, image_channels_of, read_image, write_png
from comdefend.errors import InputError, UsageError


def test_16_bit_grayscale_keeps_its_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)  # was clipped to white
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I;16")
    x = read_image(tmp_path / "g16.png")
    assert x.shape == (1, 1, 4)
    expected = torch.tensor(values.astype(np.float64) / 65535).float()
    torch.testing.assert_close(x[0], expected)
    rgb = read_image(tmp_path / "g16.png", channels=3)
    assert rgb.shape == (3, 1, 4) and torch.equal(rgb[0], rgb[2])
    torch.testing.assert_close(rgb[1], expected)


def test_gray_with_alpha_is_gray_composited_on_white(tmp_path: Path) -> None:
    gray = np.array([[0, 0, 200]], dtype=np.uint8)
    alpha = np.array([[255, 0, 255]], dtype=np.uint8)  # the middle pixel is transparent
    Image.fromarray(np.stack([gray, alpha], -1), mode="LA").save(tmp_path / "la.png")
    assert image_channels_of(tmp_path / "la.png") == 1
    x = read_image(tmp_path / "la.png")
    assert x.shape == (1, 1, 3)  # was read as RGB
    torch.testing.assert_close(x[0, 0], torch.tensor([0.0, 1.0, 200 / 255]))


def test_rgba_and_palette_transparency_are_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (0, 0, 0, 0)  # transparent black: a viewer shows the background
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    x = read_image(tmp_path / "rgba.png")
    torch.testing.assert_close(x[:, 0, 1], torch.ones(3))
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 255, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=1)
    y = read_image(tmp_path / "p.png")
    torch.testing.assert_close(y[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(y[:, 0, 1], torch.ones(3))


def test_other_colour_modes_become_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tiff")  # red in CMYK
    x = read_image(tmp_path / "cmyk.tiff")
    assert x.shape == (3, 2, 3)
    assert x[0].min() > 0.9 and x[1].max() < 0.1
    Image.new("1", (4, 4), 1).save(tmp_path / "bits.png")
    assert torch.equal(read_image(tmp_path / "bits.png"), torch.ones(1, 4, 4))
    Image.new("F", (2, 2), 0.25).save(tmp_path / "float.tiff")
    torch.testing.assert_close(read_image(tmp_path / "float.tiff"), torch.full((1, 2, 2), 0.25))
    Image.new("F", (2, 2), 7.0).save(tmp_path / "hdr.tiff")
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        read_image(tmp_path / "hdr.tiff")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((2, 3), dtype=np.uint8)
    stored[0, 0] = 255  # top-left as stored
    image = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    x = read_image(tmp_path / "phone.jpg")
    assert x.shape == (1, 3, 2)  # upright: taller than wide, as a viewer shows it
    assert x[0, 0, 1] > 0.8 and x[0, 0, 0] < 0.2  # stored top-left is now top-right


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` 8-bit gray pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [12_000, 20_000])  # 144 MP (was accepted), 400 MP (PIL's error)
def test_pixel_count_is_checked_before_decoding(tmp_path: Path, side: int) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(side, side))
    assert bomb.stat().st_size < 2000
    with pytest.raises(InputError, match=f"{MAX_PIXELS_ENV}"):
        read_image(bomb)
    with pytest.raises(InputError, match=f"{MAX_PIXELS_ENV}"):  # its header reader too
        image_channels_of(bomb)


def test_pixel_limit_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("L", (10, 10), 128).save(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "99")
    with pytest.raises(InputError, match="10x10 = 100 pixels, more than the limit of 99"):
        read_image(tmp_path / "small.png")
    assert read_image(tmp_path / "small.png", max_pixels=100).shape == (1, 10, 10)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1_00")
    assert read_image(tmp_path / "small.png").shape == (1, 10, 10)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")
    with pytest.raises(UsageError, match=f"{MAX_PIXELS_ENV} must be a positive integer"):
        read_image(tmp_path / "small.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(UsageError, match=MAX_PIXELS_ENV):
        read_image(tmp_path / "small.png")


def test_a_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="is a folder"):
        read_image(tmp_path)


def test_a_failed_png_write_names_the_png_not_its_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", disk_full)
    with pytest.raises(OSError, match="No space left") as error:
        write_png(tmp_path / "out.png", torch.zeros(3, 4, 4))
    assert error.value.filename == str(tmp_path / "out.png")
    assert list(tmp_path.iterdir()) == []
