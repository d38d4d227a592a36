"""Reading training logs back (comdefend.training.logs): the record every report script uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comdefend.errors import UsageError
from comdefend.training.logs import first_collapse, read_training_log


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_a_rolled_back_run_reads_back_with_its_redo_rollback_and_added_stabilizer(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "cifar10-rollback"
    folder.mkdir()
    config = {"dataset": "cifar10", "seed": 0, "stabilize": {"logit-penalty": 60.0}}
    _write(folder / "log.jsonl", [
        {"event": "start", "iteration": 0, "config": config},
        {"iteration": 100, "loss": 0.02, "max_abs_code_logit": 50.0, "saturated_output": 0.0},
        {"iteration": 100, "heldout_psnr_db": 20.0},
        {"event": "interrupted", "iteration": 150, "saved": True},
        {"event": "resume", "iteration": 150, "config": config,
         "stabilize": {"logit-penalty": 60.0, "rollback": 0.5}},
        {"iteration": 200, "heldout_psnr_db": 25.0},
        {"iteration": 300, "loss": 0.2, "max_abs_code_logit": 900.0, "saturated_output": 0.7},
        {"iteration": 300, "heldout_psnr_db": 8.0, "collapse": True},
        {"event": "rollback", "iteration": 300, "to": 200, "lr_scale": 0.5},
        {"iteration": 300, "heldout_psnr_db": 25.5},
        {"event": "done", "iteration": 300},
    ])  # fmt: skip
    run = read_training_log(folder)
    assert run.name == "cifar10-rollback"
    assert run.psnr == {100: 20.0, 200: 25.0, 300: 25.5}  # the redo replaces the collapse
    assert run.flagged == [300] and run.collapsed_at() == 300
    assert run.rollbacks == [(300, 200)]
    assert run.added_stabilizers == ["rollback from 150"]
    assert run.config["stabilize"] == {"logit-penalty": 60.0, "rollback": 0.5}
    assert run.code_logit == {100: 50.0, 300: 900.0} and run.saturated_output[300] == 0.7
    assert (run.best_iteration, run.last_evaluation, run.last_iteration) == (300, 300, 300)
    assert run.finished
    assert read_training_log(str(folder / "log.jsonl")) == run  # a str path too


def test_an_older_log_without_flags_is_judged_by_the_margin(tmp_path: Path) -> None:
    log = _write(tmp_path / "old-run.jsonl", [
        {"event": "start", "iteration": 0, "config": {"dataset": "fashion-mnist"}},
        {"iteration": 1000, "heldout_psnr_db": 26.0},
        {"iteration": 2000, "heldout_psnr_db": 21.0},  # 5 dB below: not a collapse
        {"iteration": 3000, "heldout_psnr_db": 7.0},
    ])  # fmt: skip
    run = read_training_log(log)
    assert run.name == "old-run" and not run.finished
    assert run.collapsed_at() == 3000 and run.flagged == []
    assert first_collapse(run.psnr, margin=4.0) == 2000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"event": "start", "config": {}}\nnot json\n', ":2: not a JSON line"),
        ("[1, 2]\n", ":1: not a training log record"),
        ('{"event": "start", "config": {}}\n', "at least one held-out evaluation"),
        ('{"iteration": 1, "heldout_psnr_db": 9.0}\n', "needs a start record"),
    ],
)
def test_a_file_that_is_no_training_log_gets_one_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        read_training_log(path)
    with pytest.raises(UsageError, match="no training log found"):
        read_training_log(tmp_path / "missing")


def test_a_run_still_training_reads_without_its_half_written_line_or_any_evaluation(
    tmp_path: Path,
) -> None:
    start = json.dumps({"event": "start", "iteration": 0, "config": {"seed": 3}}) + "\n"
    log = tmp_path / "log.jsonl"
    log.write_text(start + '{"iteration": 40, "lo', encoding="utf-8")  # mid-write
    with pytest.raises(UsageError, match="not a JSON line"):
        read_training_log(log)  # a finished run's log must be whole
    just_started = read_training_log(log, running=True)
    assert just_started.psnr == {} and just_started.config == {"seed": 3}
    log.write_text(start + '{"iteration": 100, "heldout_psnr_db": 12.5}\n', encoding="utf-8")
    assert read_training_log(log, running=True).psnr == {100: 12.5}
    with pytest.raises(UsageError, match="not a JSON line"):  # a broken line before the last
        log.write_text(start + "oops\n" + '{"iteration": 1', encoding="utf-8")
        read_training_log(log, running=True)


def test_training_time_sums_the_sessions_that_ended_and_knows_when_one_logged_none(
    tmp_path: Path,
) -> None:
    """Every way a session ends counts once: a stop for a dead run (``stopped_early``) is
    followed by its ``session_end`` and is not a second stop; a session still running is not
    counted; a stop written before times were logged makes the total unknown."""
    start = {"event": "start", "iteration": 0, "config": {"seed": 0}}
    log = _write(tmp_path / "timed.jsonl", [
        start,
        {"iteration": 100, "heldout_psnr_db": 20.0},
        {"event": "interrupted", "iteration": 150, "saved": True, "session_seconds": 30.5},
        {"event": "resume", "iteration": 150},
        {"event": "paused", "iteration": 200, "session_seconds": 12.0},
        {"event": "resume", "iteration": 200},
        {"event": "stopped_early", "iteration": 300, "reason": "dead codes"},
        {"event": "session_end", "iteration": 300, "session_seconds": 20.0},
        {"event": "resume", "iteration": 300},
    ])  # fmt: skip
    run = read_training_log(log)
    assert (run.sessions_ended, run.untimed_sessions) == (3, 0)
    assert run.session_seconds == run.training_seconds == 62.5

    old = _write(tmp_path / "old.jsonl", [
        start,
        {"iteration": 100, "heldout_psnr_db": 20.0},
        {"event": "interrupted", "iteration": 150, "saved": True},  # before times were logged
        {"event": "resume", "iteration": 150},
        {"event": "paused", "iteration": 200, "session_seconds": 12.0},
    ])  # fmt: skip
    run = read_training_log(old)
    assert (run.sessions_ended, run.untimed_sessions, run.session_seconds) == (2, 1, 12.0)
    assert run.training_seconds is None
