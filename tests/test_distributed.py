"""The torchrun environment, read once for training and evaluation (issue 21, items 11 and 12).

A stray or broken ``WORLD_SIZE`` is one ``error:`` line naming the torchrun variables that are
missing or bad; the time a process waits for the others is ``COMDEFEND_DIST_TIMEOUT``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from comdefend.cli import main
from comdefend.errors import UsageError
from comdefend.evaluation.distributed import ProcessGroup
from comdefend.training.engine import launched_processes, start_processes

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """``environment(WORLD_SIZE="2", ...)``: exactly these torchrun variables are set."""

    def set_variables(**values: str) -> None:
        for name in (*TORCHRUN, "LOCAL_WORLD_SIZE", "COMDEFEND_DIST_TIMEOUT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_variables


def _read_by_both(device: torch.device = torch.device("cpu")) -> None:
    """The two readers: the training engine's and the evaluation's."""
    with pytest.raises(UsageError) as training:
        start_processes(launched_processes(), str(device))
    with pytest.raises(UsageError) as evaluation:
        ProcessGroup.from_environment(device)
    assert str(training.value) == str(evaluation.value)
    raise training.value


FULL = {"RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, "but LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number >= 1"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not a whole number >= 1"),
        ({**FULL, "WORLD_SIZE": "2", "RANK": "2"}, "RANK='2' is not a whole number in [0, 2)"),
        ({**FULL, "WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not a whole number in [0, 2)"),
        ({**FULL, "WORLD_SIZE": "2", "LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a whole number"),
        ({**FULL, "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port"),
    ],
)
def test_stray_or_broken_torchrun_variables(environment, values: dict[str, str], message: str):
    environment(**values)
    with pytest.raises(UsageError, match="torchrun") as error:
        _read_by_both()
    assert message in str(error.value)


def test_without_torchrun_or_with_one_process(environment) -> None:
    for values in ({}, {"WORLD_SIZE": "1"}, {"WORLD_SIZE": "1", "RANK": "junk"}):
        environment(**values)
        processes = launched_processes()
        assert (processes.rank, processes.world_size, processes.distributed) == (0, 1, False)
        assert ProcessGroup.from_environment(torch.device("cpu")).world_size == 1


def test_processes_on_this_machine(environment) -> None:
    """LOCAL_WORLD_SIZE (torchrun's processes on this machine, which share its memory); a
    launcher without it, or with a value out of range, counts every process as local."""
    from comdefend.distributed import launch_environment

    for local, expected in (("2", 2), ("1", 1), (None, 4), ("9", 4), ("x", 4)):
        values = {**FULL, "WORLD_SIZE": "4"}
        if local is not None:
            values["LOCAL_WORLD_SIZE"] = local
        environment(**values)
        assert launch_environment().local_world_size == expected, local
    environment()
    assert launch_environment().local_world_size == 1


def test_eot_keeps_its_draws_within_this_process_share_of_memory(
    environment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EOT keeps every draw's graph only within half the free memory over the processes of
    this machine; a broken torchrun environment counts as one process."""
    from comdefend.defenses import adaptive

    monkeypatch.setattr(adaptive, "_free_memory_bytes", lambda device: 1000)
    cpu = torch.device("cpu")
    environment()
    assert adaptive._keeps_all_draws(4, 125, cpu) and not adaptive._keeps_all_draws(4, 126, cpu)
    environment(**FULL, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    assert adaptive._keeps_all_draws(2, 125, cpu) and not adaptive._keeps_all_draws(2, 126, cpu)
    environment(WORLD_SIZE="2")  # not a job this package could join
    assert adaptive._keeps_all_draws(4, 125, cpu)


@pytest.mark.parametrize(
    ("values", "world"),
    [({"WORLD_SIZE": "2"}, "2"), ({"WORLD_SIZE": "abc"}, "abc")],
)
def test_cli_says_it_in_one_line(
    environment, capsys: pytest.CaptureFixture[str], tmp_path: Path, values, world
) -> None:
    environment(**values)
    for command in (
        ["train", "--dataset", "fashion-mnist", "--device", "cpu", "-o", str(tmp_path / "t")],
        ["evaluate", "--dataset", "fashion-mnist", "--split", "sample", "-c", "fashion-cnn",
         "--n", "2", "-o", str(tmp_path / "e")],
    ):  # fmt: skip
        with pytest.raises(SystemExit) as exited:
            main(command)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert exited.value.code == 2 and len(lines) == 1, err
        assert lines[0].startswith("error: WORLD_SIZE="), err
        assert world in lines[0] and "torchrun" in lines[0], err


# -- how long a process waits for the others ------------------------------------------------
def test_both_readers_join_with_the_timeout(environment, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append({"a": a, **k}))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    environment(WORLD_SIZE="2", **FULL)
    start_processes(launched_processes(), "cpu")
    ProcessGroup.from_environment(torch.device("cpu"))
    environment(WORLD_SIZE="2", **FULL, COMDEFEND_DIST_TIMEOUT="42.5")
    start_processes(launched_processes(), "cpu")
    ProcessGroup.from_environment(torch.device("cpu"))
    timeouts = [call["timeout"] for call in calls]
    assert timeouts == [timedelta(seconds=600)] * 2 + [timedelta(seconds=42.5)] * 2
    for bad in ("0", "-3", "inf", "ten"):
        environment(WORLD_SIZE="2", **FULL, COMDEFEND_DIST_TIMEOUT=bad)
        with pytest.raises(UsageError, match=f"COMDEFEND_DIST_TIMEOUT={bad!r}"):
            _read_by_both()


FROZEN = textwrap.dedent(
    """
    import os, sys, time
    import torch

    reader = sys.argv[1]
    if reader == "training":
        from comdefend.training.engine import launched_processes, start_processes

        processes = launched_processes()
        start_processes(processes, "cpu")
        talk = lambda: processes.reduce_max(True, torch.device("cpu"))
        rank = processes.rank
    else:
        from comdefend.evaluation.distributed import ProcessGroup

        group = ProcessGroup.from_environment(torch.device("cpu"))
        talk = lambda: group.gather_bytes(b"records")
        rank = group.rank
    if rank == 1:
        time.sleep(600)  # frozen, not dead
    started = time.monotonic()
    try:
        talk()
    except Exception as error:
        print(f"gave up after {time.monotonic() - started:.0f} s: {error}", flush=True)
        os._exit(3)  # at once: gloo may abort the interpreter's teardown after a timeout
    """
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("reader", ["training", "evaluation"])
def test_a_frozen_process_is_given_up_after_the_timeout(reader: str) -> None:
    """Without the setting, rank 0 waited torch's default of 30 minutes for a frozen rank 1."""
    base = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src"),
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "COMDEFEND_DIST_TIMEOUT": "4",
    }
    children = [
        subprocess.Popen(
            [sys.executable, "-c", FROZEN, reader],
            env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    started = time.monotonic()
    try:
        out, err = children[0].communicate(timeout=120)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()
    assert children[0].returncode == 3, err[-2000:]
    assert "gave up after" in out
    assert time.monotonic() - started < 100
    if reader == "evaluation":  # the training engine's collectives say it in torch's words
        assert "lost the other processes of this torchrun job" in out
        assert "COMDEFEND_DIST_TIMEOUT=4 s" in out and "--resume continues" in out
