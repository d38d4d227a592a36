"""Snapshots along a training (TrainConfig.snapshot_every, train --snapshot-every) and the
study's no-early-stop setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from comdefend import ComDefend
from comdefend.checkpoint import load_checkpoint, read_metadata
from comdefend.cli import main
from comdefend.errors import UsageError
from comdefend.training import trainer
from comdefend.training.trainer import TrainConfig, snapshot_name, train


def _config(out: Path, cifar_dir: Path, **changes: object) -> TrainConfig:
    settings: dict = {
        "dataset": "cifar10", "data_dir": str(cifar_dir.parent), "out": str(out),
        "iterations": 5, "batch_size": 4, "eval_every": 2, "eval_images": 4,
        "snapshot_every": 2, "threads": 1,
    }  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def test_snapshots_at_every_interval_and_the_end_carry_the_evaluation(
    tmp_path: Path, cifar_dir: Path
) -> None:
    run = tmp_path / "run"
    train(_config(run, cifar_dir), progress=False)
    names = sorted(path.name for path in (run / "snapshots").iterdir())
    assert names == [snapshot_name(2), snapshot_name(4), snapshot_name(5)]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    psnr = {r["iteration"]: r["heldout_psnr_db"] for r in log if "heldout_psnr_db" in r}
    for iteration in (2, 4):
        path = run / "snapshots" / snapshot_name(iteration)
        training = read_metadata(path)["training"]
        assert training["iterations"] == iteration
        assert training["metrics"]["psnr_db"] == pytest.approx(psnr[iteration])
        model = ComDefend.from_checkpoint(path)  # an ordinary purifier checkpoint
        assert model.purify(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    final, _ = load_checkpoint(run / "model.safetensors")
    last, _ = load_checkpoint(run / "snapshots" / snapshot_name(5))
    assert all(torch.equal(final[key], last[key]) for key in final)
    # the session's wall time is logged, for a run's total over its sessions
    assert any(r.get("event") == "session_end" and r["session_seconds"] > 0 for r in log)


def test_an_interrupted_run_resumes_to_the_same_snapshots(
    tmp_path: Path, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole"
    train(_config(whole, cifar_dir), progress=False)
    parts = tmp_path / "parts"
    from comdefend.training import engine

    real = engine.TrainingTask.after_step

    def stop_at_three(self, iteration, metrics):
        if iteration == 3:
            raise KeyboardInterrupt
        return real(self, iteration, metrics)

    monkeypatch.setattr(engine.TrainingTask, "after_step", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        train(_config(parts, cifar_dir), progress=False)
    monkeypatch.setattr(engine.TrainingTask, "after_step", real)
    # snapshot_every may change on resume (it does not change what is trained)
    train(_config(parts, cifar_dir, snapshot_every=1), resume=True, progress=False)
    for iteration in (2, 4, 5):
        first, _ = load_checkpoint(whole / "snapshots" / snapshot_name(iteration))
        second, _ = load_checkpoint(parts / "snapshots" / snapshot_name(iteration))
        assert all(torch.equal(first[key], second[key]) for key in first), iteration
    assert (parts / "snapshots" / snapshot_name(4)).exists()


def test_stop_when_dead_false_trains_to_the_last_iteration(
    tmp_path: Path, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer, "DEAD_ITERATIONS", 1)
    monkeypatch.setattr(trainer, "gradients_all_zero", lambda model: True)
    from comdefend.training import engine

    monkeypatch.setattr(engine, "gradients_all_zero", lambda model: True)
    stopped = train(_config(tmp_path / "a", cifar_dir, snapshot_every=None), progress=False)
    assert stopped["stopped_early"] is not None and stopped["iterations"] == 1
    kept = train(
        _config(tmp_path / "b", cifar_dir, snapshot_every=None, stop_when_dead=False),
        progress=False,
    )
    assert kept["stopped_early"] is None and kept["iterations"] == 5


def test_snapshot_every_is_checked_and_reaches_the_command_line(
    tmp_path: Path, cifar_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UsageError, match="snapshot-every must be >= 1"):
        _config(tmp_path / "x", cifar_dir, snapshot_every=0)
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as exit_info:
        main(["--quiet", "train", "--data-dir", str(cifar_dir.parent), "--iterations", "2",
              "--batch-size", "4", "--eval-images", "4", "--snapshot-every", "1", "--threads",
              "1", "--out", str(out)])  # fmt: skip
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == [
        snapshot_name(1),
        snapshot_name(2),
    ]
