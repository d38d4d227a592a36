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


def test_zoo_names_stand_for_checkpoint_paths(
    fake_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comdefend.defenses import parse_defense

    ref = zoo.resolve_weights("tiny")
    shipped = fake_zoo / "weights" / "tiny.safetensors"
    assert (ref.kind, ref.zoo_name, ref.path, ref.source) == ("zoo", "tiny", shipped, "tiny")
    assert ref.sha256 == sha256_of(shipped) and zoo.resolve_weights(ref) is ref
    assert zoo.resolve_weights("zoo:tiny").source == "zoo:tiny"
    local = tmp_path / "elsewhere.safetensors"
    local.write_bytes(shipped.read_bytes())
    file_ref = zoo.resolve_weights(str(local))
    assert (file_ref.kind, file_ref.path, file_ref.zoo_name) == ("file", local, None)
    assert file_ref.to_dict() == {
        "source": str(local),
        "kind": "file",
        "path": str(local),
        "sha256": ref.sha256,
        "zoo_name": None,
    }
    with pytest.raises(CheckpointError, match="not found: no-such-model and no shipped model"):
        zoo.resolve_weights("no-such-model")
    with pytest.raises(UsageError, match="unknown pretrained model 'nope'; valid: tiny"):
        zoo.resolve_weights("zoo:nope")
    defense = parse_defense("comdefend:tiny@noise=0")
    assert defense.name.split("@")[0] == "comdefend:tiny"  # reports name the model as given
    assert defense.params()["weights"]["kind"] == "zoo"
    assert parse_defense(defense.name).name == defense.name
    with pytest.raises(CheckpointError, match="not found"):
        parse_defense("comdefend:no-such-model")


def test_local_folder_named_like_a_zoo_model_says_how_to_pick(
    fake_zoo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    with pytest.raises(UsageError, match=r"both a local folder .* write zoo:tiny .* or ./tiny"):
        zoo.resolve_weights("tiny")
    assert zoo.resolve_weights("zoo:tiny").kind == "zoo"
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        zoo.resolve_weights("./tiny")
    (tmp_path / "tiny").rmdir()
    (tmp_path / "tiny").write_bytes((fake_zoo / "weights" / "tiny.safetensors").read_bytes())
    with pytest.raises(UsageError, match="both a local file"):
        ComDefend.from_checkpoint("tiny")
    assert ComDefend.from_checkpoint("./tiny").weights.kind == "file"
    assert ComDefend.from_checkpoint(Path("tiny")).weights.kind == "file"  # a Path is a file


def test_loaders_keep_the_reference_and_refuse_a_file_changed_after_resolution(
    fake_zoo: Path, tmp_path: Path
) -> None:
    model = zoo.load_pretrained("tiny")
    assert model.weights is not None and model.weights.source == "zoo:tiny"
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((fake_zoo / "weights" / "tiny.safetensors").read_bytes())
    ref = zoo.resolve_weights(str(copy))
    assert ComDefend.from_checkpoint(ref).weights is ref
    ComDefend(ComDefendConfig(image_channels=1, code_channels=2)).save(copy)
    with pytest.raises(CheckpointError, match="changed since it was resolved"):
        ComDefend.from_checkpoint(ref)


def test_unknown_name_lists_valid(fake_zoo: Path) -> None:
    with pytest.raises(UsageError, match="valid: tiny"):
        zoo.load_pretrained("resnet")


# Entries converted from another package on first use are tested in test_external.py.
SHIPPED = [name for name in zoo.list_pretrained() if zoo.get_entry(name).source is None]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_entries_match_their_sha256(name: str) -> None:
    entry = zoo.get_entry(name)
    assert sha256_of(entry.path) == entry.sha256
    assert entry.command and entry.hardware and entry.license


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_entries_reproduce_their_metric_on_the_sample(name: str) -> None:
    """Each shipped model gives, on 500 embedded test images, the value recorded when it was
    registered, and that value is close to its recorded test-set metric."""
    entry = zoo.get_entry(name)
    measured = zoo.measure_on_sample(name)
    assert measured["sample_images"] == entry.metrics["sample_images"] == 500
    if entry.kind == "classifier":
        assert measured["sample_accuracy"] == pytest.approx(
            entry.metrics["sample_accuracy"],
            abs=0.0021,  # one image of 500 (summation order)
        )
        assert measured["sample_accuracy"] == pytest.approx(
            entry.metrics["test_accuracy"], abs=0.03
        )
    else:
        assert measured["sample_psnr_db"] == pytest.approx(
            entry.metrics["sample_psnr_db"], abs=0.01
        )
        assert measured["sample_psnr_db"] == pytest.approx(
            entry.metrics["heldout_psnr_db"], abs=1.0
        )


def test_zoo_list_cli_verifies_and_lists_every_entry(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    monkeypatch.setenv("COMDEFEND_CACHE", str(tmp_path))  # converted entries go here

    from comdefend.cli import app

    result = CliRunner().invoke(app, ["zoo", "list", "--json", "--verify"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [entry["name"] for entry in listed] == zoo.list_pretrained()
    assert all(entry["sha256"] and entry["command"] for entry in listed)


def test_sha256_is_read_once_and_recomputed_when_the_file_changes(tmp_path: Path) -> None:
    import hashlib
    import os

    file = tmp_path / "w.bin"
    file.write_bytes(b"a" * 100)
    first = sha256_of(file)
    assert first == hashlib.sha256(b"a" * 100).hexdigest()
    assert sha256_of(file) == first
    file.write_bytes(b"b" * 100)  # same size: the modification time tells the change
    stat = file.stat()
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert sha256_of(file) == hashlib.sha256(b"b" * 100).hexdigest()
