"""``evaluate --resume`` on ImageNet folders: refused when the images changed since the run
started, accepted when the same images were moved to another folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comdefend.data.imagenet import IMAGENET_WNIDS
from comdefend.errors import UsageError
from comdefend.evaluation.harness import EvaluationConfig, evaluate
from comdefend.evaluation.progress import PROGRESS_FILE


def _png(path: Path, seed: int) -> None:
    array = np.random.default_rng(seed).integers(0, 256, (40, 44, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)


def _folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = ["file,label,wnid,name"]
    for index, label in enumerate([0, 1, 2]):
        _png(root / "images" / f"{index}.png", index)
        rows.append(f"{index}.png,{label},{IMAGENET_WNIDS[label]},x")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An untrained ResNet-20 with 1,000 outputs: any size of RGB image, ImageNet's labels."""
    from comdefend.models.classifiers import build_classifier, save_classifier

    torch.manual_seed(0)
    model = build_classifier("resnet20", 1000, dataset="imagenet").eval()
    path = tmp_path_factory.mktemp("classifier") / "resnet20-imagenet.safetensors"
    return str(save_classifier(model, path))


def _config(classifier: str, data_dir: Path, out: Path, **overrides: object) -> EvaluationConfig:
    values: dict[str, object] = {
        "dataset": "imagenet",
        "classifier": classifier,
        "data_dir": str(data_dir),
        "defenses": ["none", "bits:4"],
        "attacks": ["fgsm"],
        "eps": [4, 8],
        "n": 3,
        "batch_size": 3,
        "image_size": 32,
        "progress": False,
        "out": str(out),
        **overrides,
    }
    return EvaluationConfig(**values)  # type: ignore[arg-type]


def _interrupted(monkeypatch: pytest.MonkeyPatch, classifier: str, data: Path, out: Path) -> None:
    import comdefend.evaluation.harness as harness

    real_group = harness._craft_and_score_group
    calls: list[object] = []

    def interrupted_after_one(*args: object, **kwargs: object) -> object:
        calls.append(args[7])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_group(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(harness, "_craft_and_score_group", interrupted_after_one)
        with pytest.raises(KeyboardInterrupt):
            evaluate(_config(classifier, data, out))
    assert (out / PROGRESS_FILE).is_file()


def _numbers(results: dict) -> str:
    cells = [{k: v for k, v in c.items() if k != "seconds"} for c in results["cells"]]
    return json.dumps([cells, results["clean"], results["worst_case"]], sort_keys=True)


def test_resume_refuses_changed_images_and_accepts_a_moved_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, classifier: str
) -> None:
    data = _folder(tmp_path / "imagenet")
    reference = evaluate(_config(classifier, data, tmp_path / "whole")).to_dict()
    out = tmp_path / "cut"
    _interrupted(monkeypatch, classifier, data, out)

    # one image replaced: the report would mix old and new images
    original = (data / "images" / "1.png").read_bytes()
    _png(data / "images" / "1.png", 99)
    with pytest.raises(UsageError, match=r"test images' pixels changed.*--force"):
        evaluate(_config(classifier, data, out, resume=True))
    (data / "images" / "1.png").write_bytes(original)
    # a relabelled image
    table = (data / "labels.csv").read_text()
    relabelled = table.replace(f"2.png,2,{IMAGENET_WNIDS[2]}", f"2.png,3,{IMAGENET_WNIDS[3]}")
    (data / "labels.csv").write_text(relabelled)
    with pytest.raises(UsageError, match="test images' labels changed"):
        evaluate(_config(classifier, data, out, resume=True))
    (data / "labels.csv").write_text(table)

    # the same images in a renamed folder: the run continues
    moved = tmp_path / "renamed"
    shutil.move(data, moved)
    resumed = evaluate(_config(classifier, moved, out, resume=True)).to_dict()
    assert resumed["resumed_groups"] == 1
    assert _numbers(resumed) == _numbers(json.loads(json.dumps(reference, default=str)))
    assert not (out / PROGRESS_FILE).exists()


def test_a_resume_restores_the_clean_scores_instead_of_purifying_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, classifier: str
) -> None:
    import comdefend.evaluation.harness as harness
    from comdefend.evaluation.progress import EvaluationProgress
    from comdefend.evaluation.scoring import Scorer

    data = _folder(tmp_path / "imagenet")
    defenses = ["none", "bits:4", "comdefend:comdefend-cifar10@noise=1"]  # randomized
    out = tmp_path / "cut"
    passes: list[int] = []  # the defenses scored without clean scores: the clean pass
    real_score, real_group = Scorer.score, harness._craft_and_score_group

    def counting(self: Scorer, index: int, *args: object, **kwargs: object) -> object:
        if len(args) < 3 and kwargs.get("clean") is None:
            passes.append(index)
        return real_score(self, index, *args, **kwargs)  # type: ignore[arg-type]

    def interrupted_at_the_second_group(*args: object, **kwargs: object) -> object:
        if args[7] == 8:  # (ev, scorer, detectors, plan, shard, clean, attack, eps, ...)
            raise KeyboardInterrupt
        return real_group(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Scorer, "score", counting)
    reference = evaluate(_config(classifier, data, tmp_path / "whole", defenses=defenses))
    assert passes == [0, 1, 2]
    passes.clear()
    with monkeypatch.context() as patch:
        patch.setattr(harness, "_craft_and_score_group", interrupted_at_the_second_group)
        with pytest.raises(KeyboardInterrupt):
            evaluate(_config(classifier, data, out, defenses=defenses))
    assert passes == [0, 1, 2]
    saved = EvaluationProgress(out, json.loads(_header_fingerprint(out)), resume=True).clean
    assert saved is not None and [s.correct.shape[1] for s in saved.defenses] == [3, 3, 3]
    assert saved.defenses[2].correct.shape[0] > 1  # one row per draw of the randomized one

    passes.clear()
    resumed = evaluate(_config(classifier, data, out, defenses=defenses, resume=True)).to_dict()
    assert resumed["resumed_groups"] == 1
    assert passes == []  # the clean scores came from the progress file
    assert resumed["work"]["images_purified"] < reference.to_dict()["work"]["images_purified"]
    assert _numbers(resumed) == _numbers(json.loads(json.dumps(reference.to_dict(), default=str)))


def _header_fingerprint(out: Path) -> str:
    """The fingerprint stored in ``out``'s progress file (JSON)."""
    from comdefend.checkpoint import load_checkpoint

    _, metadata = load_checkpoint(out / PROGRESS_FILE, "evaluation-progress")
    return json.dumps(metadata["fingerprint"])
