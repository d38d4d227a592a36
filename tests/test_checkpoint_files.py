"""Atomic writes leave nothing behind, even when the writer is killed (issue 15, item 10)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from comdefend.checkpoint import (
    TEMPORARY_SUFFIX,
    atomic_write,
    atomic_write_text,
    clean_stale_temporary_files,
)

WRITER = """
import sys, time
from comdefend.checkpoint import atomic_write

def write(tmp):
    tmp.write_bytes(b"x" * 4_000_000)
    print(tmp, flush=True)
    time.sleep(60)

atomic_write(sys.argv[1], write)
"""


def test_sigkill_during_a_write_leaves_a_file_the_next_write_removes(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint.safetensors"
    target.write_bytes(b"the previous checkpoint")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert writer.stdout is not None
    temporary = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert temporary.exists() and temporary.stat().st_size == 4_000_000
    assert temporary.name.startswith(".checkpoint.safetensors~")
    assert temporary.name.endswith(TEMPORARY_SUFFIX)
    assert target.read_bytes() == b"the previous checkpoint"  # the atomic part held
    atomic_write_text(tmp_path / "log.json", "{}")  # the next write in that folder
    assert not temporary.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.safetensors", "log.json"]


def test_only_stale_temporary_files_are_removed(tmp_path: Path) -> None:
    import socket

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".model.safetensors~{host}~{dead.pid}~abc{TEMPORARY_SUFFIX}"
    live = tmp_path / f".model.safetensors~{host}~{os.getppid()}~def{TEMPORARY_SUFFIX}"
    foreign_old = tmp_path / f".a~other-host~1~ghi{TEMPORARY_SUFFIX}"
    foreign_new = tmp_path / f".b~other-host~1~jkl{TEMPORARY_SUFFIX}"
    not_ours = [tmp_path / ".notes.tmp", tmp_path / f"user{TEMPORARY_SUFFIX}"]
    for file in (stale, live, foreign_old, foreign_new, *not_ours):
        file.write_bytes(b"")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(foreign_old, (day_ago, day_ago))
    assert set(clean_stale_temporary_files(tmp_path)) == {stale, foreign_old}
    assert all(p.exists() for p in (live, foreign_new, *not_ours))


def test_a_failed_write_removes_its_temporary_file(tmp_path: Path) -> None:
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    try:
        atomic_write(tmp_path / "x.bin", fail)
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []
