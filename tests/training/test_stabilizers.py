"""``--stabilize`` messages that say what is wrong (issue 21, item 13)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from comdefend.cli import main
from comdefend.errors import UsageError
from comdefend.training.stabilizers import Stabilization, parse_stabilizers
from comdefend.training.trainer import TrainConfig


@pytest.mark.parametrize("text", ["none,rollback", "rollback,none", "None , clip-grad", "none=1"])
def test_none_is_documented_and_stands_alone(text: str) -> None:
    with pytest.raises(UsageError) as error:
        parse_stabilizers(text)
    message = str(error.value)
    assert "unknown" not in message and "valid:" not in message
    assert "'none' turns every measure off" in message and "alone" in message


@pytest.mark.parametrize("text", ["amsgrad=3", "amsgrad=0", "cosine-decay=0.5", "amsgrad=x"])
def test_switches_take_no_value(text: str) -> None:
    name = text.partition("=")[0]
    with pytest.raises(UsageError, match=f"{name} is on or off: it takes no value"):
        parse_stabilizers(text)
    assert parse_stabilizers(name) == {name: 1.0}  # named alone: on


def test_switches_take_no_value_through_the_python_api() -> None:
    assert Stabilization.from_names({"amsgrad": 1.0}).amsgrad
    with pytest.raises(UsageError, match="amsgrad is on or off"):
        Stabilization.from_names({"amsgrad": 3.0})
    with pytest.raises(UsageError, match="cosine-decay is on or off"):
        TrainConfig(stabilize={"cosine-decay": 0.0})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rollback=inf", r"rollback=inf: the factor must lie in \(0, 1\]"),
        ("rollback=nan", r"rollback=nan: the factor must lie in \(0, 1\]"),
        ("rollback=0", r"the factor must lie in \(0, 1\]"),
        ("rollback=2", r"the factor must lie in \(0, 1\]"),
        ("clip-grad=inf", "clip-grad=inf: the value must be a finite number$"),
        ("warmup=nan", "warmup=nan: the value must be a finite number$"),
        ("adam-eps=-inf", "adam-eps=-inf: the value must be a finite number$"),
        ("clip-grad=-1", "clip-grad=-1: the value must be > 0$"),
    ],
)
def test_out_of_range_values_say_which_range(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_stabilizers(text)


def test_an_infinite_value_is_not_called_non_positive() -> None:
    with pytest.raises(UsageError) as error:
        Stabilization.from_names({"clip-grad": math.inf})
    assert "finite" in str(error.value) and "> 0" not in str(error.value)


@pytest.mark.parametrize(
    ("settings", "missing"),
    [({"eval_images": 0}, "--eval-images 0"), ({"dataset": "folder"}, "--dataset folder")],
)
def test_rollback_without_held_out_evaluations_is_refused(
    settings: dict[str, object], missing: str
) -> None:
    """Rollback acts on held-out evaluations (a collapse, the last healthy state): a run without
    them could never use it."""
    with pytest.raises(UsageError, match="rollback needs held-out evaluations") as error:
        TrainConfig(stabilize={"rollback": 0.5}, **settings)  # type: ignore[arg-type]
    assert missing in str(error.value)
    TrainConfig(stabilize={"clip-grad": 1.0}, **settings)  # type: ignore[arg-type]
    TrainConfig(stabilize={"rollback": 0.5}, eval_images=1)


def test_cli_messages(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cases = [
        (["--stabilize", "none,rollback"], "'none' turns every measure off"),
        (["--stabilize", "amsgrad=3"], "amsgrad is on or off: it takes no value"),
        (["--stabilize", "rollback=inf"], "the factor must lie in (0, 1]"),
        (["--stabilize", "rollback", "--eval-images", "0"], "rollback needs held-out evaluations"),
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exited:
            main(["train", "--dataset", "fashion-mnist", "-o", str(tmp_path / "r"), *arguments])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exited.value.code == 2 and len(lines) == 1, err
        assert lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "r").exists()
