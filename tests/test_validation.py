"""The shared checks behind every command's flags (comdefend.validation)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from comdefend import validation
from comdefend.errors import UsageError
from comdefend.models.presets import get_preset, preset_summary


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "3", None])
def test_positive_int_refuses(bad: object) -> None:
    with pytest.raises(UsageError, match="--n must be an integer >= 1"):
        validation.positive_int(bad, "--n")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, True, "1"])
def test_non_negative_float_refuses(bad: object) -> None:
    with pytest.raises(UsageError, match="--noise-std must be"):
        validation.non_negative_float(bad, "--noise-std")


def test_floats_and_seeds() -> None:
    assert validation.non_negative_float(0, "--x") == 0.0
    with pytest.raises(UsageError, match="> 0"):
        validation.positive_float(0.0, "--lr")
    assert validation.seed_value(2**63 - 1) == 2**63 - 1
    for bad in (-1, 2**63, 2**67, True):
        with pytest.raises(UsageError, match="--seed must be an integer in 0..2\\*\\*63-1"):
            validation.seed_value(bad)


def test_set_threads_no_longer_ignores_zero() -> None:
    before = torch.get_num_threads()
    for bad in (0, -1):
        with pytest.raises(UsageError, match="threads must be an integer >= 1"):
            validation.set_threads(bad)
    validation.set_threads(None)
    assert torch.get_num_threads() == before


def test_code_channels_zero_is_not_the_default() -> None:
    with pytest.raises(UsageError, match="code_channels"):
        preset_summary(get_preset("plain"), 3, code_channels=0)  # was silently 12


def test_devices() -> None:
    assert validation.resolve_device("cpu") == torch.device("cpu")
    assert validation.device_name(" CPU ") == "cpu"
    for bad in ("tpu", "cuda:x", "", "gpu"):
        with pytest.raises(UsageError, match="valid: auto, cpu, cuda, cuda:N"):
            validation.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            validation.resolve_device("cuda:0")


def test_output_paths(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert validation.output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # nothing is created
    with pytest.raises(UsageError, match="is a file; give a folder"):
        validation.output_folder(a_file)
    with pytest.raises(UsageError, match="is a file, not a folder"):
        validation.output_folder(a_file / "sub")
    with pytest.raises(UsageError, match="is a folder; give a file name"):
        validation.output_file(tmp_path, "-o")
    assert validation.output_file(tmp_path / "m.safetensors") == tmp_path / "m.safetensors"


def test_outputs_spare_inputs(tmp_path: Path) -> None:
    source = tmp_path / "in" / "a.png"
    source.parent.mkdir()
    source.write_bytes(b"")
    validation.outputs_spare_inputs([source], tmp_path / "out", [tmp_path / "out" / "a.png"])
    with pytest.raises(UsageError, match="is the folder of the input"):
        validation.outputs_spare_inputs([source.parent], tmp_path / "in" / ".." / "in")
    link = tmp_path / "elsewhere"
    link.symlink_to(source)
    with pytest.raises(UsageError, match="would overwrite the input"):
        validation.outputs_spare_inputs([source], tmp_path / "out", [link])
