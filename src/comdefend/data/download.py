"""Explicit dataset downloads (``comdefend download NAME``); never called implicitly.

Files are fetched to a ``.part`` file, checked against their published MD5 and only then moved
into place; archives are extracted with tarfile's ``data`` filter (no absolute paths, links or
device files).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

from comdefend.errors import ComDefendError, UsageError

_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SOURCES: dict[str, list[tuple[str, str]]] = {
    "cifar10": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
            "c58f30108f718f92721af3b95e74349a",
        ),
    ],
    "cifar100": [
        (
            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85",
        ),
    ],
    "fashion-mnist": [
        (_FASHION + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        (_FASHION + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        (_FASHION + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        (_FASHION + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12e480ee83cd310"),
    ],
}


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, md5: str, target: Path, timeout: float) -> Path:
    if target.exists() and _md5(target) == md5:
        return target
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, part.open("wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        part.unlink(missing_ok=True)
        raise ComDefendError(f"download of {url} failed: {error}") from error
    if _md5(part) != md5:
        part.unlink(missing_ok=True)
        raise ComDefendError(f"{url}: checksum mismatch (expected MD5 {md5}); nothing was kept")
    os.replace(part, target)
    return target


def download_dataset(name: str, data_dir: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download ``name`` into ``data_dir`` (the folder ``--data-dir`` should then point at)."""
    if name not in SOURCES:
        raise UsageError(f"cannot download {name!r}; valid: {', '.join(SOURCES)}")
    root = Path(data_dir)
    folder = root / "fashion-mnist" if name == "fashion-mnist" else root
    folder.mkdir(parents=True, exist_ok=True)
    for url, md5 in SOURCES[name]:
        file = _fetch(url, md5, folder / url.rsplit("/", 1)[1], timeout)
        if file.name.endswith(".tar.gz"):
            with tarfile.open(file) as archive:
                archive.extractall(root, filter="data")
    return folder
