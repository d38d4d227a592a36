"""The training engine's shared behaviour, recipes, stabilizers and data-parallel training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from small_runs import small_config as _config

from comdefend.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from comdefend.errors import UsageError
from comdefend.training import trainer as trainer_module
from comdefend.training.engine import Processes, TrainingInterrupted
from comdefend.training.recipes import RECIPES, resolve_config
from comdefend.training.stabilizers import Stabilization, parse_stabilizers
from comdefend.training.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


# -- recipes ------------------------------------------------------------------------------------
def test_recipes_resolve_with_overrides() -> None:
    assert RECIPES.names() == ["residual-study", "authors", "authors-torch"]
    authors = resolve_config("authors", out="runs/a")
    assert (authors.recipe, authors.iterations, authors.batch_size, authors.lr) == (
        "authors",
        2500,
        20,
        1e-3,
    )
    assert (authors.adam_beta1, authors.noise_std, authors.code_penalty) == (0.9, 20.0, 1e-4)
    assert authors.stabilize == {}
    study = resolve_config(out="runs/s")
    assert (study.recipe, study.iterations, study.lr, study.lr_schedule) == (
        "residual-study",
        7500,
        1e-3,
        "constant",
    )
    # The study's decays start at its 1e-2 unless --lr says otherwise.
    assert resolve_config("residual-study", out="x", lr_schedule="piecewise").lr == 1e-2
    overridden = resolve_config("AUTHORS", out="x", iterations=10, lr=5e-4, stabilize="clip-grad")
    assert (overridden.recipe, overridden.iterations, overridden.lr) == ("authors", 10, 5e-4)
    assert overridden.stabilize == {"clip-grad": 1.0}
    with pytest.raises(UsageError, match="valid: residual-study, authors, authors-torch"):
        resolve_config("seed", out="x")
    with pytest.raises(UsageError, match="not both"):
        resolve_config("authors", out="x", iterations=3, epochs=1)


def test_authors_torch_recipe_counts_epochs(fashion_dir: Path) -> None:
    config = resolve_config("authors-torch", out="x", dataset="fashion-mnist")
    assert config.batch_size == 128 and config.lr == 1e-2 and config.adam_beta1 == 0.5
    assert config.iterations == 10 * (60000 // 128)
    assert resolve_config("authors-torch", out="x", dataset="fashion-mnist", epochs=0.5).iterations
    assert resolve_config("authors", out="x", dataset="fashion-mnist", epochs=1).iterations == 3000


@pytest.mark.parametrize("iterations", ["0", "-3"])
def test_cli_refuses_zero_or_negative_iterations(tmp_path: Path, iterations: str) -> None:
    from typer.testing import CliRunner

    from comdefend.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--iterations", iterations, "--out", str(out)])
    assert result.exit_code != 0
    assert "--iterations must be an integer >= 1" in str(result.exception) + result.output
    assert not out.exists()


def test_recipe_and_stabilizers_travel_in_config_and_checkpoints(
    fashion_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    config = resolve_config(
        "authors",
        out=str(out),
        dataset="fashion-mnist",
        iterations=2,
        batch_size=4,
        eval_images=8,
        stabilize="clip-grad=0.5,adam-eps",
    )
    summary = train(config, progress=False)
    assert summary["recipe"] == "authors"
    training = read_metadata(out / "model.safetensors")["training"]
    assert training["recipe"]["name"] == "authors"
    assert training["config"]["stabilize"] == {"clip-grad": 0.5, "adam-eps": 1e-4}
    state = read_metadata(out / "checkpoint.safetensors")
    assert state["train_config"]["recipe"] == "authors"
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-4
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0]["config"]["recipe"] == "authors"
    assert any("grad_norm_before_clip" in r for r in records)


# -- stabilizers --------------------------------------------------------------------------------
def test_stabilizer_names_and_values() -> None:
    assert parse_stabilizers(None) == {} and parse_stabilizers("none") == {}
    assert parse_stabilizers("Clip-Grad=2,code-bound") == {"clip-grad": 2.0, "code-bound": 60.0}
    for bad, message in (
        ("gradient-magic", "valid: clip-grad"),
        ("clip-grad=0", "must be > 0"),
        ("clip-grad=x", "not a number"),
        ("clip-grad,clip-grad", "twice"),
    ):
        with pytest.raises(UsageError, match=message):
            parse_stabilizers(bad)
    with pytest.raises(UsageError):
        TrainConfig(stabilize={"nope": 1.0})


def test_stabilizers_do_what_they_say() -> None:
    stabilization = Stabilization.from_names(
        {"clip-grad": 0.5, "code-bound": 10.0, "cosine-decay": 1.0}
    )
    logits = torch.tensor([-1e6, -3.0, 0.0, 2.0, 1e6])
    bounded = stabilization.bound_logits(logits)
    assert bounded.abs().max() <= 10.0
    assert torch.equal(bounded > 0, logits > 0)  # every bit at inference is unchanged
    assert bounded[3] == pytest.approx(10 * torch.tanh(torch.tensor(0.2)).item())
    assert stabilization.lr_factor(0, 100) == 1.0
    assert stabilization.lr_factor(50, 100) == pytest.approx(0.5)
    layer = torch.nn.Linear(4, 1)
    (layer(torch.ones(2, 4)) * 100).sum().backward()
    before = stabilization.clip(list(layer.parameters()))
    after = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()
    assert before > 0.5 and float(after) == pytest.approx(0.5, rel=1e-5)
    assert Stabilization().clip(list(layer.parameters())) is None
    assert torch.equal(Stabilization().bound_logits(logits), logits)


def test_warmup_and_amsgrad() -> None:
    both = Stabilization.from_names(parse_stabilizers("warmup=4,amsgrad,cosine-decay"))
    assert [both.lr_factor(i, 1000) for i in range(3)] == pytest.approx([0.25, 0.5, 0.75], rel=1e-4)
    assert both.lr_factor(500, 1000) == pytest.approx(0.5)  # warm-up over, cosine at half
    # After one large gradient and a long run of tiny ones (a saturated sigmoid), plain Adam's
    # running second moment has decayed and it moves by about the learning rate again; AMSGrad
    # keeps the largest second moment, so its steps stay tiny.
    steps = {}
    for name, settings in (("adam", Stabilization()), ("amsgrad", both)):
        weight = torch.nn.Parameter(torch.zeros(1))
        optimizer = settings.optimizer([weight], 1e-2, (0.9, 0.999))
        for gradient in [1.0] + [1e-6] * 20_000:
            weight.grad = torch.tensor([gradient])
            before = float(weight.detach())
            optimizer.step()
        steps[name] = abs(float(weight.detach()) - before)
        assert optimizer.param_groups[0]["amsgrad"] is (name == "amsgrad")
    assert steps["adam"] > 0.3e-2 and steps["amsgrad"] < 1e-6


def test_logit_penalty_pulls_back_only_beyond_its_bound(fashion_dir: Path, tmp_path: Path) -> None:
    settings = Stabilization.from_names(parse_stabilizers("logit-penalty=10"))
    assert Stabilization().penalty(torch.ones(3)) is None
    inside = torch.tensor([-10.0, 0.0, 9.0], requires_grad=True)
    assert float(settings.penalty(inside)) == 0.0
    outside = torch.tensor([-30.0, 0.0, 20.0], requires_grad=True)
    value = settings.penalty(outside)
    assert float(value) == pytest.approx((4 + 0 + 1) / 3)  # ((30-10)/10)^2, 0, ((20-10)/10)^2
    value.backward()
    assert outside.grad is not None
    # descent (minus the gradient) moves both toward 0
    assert outside.grad[0] < 0 and outside.grad[1] == 0 and outside.grad[2] > 0
    # in training: logged, part of the loss, and the weights differ from a plain run's
    out = tmp_path / "penalized"
    train(_config(out, 2, stabilize={"logit-penalty": 1e-3}), progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r for r in records if "logit_penalty" in r]
    assert logged and all(r["logit_penalty"] >= 0 for r in logged)
    assert all(r["max_abs_code_logit"] > 0 for r in logged)
    assert all(r["loss"] >= r["mse"] + r["logit_penalty"] for r in logged)
    assert read_metadata(out / "model.safetensors")["training"]["config"]["stabilize"] == {
        "logit-penalty": 1e-3
    }


def test_patch_size_crops_in_memory_datasets_deterministically(
    fashion_dir: Path, tmp_path: Path
) -> None:
    from comdefend.data.datasets import load_dataset
    from comdefend.training.batches import EpochBatches

    images = load_dataset("fashion-mnist", "test").head(64)
    cropped = EpochBatches(images, 8, seed=3, crop=16)
    first = cropped(5)
    assert first.shape == (8, 1, 16, 16) and torch.equal(first, EpochBatches(images, 8, 3, 16)(5))
    whole = EpochBatches(images, 8, seed=3, crop=32)(5)  # not smaller than 28: whole images
    assert whole.shape == (8, 1, 28, 28)
    # every crop is a window of the image the uncropped batch holds at that position
    for crop, image in zip(first, whole, strict=True):
        windows = image.unfold(1, 16, 1).unfold(2, 16, 1)  # (1, 13, 13, 16, 16)
        assert (windows == crop.unsqueeze(1).unsqueeze(1)).flatten(3).all(-1).any()
    out = tmp_path / "crops"
    summary = train(_config(out, 2, patch_size=16), progress=False)
    assert summary["config"]["patch_size"] == 16 and summary["heldout"]["psnr_db"] > 0


def _scripted_psnr(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
    """Held-out evaluations return these PSNRs in turn (then the last one again)."""
    queue = list(values)

    def evaluate(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
        value = queue.pop(0) if len(queue) > 1 else queue[0]
        return {"psnr_db": value, "bit_density": 0.5}

    monkeypatch.setattr(trainer_module, "evaluate_reconstruction", evaluate)


def test_rollback_returns_to_the_last_healthy_state_at_a_lower_rate(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # evaluations at 2, 4, 6 (collapse: 7 dB below the best), then 6 again after the rollback
    _scripted_psnr(monkeypatch, [10.0, 20.0, 13.0, 21.0, 22.0, 23.0])
    out = tmp_path / "rollback"
    config = _config(out, 8, eval_every=2, lr=1e-3, stabilize={"rollback": 0.5})
    summary = train(config, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rollbacks = [r for r in records if r.get("event") == "rollback"]
    assert rollbacks == [
        {"event": "rollback", "iteration": 6, "to": 4, "lr_scale": 0.5, "rollbacks": 1}
    ]
    after = records[records.index(rollbacks[0]) + 1 :]
    steps = [r for r in after if "lr" in r]
    assert [r["iteration"] for r in steps] == [6, 8]  # 5 and 6 done again, at half the rate
    assert all(r["lr"] == pytest.approx(5e-4) for r in steps)
    assert summary["rollbacks"] == 1 and summary["iterations"] == 8
    state = read_metadata(out / "checkpoint.safetensors")
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1
    # without the stabilizer the same evaluations only report the collapse
    _scripted_psnr(monkeypatch, [10.0, 20.0, 13.0, 21.0])
    plain = train(_config(tmp_path / "plain", 8, eval_every=2, lr=1e-3), progress=False)
    assert plain["rollbacks"] == 0
    plain_log = [json.loads(line) for line in (tmp_path / "plain" / "log.jsonl").open()]
    assert [r["iteration"] for r in plain_log if r.get("collapse")] == [6]
    assert not [r for r in plain_log if r.get("event") == "rollback"]


def test_rollback_state_survives_resume(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_psnr(monkeypatch, [10.0, 20.0, 13.0, 21.0])
    out = tmp_path / "run"
    train(_config(out, 8, eval_every=2, stabilize={"rollback": 0.25}), progress=False)
    _scripted_psnr(monkeypatch, [22.0])
    summary = train(
        _config(out, 12, eval_every=2, stabilize={"rollback": 0.25}), resume=True, progress=False
    )
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records if r.get("event") == "rollback"] == ["rollback"]
    resumed = records[[r.get("event") for r in records].index("resume") + 1 :]
    assert all(r["lr"] == pytest.approx(0.25 * 1e-3) for r in resumed if "lr" in r)
    assert summary["rollbacks"] == 1


def test_code_bound_changes_training_and_not_the_model(fashion_dir: Path, tmp_path: Path) -> None:
    plain = train(_config(tmp_path / "plain", 2), progress=False)
    bounded = train(_config(tmp_path / "bounded", 2, stabilize={"code-bound": 1.0}), progress=False)
    a = load_file(plain["model"])
    b = load_file(bounded["model"])
    assert a.keys() == b.keys()  # the same architecture
    assert any(not torch.equal(a[key], b[key]) for key in a)  # trained differently


# -- the engine's run-folder rules ----------------------------------------------------------------
def test_resume_with_fewer_iterations_is_refused(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out, 4), progress=False)
    summary_before = (out / "summary.json").read_text()
    with pytest.raises(UsageError, match="already done 4 iterations.*--iterations 4"):
        train(_config(out, 2), resume=True, progress=False)
    assert (out / "summary.json").read_text() == summary_before


def test_a_resume_on_other_kernels_is_logged_and_warned(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """Moved to a CPU of another capability, a run continues (it is still the same run), but
    the resume event and a warning say that it no longer goes on bit for bit; a resume on the
    same kernels says nothing."""
    from comdefend.training import engine
    from comdefend.training.logs import read_training_log

    out = tmp_path / "run"
    train(_config(out, 2), progress=False)
    train(_config(out, 3), resume=True, progress=False)  # same machine: nothing said
    here = engine.environment()
    elsewhere = {**here, "cpu_capability": "OTHER" if here["cpu_capability"] != "OTHER" else "X"}
    monkeypatch.setattr(engine, "environment", lambda: elsewhere)
    with caplog.at_level("WARNING", logger="comdefend"):
        train(_config(out, 4), resume=True, progress=False)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert "kernels_changed" not in resumes[0]
    assert resumes[1]["kernels_changed"] == {
        "from": f"cpu {here['cpu_capability']}",
        "to": f"cpu {elsewhere['cpu_capability']}",
    }
    assert "resuming on other hardware" in caplog.text
    log = read_training_log(out)
    assert [iteration for iteration, _ in log.kernels] == [0, 2, 3]
    assert log.last_kernels == f"cpu {elsewhere['cpu_capability']}"


def test_old_run_folders_still_resume(fashion_dir: Path, tmp_path: Path) -> None:
    """A checkpoint written before recipes, stabilizers, data-parallel runs and precisions
    existed (no recipe, betas, stabilize, precision or world_size in it) resumes to the same
    weights."""
    train(_config(tmp_path / "straight", 4), progress=False)
    out = tmp_path / "old"
    train(_config(out, 2), progress=False)
    tensors, metadata = load_checkpoint(out / "checkpoint.safetensors", "training-state")
    for key in ("recipe", "adam_beta1", "adam_beta2", "stabilize", "precision"):
        del metadata["train_config"][key]
    del metadata["world_size"]
    metadata.pop("format_version")
    save_checkpoint(out / "checkpoint.safetensors", tensors, metadata)
    train(_config(out, 4), resume=True, progress=False)
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_resume_with_another_process_count_is_refused(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out, 2), progress=False)
    tensors, metadata = load_checkpoint(out / "checkpoint.safetensors", "training-state")
    metadata["world_size"] = 2
    metadata.pop("format_version")
    save_checkpoint(out / "checkpoint.safetensors", tensors, metadata)
    with pytest.raises(UsageError, match="trained by 2 process.*this is 1.*--nproc-per-node 2"):
        train(_config(out, 4), resume=True, progress=False)


def test_stale_temporary_files_are_removed_on_the_next_start(
    fashion_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train(_config(out, 2), progress=False)
    stale = [out / ".checkpoint.safetensors.abc123.tmp", out / ".log.jsonl.x.tmp"]
    stale[0].write_bytes(b"")  # what a SIGKILL during a write leaves
    stale[1].write_bytes(b"partial")
    train(_config(out, 4), resume=True, progress=False)
    assert not any(path.exists() for path in stale)


def test_uneven_batch_split_is_refused() -> None:
    assert Processes(rank=1, world_size=2).share(8) == slice(4, 8)
    with pytest.raises(UsageError, match="does not split evenly across 3"):
        Processes(rank=0, world_size=3).share(20)


def test_cli_says_how_to_resume_after_ctrl_c(
    fashion_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hint must survive the CLI framework (which turns KeyboardInterrupt into a bare
    exit 130): the command prints it and exits 130 itself."""
    import signal

    from typer.testing import CliRunner

    from comdefend.cli import app

    real_step = torch.optim.Adam.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", interrupting_step)
    out = tmp_path / "run"
    arguments = ["train", "--dataset", "fashion-mnist", "--iterations", "5", "--batch-size", "4"]
    result = CliRunner().invoke(app, [*arguments, "--eval-images", "8", "--out", str(out)])
    assert result.exit_code == 130
    assert "interrupted after iteration 2 of 5" in result.output
    assert "--resume" in result.output
    assert read_metadata(out / "checkpoint.safetensors")["iteration"] == 2


def test_classifier_interrupt_is_the_engines(fashion_dir: Path, tmp_path: Path, monkeypatch):
    from comdefend.training import classifier as classifier_training
    from comdefend.training.classifier import ClassifierTrainConfig, train_classifier

    real = classifier_training.augment_batch
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(classifier_training, "augment_batch", interrupting)
    config = ClassifierTrainConfig(
        dataset="fashion-mnist",
        out=str(tmp_path / "c"),
        epochs=1,
        batch_size=16,
        limit_train=64,
        limit_test=32,
        eval_images=16,
    )
    with pytest.raises(TrainingInterrupted, match="after iteration 2 of 4"):
        train_classifier(config, progress=False)


# -- data-parallel ------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_silent_process_ends_training_with_one_line_and_the_checkpoint_kept(
    fashion_dir: Path, tmp_path: Path
) -> None:
    """One of two torchrun workers stops answering (SIGSTOP) mid-training: the other gives up
    after $COMDEFEND_DIST_TIMEOUT with one error line naming the exchange and how to go on,
    not torch's traceback."""
    import signal
    import time

    out = tmp_path / "silent"
    common = [
        "train", "--dataset", "fashion-mnist", "--iterations", "100000", "--batch-size", "8",
        "--eval-images", "16", "--eval-every", "100000", "--checkpoint-every", "5",
        "--threads", "1", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env["COMDEFEND_DIST_TIMEOUT"] = "5"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "comdefend", *common],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.safetensors").exists():
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        found = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True)
        workers = [int(line) for line in found.stdout.split()]
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGSTOP)
        _, stderr = launcher.communicate(timeout=180)
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if "lost the other processes" in line]
    assert lines, stderr[-3000:]
    assert lines[0].startswith(  # on a line of its own, after the progress bar
        "error: lost the other processes of this torchrun job while training ("
    )
    assert "COMDEFEND_DIST_TIMEOUT=5 s" in lines[0] and "--resume" in lines[0]
    assert "in exchange" not in stderr  # no traceback through the exchange helper
    assert read_metadata(out / "checkpoint.safetensors")["iteration"] >= 5


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(fashion_dir: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m comdefend train`` (gloo, CPU) trains the same weights as
    one process with the same global batch, within float rounding; process 0 alone writes."""
    common = [
        "train", "--dataset", "fashion-mnist", "--iterations", "3", "--batch-size", "8",
        "--eval-images", "16", "--eval-every", "2", "--checkpoint-every", "2",
        "--threads", "1", "--device", "cpu", "--seed", "3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    parallel = tmp_path / "two"
    result = subprocess.run(
        [*launcher, "--nproc-per-node", "2", "-m", "comdefend", *common, "--out", str(parallel)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done: 3 iterations") == 1  # only process 0 reports

    single = tmp_path / "one"
    trainer_module.train(
        resolve_config(
            "residual-study",
            dataset="fashion-mnist",
            iterations=3,
            batch_size=8,
            eval_images=16,
            eval_every=2,
            checkpoint_every=2,
            seed=3,
            device="cpu",
            out=str(single),
        ),
        progress=False,
    )
    a = load_file(parallel / "model.safetensors")
    b = load_file(single / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert read_metadata(parallel / "checkpoint.safetensors")["world_size"] == 2
    records = [json.loads(line) for line in (parallel / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "loss" in r] == [2, 3]  # one writer, no duplicates
    with pytest.raises(UsageError, match="trained by 2 process"):
        trainer_module.train(
            resolve_config(
                "residual-study",
                dataset="fashion-mnist",
                iterations=4,
                batch_size=8,
                eval_images=16,
                seed=3,
                device="cpu",
                out=str(parallel),
            ),
            resume=True,
            progress=False,
        )


def test_a_resume_may_add_rollback_and_nothing_else(fashion_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(_config(out, 2, stabilize={"logit-penalty": 60.0}), progress=False)
    with pytest.raises(UsageError, match="settings that differ.*stabilize"):
        train(
            _config(out, 4, stabilize={"logit-penalty": 60.0, "clip-grad": 1.0}),
            resume=True,
            progress=False,
        )
    both = {"logit-penalty": 60.0, "rollback": 0.5}
    summary = train(_config(out, 4, stabilize=both), resume=True, progress=False)
    assert summary["config"]["stabilize"] == both and summary["iterations"] == 4
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    resumes = [r for r in records if r.get("event") == "resume"]
    assert [(r["iteration"], r["stabilize"]) for r in resumes] == [(2, both)]
