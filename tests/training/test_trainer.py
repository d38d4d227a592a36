"""Trainer: schedules, loss goes down, interrupted + resumed == uninterrupted, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_runs import small_config as _config

from comdefend import console
from comdefend.errors import UsageError
from comdefend.training import TrainConfig, learning_rate, train
from comdefend.training import trainer as trainer_module


def test_piecewise_schedule_of_the_seed() -> None:
    values = [learning_rate("piecewise", 0.01, i, 100) for i in (0, 24, 25, 74, 75, 89, 90, 99)]
    assert values == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0005, 0.0005, 0.0001, 0.0001])


def test_exponential_schedule_is_a_staircase() -> None:
    assert learning_rate("exponential", 0.01, 0, 1000) == 0.01
    assert learning_rate("exponential", 0.01, 9, 1000) == 0.01
    assert learning_rate("exponential", 0.01, 10, 1000) == pytest.approx(0.0096)
    assert learning_rate("exponential", 0.01, 999, 1000) == pytest.approx(0.01 * 0.96**99)


def test_default_learning_rates() -> None:
    assert TrainConfig(lr_schedule="constant").lr == 1e-3
    assert TrainConfig(lr_schedule="piecewise").lr == 1e-2


@pytest.mark.parametrize(
    "kwargs", [{"lr_schedule": "cosine"}, {"dataset": "mnist"}, {"iterations": 0}, {"preset": "x"}]
)
def test_bad_config(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        TrainConfig(**kwargs)


def test_training_lowers_the_loss(fashion_dir: Path, tmp_path: Path) -> None:
    summary = train(_config(tmp_path / "run", 25, lr=3e-3), progress=False)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert summary["heldout"]["psnr_db"] > 0 and 0 <= summary["heldout"]["bit_density"] <= 1
    assert (tmp_path / "run" / "model.safetensors").exists()


def _assert_same_weights(a_path: Path, b_path: Path) -> None:
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_is_bit_identical(fashion_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C (a real SIGINT) arriving during the 4th optimizer step: the step finishes, the
    4th iteration is checkpointed, the run stops with the resume hint, and --resume ends with
    the weights of an uninterrupted run, bit for bit."""
    import os
    import signal

    from comdefend.training.engine import TrainingInterrupted

    train(_config(tmp_path / "straight", 6), progress=False)

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupting_step)
    with pytest.raises(TrainingInterrupted, match="after iteration 4 of 6.*--resume") as caught:
        train(_config(tmp_path / "resumed", 6), progress=False)
    assert isinstance(caught.value, KeyboardInterrupt) and caught.value.saved
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    state = (tmp_path / "resumed" / "log.jsonl").read_text()
    assert '"event": "interrupted", "iteration": 4, "saved": true' in state
    train(_config(tmp_path / "resumed", 6), resume=True, progress=False)

    records = [
        json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    ]
    (resumed,) = [r for r in records if r.get("event") == "resume"]
    assert resumed["iteration"] == 4 and resumed["env"]["cpu_threads"] == torch.get_num_threads()
    _assert_same_weights(
        tmp_path / "straight" / "model.safetensors", tmp_path / "resumed" / "model.safetensors"
    )


def test_an_interrupt_inside_the_optimizer_step_keeps_the_last_checkpoint(
    fashion_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A KeyboardInterrupt raised inside an optimizer step (a second Ctrl-C) may leave the
    weights half-updated: that state is never checkpointed; the last periodic checkpoint
    stays and --resume from it still gives the uninterrupted run's weights."""
    from comdefend.checkpoint import read_metadata
    from comdefend.training.engine import TrainingInterrupted

    train(_config(tmp_path / "straight", 6), progress=False)
    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the 4th step never finishes
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupting_step)
    with pytest.raises(TrainingInterrupted, match="middle of an optimizer step") as caught:
        train(_config(tmp_path / "resumed", 6), progress=False)
    assert not caught.value.saved
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)
    assert read_metadata(tmp_path / "resumed" / "checkpoint.safetensors")["iteration"] == 2
    log = (tmp_path / "resumed" / "log.jsonl").read_text()
    assert '"event": "interrupted", "iteration": 3, "saved": false' in log
    train(_config(tmp_path / "resumed", 6), resume=True, progress=False)
    _assert_same_weights(
        tmp_path / "straight" / "model.safetensors", tmp_path / "resumed" / "model.safetensors"
    )


def test_resume_after_moving_the_folder_and_setting_threads(
    fashion_dir: Path, tmp_path: Path
) -> None:
    """Where a run lives and its thread setting do not change what is trained: both may change
    on --resume (a time-limited run is continued elsewhere), as may the iteration count."""
    import shutil

    train(_config(tmp_path / "straight", 4), progress=False)
    train(_config(tmp_path / "first", 2), progress=False)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    threads = torch.get_num_threads()
    try:
        config = _config(tmp_path / "moved", 4, threads=threads)
        assert train(config, resume=True, progress=False)["iterations"] == 4
    finally:
        torch.set_num_threads(threads)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "moved" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_existing_run_is_not_overwritten(fashion_dir: Path, tmp_path: Path) -> None:
    train(_config(tmp_path / "run", 2), progress=False)
    with pytest.raises(UsageError, match="--resume"):
        train(_config(tmp_path / "run", 2), progress=False)
    with pytest.raises(UsageError, match="differ"):
        train(_config(tmp_path / "run", 4, code_penalty=1.0), resume=True, progress=False)


