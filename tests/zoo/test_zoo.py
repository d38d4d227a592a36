"""The pretrained registry: sha256 verification, loading by name, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import comdefend.zoo as zoo
from comdefend import ComDefend, ComDefendConfig
from comdefend.checkpoint import sha256_of
from comdefend.errors import CheckpointError, UsageError


@pytest.fixture()
def fake_zoo(tmp_path: Path, monkeypatch) -> Path:
    (tmp_path / "weights").mkdir()
    torch.manual_seed(0)
    ComDefend(ComDefendConfig(image_channels=1)).save(tmp_path / "weights" / "tiny.safetensors")
    entry = {
        "name": "tiny",
        "file": "tiny.safetensors",
        "sha256": sha256_of(tmp_path / "weights" / "tiny.safetensors"),
        "kind": "purifier",
        "dataset": "fashion-mnist",
        "architecture": "plain",
        "command": "comdefend train ...",
        "metrics": {"heldout_psnr_db": 20.0},
        "hardware": "test",
        "iterations": 1,
    }
    (tmp_path / "registry.json").write_text(json.dumps([entry]))
    monkeypatch.setattr(zoo, "ZOO_FOLDER", tmp_path)
    monkeypatch.setattr(zoo, "REGISTRY_FILE", tmp_path / "registry.json")
    return tmp_path


def test_load_by_name(fake_zoo: Path) -> None:
    assert zoo.list_pretrained() == ["tiny"] and zoo.list_pretrained("classifier") == []
    model = zoo.load_pretrained("tiny")
    assert isinstance(model, ComDefend) and not model.training


def test_corrupt_file_is_refused(fake_zoo: Path) -> None:
    path = fake_zoo / "weights" / "tiny.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.load_pretrained("tiny")


def test_unknown_name_lists_valid(fake_zoo: Path) -> None:
    with pytest.raises(UsageError, match="valid: tiny"):
        zoo.load_pretrained("resnet")


@pytest.mark.parametrize("name", zoo.list_pretrained())
def test_shipped_entries_match_their_sha256(name: str) -> None:
    entry = zoo.get_entry(name)
    assert sha256_of(entry.path) == entry.sha256
    assert entry.command and entry.hardware and entry.license
