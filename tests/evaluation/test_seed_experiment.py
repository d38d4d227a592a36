"""Seed experiment end to end on a tiny budget: outputs, resume without retraining, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from comdefend.commands.seed import register
from comdefend.data.datasets import load_dataset
from comdefend.errors import UsageError
from comdefend.evaluation.seed_experiment import (
    SeedExperimentConfig,
    parse_presets,
    run_seed_experiment,
)
from comdefend.models.classifiers import build_classifier, save_classifier


def _app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def noop() -> None:  # a second command keeps typer in multi-command mode
        """Nothing."""

    return app


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fashion-cnn trained for 40 iterations (batch 16) on 512 real Fashion-MNIST images."""
    folder = Path("/usr/share/datasets/fashion-mnist")
    if not folder.exists():
        pytest.skip(f"{folder} is not available on this machine")
    data = load_dataset("fashion-mnist", "train", folder).head(512)
    torch.manual_seed(0)
    model = build_classifier("fashion-cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(40):
        index = torch.arange(step * 16, step * 16 + 16) % len(data)
        loss = F.cross_entropy(model(data.float_images(index)), data.labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    path = tmp_path_factory.mktemp("classifier") / "fashion.safetensors"
    save_classifier(model, path)
    return path


ARGS = [
    "--dataset", "fashion-mnist", "--presets", "normal,1_on_off", "--iterations", "4",
    "--eval-every", "2", "--batch-size", "8", "--attack-steps", "3", "--n", "32",
    "--eval-images", "4", "--data-dir", "/usr/share/datasets/fashion-mnist",
    "--device", "cpu", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def experiment(classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seed") / "exp"
    result = CliRunner().invoke(
        _app(), ["seed-experiment", "--classifier", str(classifier_path), "--out", str(out), *ARGS]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.mark.slow
def test_outputs(experiment: Path) -> None:
    results = json.loads((experiment / "results.json").read_text())
    assert results["complete"] is True
    assert len(results["classifier"]["sha256"]) == 64
    assert results["settings"]["attack_eps"] == 0.03
    adv = results["adversarial_set"]
    assert 0 < adv["size"] <= adv["clean_correct"] <= 32
    assert list(results["presets"]) == ["plain", "residual-encoder-1"]
    for entry in results["presets"].values():
        assert entry["seed_name"] in entry["aliases"]
        assert entry["encoder_parameters"] > 0 and entry["decoder_parameters"] > 0
        assert [point["iteration"] for point in entry["evaluations"]] == [2, 4]
        for point in entry["evaluations"]:
            assert 0.0 <= point["accuracy_after_defense"] <= 1.0
            assert 0.0 <= point["clean_accuracy_defended"] <= 1.0
            assert point["heldout_psnr_db"] > 0
        assert entry["final"] == entry["evaluations"][-1]
    table = (experiment / "table.md").read_text()
    assert "| plain | normal |" in table and "| residual-encoder-1 | 1_on_off |" in table
    assert (experiment / "accuracy_vs_iteration.png").read_bytes()[:4] == b"\x89PNG"
    assert (experiment / "adversarial.safetensors").exists()


@pytest.mark.slow
def test_resume_of_finished_experiment_does_not_retrain(
    experiment: Path, classifier_path: Path
) -> None:
    logs = sorted((experiment / "runs").glob("*/log.jsonl"))
    assert len(logs) == 2
    before = {log: (log.stat().st_mtime_ns, log.read_text()) for log in logs}
    adv_before = (experiment / "adversarial.safetensors").stat().st_mtime_ns
    first = json.loads((experiment / "results.json").read_text())
    config = SeedExperimentConfig(
        classifier=str(classifier_path),
        out=str(experiment),
        dataset="fashion-mnist",
        presets="normal,1_on_off",
        iterations=4,
        eval_every=2,
        batch_size=8,
        attack_steps=3,
        n=32,
        eval_images=4,
        data_dir="/usr/share/datasets/fashion-mnist",
        device="cpu",
    )
    again = run_seed_experiment(config, resume=True, progress=False)
    assert {log: (log.stat().st_mtime_ns, log.read_text()) for log in logs} == before
    assert (experiment / "adversarial.safetensors").stat().st_mtime_ns == adv_before
    assert all(entry["status"] == "reused" for entry in again["presets"].values())
    for name, entry in first["presets"].items():
        assert again["presets"][name]["evaluations"] == entry["evaluations"]
    # Without --resume the finished experiment is protected.
    with pytest.raises(UsageError, match="--resume"):
        run_seed_experiment(config, resume=False, progress=False)


@pytest.mark.slow
def test_resume_continues_an_unfinished_preset(experiment: Path, classifier_path: Path) -> None:
    # A run with a checkpoint but no summary counts as interrupted: it is resumed, not redone.
    run = experiment / "runs" / "residual-encoder-1"
    (run / "summary.json").unlink()
    before = json.loads((experiment / "results.json").read_text())["presets"]
    result = CliRunner().invoke(
        _app(),
        ["seed-experiment", "--classifier", str(classifier_path), "--out", str(experiment),
         *ARGS, "--resume"],
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "residual-encoder-1 (1_on_off, resumed)" in result.output
    assert "plain (normal, reused)" in result.output
    after = json.loads((experiment / "results.json").read_text())["presets"]
    assert after["residual-encoder-1"]["evaluations"] == before["residual-encoder-1"]["evaluations"]
    assert (run / "summary.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--presets", "normal,bogus"], "valid presets"),
        (["--iterations", "0"], "iterations"),
        (["--eval-every", "0"], "eval-every"),
        (["--attack-eps", "0"], "attack-eps"),
        (["--attack-eps", "1.5"], "attack-eps"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(
        _app(),
        ["seed-experiment", "--classifier", "c.safetensors", "--out", str(tmp_path), *extra],
    )
    assert isinstance(result.exception, UsageError)
    assert message in str(result.exception)


@pytest.mark.slow
def test_classifier_dataset_mismatch(classifier_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="trained on fashion-mnist"):
        run_seed_experiment(
            SeedExperimentConfig(
                classifier=str(classifier_path), out=str(tmp_path / "x"), dataset="cifar10"
            )
        )


def test_parse_presets() -> None:
    assert len(parse_presets("all")) == 10
    assert [p.name for p in parse_presets("normal, plain,off_on_2")] == [
        "plain",
        "residual-decoder-2",
    ]
    with pytest.raises(UsageError, match="empty"):
        parse_presets(" , ")


def test_zoo_name_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`-c fashion-cnn` used to load the zoo file, then hash the bare name (FileNotFoundError)."""
    from comdefend.evaluation import seed_experiment

    class Reached(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Reached

    monkeypatch.setattr(seed_experiment, "load_dataset", stop)  # past loading and hashing
    loaded = []
    real_check = seed_experiment.check_classifier_fits
    monkeypatch.setattr(
        seed_experiment,
        "check_classifier_fits",
        lambda model, *a, **k: loaded.append(model) or real_check(model, *a, **k),
    )
    config = SeedExperimentConfig(
        classifier="fashion-cnn", out=str(tmp_path / "x"), dataset="fashion-mnist"
    )
    with pytest.raises(Reached):
        run_seed_experiment(config, progress=False)
    weights = loaded[0].weights
    assert (weights.source, weights.kind, weights.zoo_name) == ("fashion-cnn", "zoo", "fashion-cnn")