def test_residual_preset_trains_on_cifar(cifar_dir: Path, tmp_path: Path) -> None:
    summary = train(
        _config(
            tmp_path / "r",
            2,
            dataset="cifar10",
            data_dir=str(cifar_dir.parent),
            preset="1_on_off",
            batch_size=4,
        ),
        progress=False,
    )
    assert summary["iterations"] == 2
    assert trainer_module.image_channels_for("cifar10") == 3


def test_best_weights_are_kept_and_a_collapse_is_reported(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, scripted_psnrs
) -> None:
    """The study's recipe can diverge late (seen on a GPU): the best evaluated weights survive in
    best.safetensors, the collapse is logged and warned about, and the summary says so."""
    real = trainer_module.evaluate_reconstruction
    scripted_psnrs(20.0, 25.0, 12.0, 11.0)
    out = tmp_path / "run"
    console.configure()  # the command line's stderr output, whatever earlier tests left behind
    try:
        summary = train(_config(out, 6, eval_every=2), progress=False)
    finally:
        console.reset()
    assert summary["best"]["iteration"] == 4 and summary["best"]["psnr_db"] == 25.0
    assert summary["collapsed"] is True
    assert "held-out PSNR fell to 12.00 dB at iteration 6" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r.get("collapse")] == [6]
    assert trainer_module.read_best(out / "best.safetensors") == {"iteration": 4, "psnr_db": 25.0}
    # best.safetensors holds the iteration-4 weights: a run of 4 iterations ends with them.
    straight = tmp_path / "straight"
    monkeypatch.setattr(trainer_module, "evaluate_reconstruction", real)
    train(_config(straight, 4, eval_every=2), progress=False)
    a = load_file(out / "best.safetensors")
    b = load_file(straight / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_best_survives_a_resume(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out, 2, eval_every=2), progress=False)
    first = trainer_module.read_best(out / "best.safetensors")
    assert first["iteration"] == 2
    summary = train(_config(out, 4, eval_every=2), resume=True, progress=False)
    assert summary["best"]["psnr_db"] >= first["psnr_db"]
    assert summary["collapsed"] is False


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = trainer_module.comdefend_loss
    calls = {"n": 0}

    def poisoned(reconstruction, target, code, penalty):
        calls["n"] += 1
        loss, mse, term = real(reconstruction, target, code, penalty)
        return (loss * float("nan") if calls["n"] == 3 else loss), mse, term

    monkeypatch.setattr(trainer_module, "comdefend_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(trainer_module.TrainingDivergedError, match="iteration 3"):
        train(_config(out, 6, checkpoint_every=2), progress=False)
    from comdefend.checkpoint import read_metadata

    assert read_metadata(out / "checkpoint.safetensors")["iteration"] == 2
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert last == {"event": "diverged", "iteration": 3}
    state = load_file(out / "checkpoint.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in state.values())


def test_gradients_all_zero() -> None:
    layer = torch.nn.Linear(3, 2)
    assert not trainer_module.gradients_all_zero(layer)  # no backward pass yet
    layer(torch.ones(1, 3)).sum().backward()
    assert not trainer_module.gradients_all_zero(layer)
    layer.weight.grad.zero_()
    assert not trainer_module.gradients_all_zero(layer)  # the bias still has a gradient
    layer.bias.grad.zero_()
    assert trainer_module.gradients_all_zero(layer)


def test_a_dead_run_stops_early_with_a_checkpoint(
    fashion_dir: Path, tmp_path: Path, dead_model
) -> None:
    from comdefend.checkpoint import read_metadata

    out = tmp_path / "run"
    summary = train(_config(out, 20, checkpoint_every=10), progress=False)
    assert summary["iterations"] == 3
    assert summary["stopped_early"]["iteration"] == 3
    assert "exactly zero for 3 iterations" in summary["stopped_early"]["reason"]
    assert json.loads((out / "summary.json").read_text())["stopped_early"]["iteration"] == 3
    # The state it stopped in is checkpointed, although 3 is no checkpoint iteration.
    assert read_metadata(out / "checkpoint.safetensors")["iteration"] == 3
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert {"event": "stopped_early", **summary["stopped_early"]} in records
    assert [r["event"] for r in records if "event" in r][-1] == "done"
    # A dead model's output is constant: the held-out PSNR says so.
    assert summary["heldout"]["bit_density"] == 0.0


def test_a_live_run_does_not_stop_early(fashion_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trainer_module, "DEAD_ITERATIONS", 1)
    summary = train(_config(tmp_path / "run", 4), progress=False)
    assert summary["iterations"] == 4 and summary["stopped_early"] is None
