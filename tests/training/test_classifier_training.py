"""Classifier training: augmentation, schedule, a tiny real run, exact resume, and the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import comdefend.training.classifier as classifier_training
from comdefend.checkpoint import read_metadata
from comdefend.cli import app, main
from comdefend.errors import UsageError
from comdefend.models.classifiers import load_classifier
from comdefend.training.classifier import (
    ClassifierTrainConfig,
    augment_batch,
    classifier_learning_rate,
    train_classifier,
)


def tiny_config(fashion_dir: Path, out: Path, **overrides: object) -> ClassifierTrainConfig:
    settings: dict = {
        "dataset": "fashion-mnist",
        "out": str(out),
        "epochs": 2,
        "batch_size": 32,
        "limit_train": 256,
        "limit_test": 100,
        "eval_images": 0,
        "checkpoint_every": 5,
        "data_dir": str(fashion_dir),
        "device": "cpu",
        "threads": 1,
    }
    settings.update(overrides)
    return ClassifierTrainConfig(**settings)


def test_augment_batch_crops_and_flips_deterministically() -> None:
    images = torch.rand(6, 3, 8, 8)
    assert torch.equal(augment_batch(images, torch.Generator(), 0, flip=False), images)
    first = augment_batch(images, torch.Generator().manual_seed(3), 2, "zeros")
    again = augment_batch(images, torch.Generator().manual_seed(3), 2, "zeros")
    assert torch.equal(first, again)
    assert first.shape == images.shape
    # Every output is some 8x8 window of the zero-padded image, possibly mirrored.
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    for n in range(6):
        windows = [
            padded[n, :, top : top + 8, left : left + 8] for top in range(5) for left in range(5)
        ]
        candidates = windows + [window.flip(2) for window in windows]
        assert any(torch.equal(first[n], window) for window in candidates)
    reflect = augment_batch(images, torch.Generator().manual_seed(3), 2, "reflect")
    assert reflect.min() > 0  # no zero padding leaks in (rand is positive almost surely)


def test_learning_rate_schedules() -> None:
    assert classifier_learning_rate("cosine", 0.1, 0, 100) == pytest.approx(0.1)
    assert classifier_learning_rate("cosine", 0.1, 50, 100) == pytest.approx(0.05)
    assert 0 < classifier_learning_rate("cosine", 0.1, 99, 100) < 1e-3
    assert classifier_learning_rate("cosine", 0.1, 0, 100, warmup=10) == pytest.approx(0.01)
    assert classifier_learning_rate("onecycle", 0.1, 0, 100) == pytest.approx(0.004)
    assert classifier_learning_rate("onecycle", 0.1, 30, 100) == pytest.approx(0.1)
    assert classifier_learning_rate("constant", 0.1, 99, 100) == 0.1


def test_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fashion-cnn"):
        ClassifierTrainConfig(dataset="fashion-mnist", arch="resnet20")
    with pytest.raises(UsageError, match="valid"):
        ClassifierTrainConfig(arch="vgg99")
    with pytest.raises(UsageError, match="smaller than one batch"):
        ClassifierTrainConfig(limit_train=10, batch_size=32)
    with pytest.raises(UsageError, match="lr-schedule"):
        ClassifierTrainConfig(lr_schedule="sawtooth")
    assert ClassifierTrainConfig(dataset="fashion-mnist").arch == "fashion-cnn"
    assert ClassifierTrainConfig(dataset="fashion-mnist").crop_padding == 2
    assert ClassifierTrainConfig().crop_padding == 4


def test_tiny_run_learns(fashion_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "learn"
    summary = train_classifier(
        tiny_config(fashion_dir, run, epochs=4, limit_test=200), progress=False
    )
    assert summary["iterations"] == 32
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    epochs = [record for record in records if record.get("event") == "epoch"]
    assert len(epochs) == 4
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert summary["test_accuracy"] > 0.3  # chance is 0.1
    metadata = read_metadata(run / "model.safetensors")
    assert metadata["kind"] == "classifier"
    assert metadata["metrics"]["test_accuracy"] == summary["test_accuracy"]
    assert metadata["metrics"]["test_images"] == 200
    written = json.loads((run / "summary.json").read_text())
    assert written["test_accuracy"] == summary["test_accuracy"]
    assert read_metadata(run / "checkpoint.safetensors")["metrics"]["test_images"] == 200


def test_interrupted_and_resumed_run_is_bit_identical(
    fashion_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    reference = train_classifier(tiny_config(fashion_dir, tmp_path / "whole"), progress=False)

    real_augment = classifier_training.augment_batch
    calls = {"n": 0}

    def interrupting_augment(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 8:  # inside epoch 1, between checkpoints
            raise KeyboardInterrupt
        return real_augment(*args, **kwargs)

    monkeypatch.setattr(classifier_training, "augment_batch", interrupting_augment)
    config = tiny_config(fashion_dir, tmp_path / "split")
    with pytest.raises(KeyboardInterrupt):
        train_classifier(config, progress=False)
    assert read_metadata(tmp_path / "split" / "checkpoint.safetensors")["iteration"] == 7
    monkeypatch.setattr(classifier_training, "augment_batch", real_augment)
    with pytest.raises(UsageError, match="--resume"):
        train_classifier(config, progress=False)
    with pytest.raises(UsageError, match="differ"):
        train_classifier(tiny_config(fashion_dir, tmp_path / "split", lr=0.05), resume=True)
    resumed = train_classifier(config, resume=True, progress=False)

    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    split = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert whole.keys() == split.keys()
    assert all(torch.equal(whole[name], split[name]) for name in whole)
    assert resumed["test_accuracy"] == reference["test_accuracy"]
    iterations = [
        json.loads(line).get("iteration")
        for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()
    ]
    assert iterations.count(10) == 1  # the log was cut back to the checkpoint, not duplicated


def test_cli_trains_lists_and_tests(fashion_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(
        app,
        [
            "train-classifier", "--dataset", "fashion-mnist", "--out", str(out),
            "--epochs", "1", "--batch-size", "32", "--limit-train", "64", "--limit-test", "50",
            "--eval-images", "0", "--data-dir", str(fashion_dir), "--device", "cpu",
            "--threads", "1", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    model = load_classifier(out / "model.safetensors")
    assert model.config is not None and model.config.arch == "fashion-cnn"

    result = runner.invoke(
        app,
        [
            "test-classifier", "--classifier", str(out / "model.safetensors"), "--n", "50",
            "--data-dir", str(fashion_dir), "--device", "cpu", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["images"] == 50
    assert report["accuracy"] == report["recorded_metrics"]["test_accuracy"]

    result = runner.invoke(app, ["classifiers", "--json"])
    assert result.exit_code == 0
    assert {row["name"] for row in json.loads(result.output)} >= {"resnet20", "fashion-cnn"}

    result = runner.invoke(
        app, ["test-classifier", "--classifier", str(out / "model.safetensors"),
              "--dataset", "cifar10"],
    )  # fmt: skip
    assert result.exit_code != 0
    assert isinstance(result.exception, UsageError)
    assert "1-channel" in str(result.exception)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train-classifier", "--arch", "vgg99", "--out", "OUT"], "valid: fashion-cnn"),
        (
            ["train-classifier", "--dataset", "fashion-mnist", "--arch", "resnet20", "-o", "OUT"],
            "takes 3-channel images",
        ),
        (["test-classifier", "--classifier", "OUT/none.safetensors"], "not found"),
    ],
)
def test_cli_bad_input_fails_cleanly(
    args: list[str], message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    argv = [arg.replace("OUT", str(tmp_path / "run")) for arg in args]
    monkeypatch.setattr(sys, "argv", ["comdefend", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code != 0
    captured = capsys.readouterr()
    assert message in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "run").exists()
