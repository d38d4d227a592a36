"""SIGTERM (a scheduler's preemption) gets Ctrl-C's handling in every command (issue 21, item 10):
the command's own message and exit 130, not a silent exit 143.

Each case runs ``comdefend`` in a child process whose slow part is replaced by a wait, sends it
SIGTERM once it is inside that part, and reads its exit status and stderr.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Replaces MODULE.NAME by a function that touches READY (and writes SAVED, as a resumable
# command would once it has kept something), then waits to be stopped; then runs the CLI.
CHILD = textwrap.dedent(
    """
    import importlib, sys, time
    from pathlib import Path

    module, name, ready, saved, *arguments = sys.argv[1:]

    def waiting(*args, **kwargs):
        if saved:
            Path(saved).parent.mkdir(parents=True, exist_ok=True)
            Path(saved).write_bytes(b"")
        Path(ready).write_text("ready")
        time.sleep(120)

    setattr(importlib.import_module(module), name, waiting)
    from comdefend.cli import main

    main(arguments)
    """
)


def _terminate_when_ready(command: list[str], ready: Path) -> tuple[int, str]:
    """Run ``command``, SIGTERM it once it has written ``ready``: (exit status, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    child = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the command never got going: {child.communicate()[1]}")
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return child.returncode, err


def _terminated(
    tmp_path: Path, target: str, arguments: list[str], saved: Path | None = None
) -> tuple[int, str]:
    """Run the CLI with ``target`` waiting, SIGTERM it there: (exit status, stderr)."""
    module, _, name = target.rpartition(".")
    ready = tmp_path / "ready"
    command = [sys.executable, "-c", CHILD, module, name, str(ready), str(saved or "")]
    return _terminate_when_ready([*command, *arguments], ready)


def test_sigterm_during_evaluate_prints_the_resume_hint(tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, err = _terminated(
        tmp_path,
        "comdefend.evaluation.harness.evaluate",
        ["evaluate", "--dataset", "fashion-mnist", "-c", "x.pt", "-o", str(out)],
        saved=out / "progress.safetensors",
    )
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip() == (
        f"interrupted: every finished batch and (attack, eps) group is saved in {out}; the same "
        "command with --resume continues"
    )


def test_sigterm_before_a_residual_study_trains(tmp_path: Path) -> None:
    """The fooling set is made before any training starts: the training engine's own handler
    is not installed yet."""
    out = tmp_path / "study"
    code, err = _terminated(
        tmp_path,
        "comdefend.evaluation.residual_study.run_residual_study",
        ["residual-study", "-c", "x.pt", "-o", str(out)],
    )
    assert code == 130, err
    assert "Traceback" not in err
    assert f"kept in {out}; the same command with --resume continues" in err


def test_sigterm_during_a_plain_command(tmp_path: Path) -> None:
    code, err = _terminated(
        tmp_path, "comdefend.quickstart.run_quickstart", ["quickstart", "-o", str(tmp_path / "q")]
    )
    assert (code, err.strip()) == (130, "interrupted")


@pytest.mark.slow
def test_sigterm_during_training_is_still_the_engines(fashion_dir: Path, tmp_path: Path) -> None:
    """The engine's deferred handler (finish the iteration, save, say how to resume) works
    inside the command line's, and gives it back afterwards."""
    out = tmp_path / "run"
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        import torch
        from comdefend.cli import main

        ready = Path(sys.argv[1])
        real_step = torch.optim.Adam.step

        def step(self, *args, **kwargs):
            if not ready.exists():
                ready.write_text("ready")
                time.sleep(5)  # SIGTERM arrives during this iteration
            return real_step(self, *args, **kwargs)

        torch.optim.Adam.step = step
        main(sys.argv[2:])
        """
    )
    ready = tmp_path / "ready"
    arguments = [
        "train", "--dataset", "fashion-mnist", "--iterations", "50", "--batch-size", "4",
        "--eval-images", "8", "--threads", "1", "--device", "cpu", "-o", str(out),
    ]  # fmt: skip
    code, err = _terminate_when_ready([sys.executable, "-c", script, str(ready), *arguments], ready)
    assert code == 130, err
    assert "interrupted after iteration 1 of 50" in err and "--resume" in err, err
    assert (out / "checkpoint.safetensors").exists()


def test_the_previous_handler_comes_back(capsys: pytest.CaptureFixture[str]) -> None:
    from comdefend.cli import main

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        main(["presets"])
    capsys.readouterr()
    assert signal.getsignal(signal.SIGTERM) is before
