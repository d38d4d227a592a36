"""Checkpoint files: bad weights refused at load time, messages that name what is wrong."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comdefend import ComDefend, ComDefendConfig
from comdefend.checkpoint import check_weights, read_metadata, save_checkpoint
from comdefend.errors import CheckpointError, UsageError
from comdefend.models.classifiers import build_classifier, load_classifier, save_classifier


def _tiny_purifier() -> ComDefend:
    torch.manual_seed(0)
    return ComDefend(ComDefendConfig(image_channels=1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_purifier_weights_are_refused_with_the_tensor_name(
    tmp_path: Path, bad: float
) -> None:
    model = _tiny_purifier()
    state = model.state_dict()
    name = next(iter(state))
    state[name].view(-1)[3] = bad
    save_checkpoint(
        tmp_path / "m.safetensors", state, {"kind": "purifier", "config": model.config.to_dict()}
    )
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds 1 NaN or infinite"):
        ComDefend.from_checkpoint(tmp_path / "m.safetensors")


def test_integer_weights_are_refused_but_batchnorm_counters_load(tmp_path: Path) -> None:
    model = _tiny_purifier()
    state = {
        k: v.round().to(torch.int32) if k.endswith("weight") else v
        for k, v in model.state_dict().items()
    }
    save_checkpoint(
        tmp_path / "int.safetensors", state, {"kind": "purifier", "config": model.config.to_dict()}
    )
    with pytest.raises(CheckpointError, match="has dtype int32; weights must be floating point"):
        ComDefend.from_checkpoint(tmp_path / "int.safetensors")
    classifier = build_classifier("fashion-cnn", dataset="fashion-mnist")
    save_classifier(classifier, tmp_path / "c.safetensors")  # holds int64 num_batches_tracked
    assert load_classifier(tmp_path / "c.safetensors").weights is not None
    state = classifier.state_dict()
    state["head.1.weight"] = state["head.1.weight"].to(torch.bool)
    save_checkpoint(
        tmp_path / "b.safetensors",
        state,
        {"kind": "classifier", "config": classifier.config.to_dict()},
    )
    with pytest.raises(CheckpointError, match="'head.1.weight' has dtype bool"):
        load_classifier(tmp_path / "b.safetensors")
    state = classifier.state_dict()
    state["head.5.bias"][0] = float("nan")
    save_checkpoint(
        tmp_path / "n.safetensors",
        state,
        {"kind": "classifier", "config": classifier.config.to_dict()},
    )
    with pytest.raises(CheckpointError, match="'head.5.bias' holds 1 NaN"):
        load_classifier(tmp_path / "n.safetensors")


def test_check_weights_without_a_model_refuses_every_integer() -> None:
    check_weights({"w": torch.zeros(2)}, "f")
    with pytest.raises(CheckpointError, match="f: tensor 'n' has dtype int64"):
        check_weights({"w": torch.zeros(2), "n": torch.zeros(2, dtype=torch.long)}, "f")


def test_weight_mismatch_names_the_keys(tmp_path: Path) -> None:
    model = _tiny_purifier()
    state = model.state_dict()
    first = next(iter(state))
    del state[first]
    state["extra.weight"] = torch.zeros(1)
    save_checkpoint(
        tmp_path / "m.safetensors", state, {"kind": "purifier", "config": model.config.to_dict()}
    )
    with pytest.raises(CheckpointError, match=rf"missing '{first}'; unexpected 'extra.weight'"):
        ComDefend.from_checkpoint(tmp_path / "m.safetensors")
    other = ComDefend(ComDefendConfig(image_channels=1, code_channels=8))
    save_checkpoint(
        tmp_path / "o.safetensors",
        other.state_dict(),
        {"kind": "purifier", "config": model.config.to_dict()},
    )
    with pytest.raises(
        CheckpointError, match=r"is \(8, 32, 3, 3\) in the file but \(4, 32, 3, 3\)"
    ):
        ComDefend.from_checkpoint(tmp_path / "o.safetensors")


@pytest.mark.parametrize("first_byte", [0x80, ord("("), ord("c")])
def test_corrupt_safetensors_is_not_called_a_pickle(tmp_path: Path, first_byte: int) -> None:
    # A header length whose low byte looks like a pickle opcode, then a broken JSON header.
    header = b'{"comdefend": ' + b" " * (first_byte + 256 - 14)
    path = tmp_path / "broken.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    assert path.read_bytes()[0] == first_byte
    with pytest.raises(CheckpointError, match="a corrupt or truncated safetensors file") as info:
        read_metadata(path)
    assert "pickle" not in str(info.value).split("comdefend never")[0]


def test_real_pickle_is_still_named(tmp_path: Path) -> None:
    import pickle

    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    with pytest.raises(CheckpointError, match="is a Python pickle"):
        read_metadata(path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("code_channels", 10**9, "code_channels 1000000000 is above the limit of 256"),
        ("code_channels", "12", "code_channels must be an integer, got '12'"),
        ("patch_size", 100_000, "patch_size 100000 is above the limit of 1024"),
        ("patch_size", 3.5, "patch_size must be an integer"),
        ("max_tile", [512], "max_tile must be an integer"),
        ("image_channels", True, "image_channels must be an integer"),
        ("threshold", "half", "threshold must be a finite number"),
        ("noise_std", float("nan"), "noise_std must be a finite number"),
        ("inference_mode", "noisy", "inference_mode must be one of hard, relaxed"),
        ("preset", 3, "preset must be a name"),
    ],
)
def test_bad_purifier_metadata_is_a_checkpoint_error(
    tmp_path: Path, field: str, value: object, message: str
) -> None:
    model = _tiny_purifier()
    config = {**model.config.to_dict(), field: value}
    path = tmp_path / "m.safetensors"
    # written by hand: the weights are small, only the metadata claims a huge or odd network
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(path),
        metadata={"comdefend": json.dumps({"kind": "purifier", "config": config})},
    )
    with pytest.raises(CheckpointError, match=message):
        ComDefend.from_checkpoint(path)


def test_size_limits_have_an_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _tiny_purifier()
    model.save(tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match=r"raise it with \$COMDEFEND_MAX_PATCH_SIZE"):
        ComDefend.from_checkpoint(tmp_path / "m.safetensors", patch_size=100_000)  # a flag
    monkeypatch.setenv("COMDEFEND_MAX_PATCH_SIZE", "2_048")  # digits may be grouped
    assert (
        ComDefend.from_checkpoint(tmp_path / "m.safetensors", patch_size=2048).config.patch_size
        == 2048
    )
    with pytest.raises(UsageError, match="above the limit of 2048"):
        ComDefendConfig(patch_size=2049)
    monkeypatch.setenv("COMDEFEND_MAX_PATCH_SIZE", "lots")
    with pytest.raises(UsageError, match="must be a positive integer"):
        ComDefendConfig(patch_size=64)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_classes": "10"}, "num_classes must be an integer"),
        ({"num_classes": 10**9}, "above the limit of 100000"),
        ({"mean": 0.5}, "mean must be 1 to 4 numbers"),
        ({"std": ["a"]}, "std must be a finite number"),
        ({"arch": 7}, "arch must be a string"),
    ],
)
def test_bad_classifier_metadata_is_a_checkpoint_error(
    tmp_path: Path, changes: dict, message: str
) -> None:
    model = build_classifier("fashion-cnn", dataset="fashion-mnist")
    config = {**model.config.to_dict(), **changes}
    save_checkpoint(
        tmp_path / "c.safetensors", model.state_dict(), {"kind": "classifier", "config": config}
    )
    with pytest.raises(CheckpointError, match=message):
        load_classifier(tmp_path / "c.safetensors")
