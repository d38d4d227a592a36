"""Evaluating the user's own model: an ``nn.Module`` from Python, ``package.module:factory`` on
the command line, the input contract checked with one-line errors, and resume that knows the
model by its weights."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from comdefend.cli import app
from comdefend.errors import UsageError
from comdefend.evaluation import EvaluationConfig, EvaluationResult, evaluate
from comdefend.evaluation.inputs import module_sha256

#: The cheapest real run: 8 embedded Fashion-MNIST images, FGSM, one batch.
CHEAP: dict[str, Any] = {
    "split": "sample",
    "attacks": ["fgsm"],
    "n": 8,
    "batch_size": 8,
    "progress": False,
}


def _class_means() -> torch.Tensor:
    from comdefend.data.datasets import load_dataset

    sample = load_dataset("fashion-mnist", "sample")
    x, y = sample.float_images()[200:], sample.labels.long()[200:]  # not the evaluated images
    return torch.stack([x[y == label].mean(0).flatten() for label in range(10)])


class NearestMean(nn.Module):
    """A user's classifier: the nearest class mean of the Fashion-MNIST sample (about 65 %
    accurate), as a linear layer. Records what it is given."""

    def __init__(self, means: torch.Tensor) -> None:
        super().__init__()
        self.linear = nn.Linear(means.shape[1], means.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(means)
            self.linear.bias.copy_(-0.5 * (means**2).sum(1))
        self.seen: list[tuple[Any, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = float(x.detach().min()), float(x.detach().max())
        self.seen.append((x.dim(), x.dtype, low, high, self.training))
        return self.linear(x.flatten(1))


class Blur(nn.Module):
    """A user's purifier: a 3x3 box blur (differentiable)."""

    name = "blur"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


@pytest.fixture(scope="module")
def means() -> torch.Tensor:
    return _class_means()


def test_a_module_from_python_with_a_module_defense(means: torch.Tensor) -> None:
    model = NearestMean(means)  # in training mode, gradients on, as a user may hand it over
    result = evaluate(
        model,
        "fashion-mnist",
        defenses=["none", Blur(), "bits:3"],
        threat_models=["oblivious", "bpda"],
        eps=[0, 16],
        **CHEAP,
    )
    assert isinstance(result, EvaluationResult)
    # the contract: NCHW float in [0, 1], always in eval mode
    assert {(dim, dtype, training) for dim, dtype, _, _, training in model.seen} == {
        (4, torch.float32, False)
    }
    assert all(0.0 <= low and high <= 1.0 for _, _, low, high, _ in model.seen)
    # handed back as it came
    assert model.training and all(p.requires_grad for p in model.parameters())

    info = result.classifier
    assert info.kind == "module" and info.reference == f"{__name__}.NearestMean"
    assert info.sha256 == module_sha256(model) and info.module == f"{__name__}.NearestMean"
    assert result.provenance.checkpoints[info.reference] == info.sha256
    assert [d.spec for d in result.defenses] == ["none", "blur", "bits:3"]
    blur = result.defenses[1].settings
    assert blur["module"] == f"{__name__}.Blur" and blur["differentiable"] is True

    assert result.dataset.n == 8 and result.clean_accuracy("none") >= 0.5
    for defense in ("none", "blur", "bits:3"):
        untouched = result.cell("fgsm", 0, defense)
        assert untouched.robust_accuracy == pytest.approx(result.clean_accuracy(defense))
        assert untouched.n == 8 and untouched.threat_model == "oblivious"
        attacked = result.cell("fgsm", 16, defense, "bpda")
        assert attacked.robust_accuracy is not None
        assert attacked.robust_accuracy <= result.clean_accuracy(defense)
    # blur is differentiable: the attacker gets exact gradients under bpda
    assert "exact gradients" in (result.cell("fgsm", 16, "blur", "bpda").note or "")
    assert len(result.select(threat_model="bpda")) == 2 * 3


def test_two_modules_of_one_class_get_two_names(means: torch.Tensor) -> None:
    result = evaluate(
        NearestMean(means), "fashion-mnist", defenses=[Blur(), Blur()], eps=[8], **CHEAP
    )
    assert [d.spec for d in result.defenses] == ["blur", "blur#2"]


def _write_models(folder: Path, package: str) -> None:
    """``package/models.py`` with factories, good and bad, for the command line."""
    root = folder / package
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "models.py").write_text(
        textwrap.dedent(
            """
            import math

            import torch
            from torch import nn


            class Linear(nn.Module):
                def __init__(self, classes=10, channels=1):
                    super().__init__()
                    generator = torch.Generator().manual_seed(0)
                    self.layer = nn.Linear(channels * 28 * 28, classes)
                    with torch.no_grad():
                        self.layer.weight.copy_(
                            0.01 * torch.randn(classes, channels * 28 * 28, generator=generator)
                        )
                        self.layer.bias.zero_()

                def forward(self, x):
                    return self.layer(x.flatten(1))


            class Flat(Linear):
                def forward(self, x):
                    return super().forward(x).sum(1)


            class NotFinite(Linear):
                def forward(self, x):
                    return super().forward(x) * math.nan


            def build():
                return Linear()


            def seven_classes():
                return Linear(classes=7)


            def rgb():
                return Linear(channels=3)


            def flat():
                return Flat()


            def not_finite():
                return NotFinite()


            def broken():
                raise FileNotFoundError("mynet.pt is missing\\nsecond line")


            def not_a_module():
                return {"weights": 1}


            def needs_arguments(path, classes=10):
                return Linear(classes)


            NOT_CALLABLE = 3
            """
        )
    )
    (root / "failing.py").write_text("raise RuntimeError('cannot load at import time')\n")


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """An importable package of the user's models (a fresh name per test)."""
    package = f"user_models_{tmp_path.name.replace('-', '_')}"
    _write_models(tmp_path / "code", package)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    yield package
    for name in [n for n in sys.modules if n == package or n.startswith(f"{package}.")]:
        del sys.modules[name]


def _arguments(classifier: str, out: Path) -> list[str]:
    return [
        "evaluate", "--classifier", classifier, "--dataset", "fashion-mnist", "--split",
        "sample", "--defense", "none", "--defense", "jpeg:75", "--attack", "fgsm", "--eps", "8",
        "--images", "8", "--batch-size", "8", "--no-progress", "--out", str(out),
    ]  # fmt: skip


def test_a_factory_on_the_command_line(user_package: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    reference = f"{user_package}.models:build"
    done = CliRunner().invoke(app, _arguments(reference, out))
    assert done.exit_code == 0, done.output
    assert "evaluated 2 cells on 8 images" in done.output
    result = EvaluationResult.load(out / "results.json")
    info = result.classifier
    assert (info.kind, info.reference, info.module) == (
        "factory",
        reference,
        f"{user_package}.models.Linear",
    )
    assert result.settings.classifier == reference
    assert result.provenance.checkpoints == {reference: info.sha256}
    assert [c.defense for c in result.cells] == ["none", "jpeg:75"]
    assert f"classifier: {reference} (imported factory" in (out / "report.md").read_text()


def test_a_factory_in_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``comdefend`` started as a console script has no current folder on sys.path; a
    ``mymodels.py`` beside the user is found anyway."""
    package = f"here_{tmp_path.name.replace('-', '_')}"
    _write_models(tmp_path, package)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        done = CliRunner().invoke(app, _arguments(f"{package}.models:build", tmp_path / "out"))
    finally:
        for name in [n for n in sys.modules if n.startswith(package)]:
            del sys.modules[name]
    assert done.exit_code == 0, done.output
    assert str(tmp_path) not in sys.path  # put back once imported


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        ("models:seven_classes", "returns 7 logits per image but fashion-mnist has 10 classes"),
        ("models:flat", "returned shape (4,) for 4 images of shape (4, 1, 28, 28)"),
        ("models:not_finite", "returned NaN or infinite logits"),
        ("models:rgb", "failed on 4 fashion-mnist images of shape (4, 1, 28, 28)"),
        ("models:broken", "broken() raised FileNotFoundError: mynet.pt is missing"),
        ("models:not_a_module", "not_a_module() returned a dict, not a torch.nn.Module"),
        ("models:needs_arguments", "needs the argument(s) path; give a factory"),
        ("models:NOT_CALLABLE", "NOT_CALLABLE is a int, not a callable"),
        ("models:nope", "has no attribute 'nope'"),
        ("absent:build", "no module named"),
        ("failing:build", "failed: RuntimeError: cannot load at import time"),
    ],
)
def test_contract_violations_are_one_line_errors(
    user_package: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    factory: str,
    expected: str,
) -> None:
    from comdefend.cli import main

    out = tmp_path / "report"
    with pytest.raises(SystemExit) as stopped:
        main(_arguments(f"{user_package}.{factory}", out))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: classifier {user_package}.") and expected in err, err
    assert not out.exists()


class Shrink(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., 1:, 1:]


def test_bad_python_arguments_are_usage_errors(means: torch.Tensor) -> None:
    with pytest.raises(UsageError, match="must be a torch.nn.Module, a checkpoint path"):
        evaluate(42, "fashion-mnist", eps=[8], **CHEAP)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="spec string .* or a torch.nn.Module, got a int"):
        evaluate(NearestMean(means), "fashion-mnist", defenses=[3], eps=[8], **CHEAP)  # type: ignore[list-item]
    with pytest.raises(UsageError, match=r"defense Shrink returned \(4, 1, 27, 27\)"):
        evaluate(NearestMean(means), "fashion-mnist", defenses=[Shrink()], eps=[8], **CHEAP)
    wrong = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 100))
    with pytest.raises(UsageError, match="100 logits per image but fashion-mnist has 10"):
        evaluate(wrong, "fashion-mnist", eps=[8], **CHEAP)


def _interrupted(monkeypatch: pytest.MonkeyPatch, run: Any) -> None:
    """``run()`` stopped after its first (attack, eps) group."""
    import comdefend.evaluation.harness as harness

    real = harness._craft_and_score_group
    calls: list[object] = []

    def stop_at_the_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[7])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(harness, "_craft_and_score_group", stop_at_the_second)
        with pytest.raises(KeyboardInterrupt):
            run()


def test_resume_knows_the_model_by_its_weights(
    means: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report"
    settings: dict[str, Any] = {**CHEAP, "n": 4, "batch_size": 4, "eps": [4, 8], "out": out}
    _interrupted(monkeypatch, lambda: evaluate(NearestMean(means), "fashion-mnist", **settings))
    retrained = NearestMean(means)
    with torch.no_grad():
        retrained.linear.bias.add_(0.5)
    with pytest.raises(UsageError, match=r"other settings \(differing: classifier\)"):
        evaluate(retrained, "fashion-mnist", resume=True, **settings)
    # the same weights in a new object: the run continues
    resumed = evaluate(NearestMean(means), "fashion-mnist", resume=True, **settings)
    assert resumed.resumed_groups == 1 and len(resumed.cells) == 2


def test_resume_follows_a_moved_classifier_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from comdefend.models.classifiers import build_classifier, save_classifier

    torch.manual_seed(0)
    first = save_classifier(build_classifier("fashion-cnn").eval(), tmp_path / "a.safetensors")
    out = tmp_path / "report"
    settings: dict[str, Any] = {**CHEAP, "n": 4, "batch_size": 4, "eps": [4, 8], "out": out}
    _interrupted(monkeypatch, lambda: evaluate(first, "fashion-mnist", **settings))
    moved = tmp_path / "moved" / "renamed.safetensors"
    moved.parent.mkdir()
    shutil.move(first, moved)
    resumed = evaluate(str(moved), "fashion-mnist", resume=True, **settings)
    assert resumed.resumed_groups == 1
    assert resumed.settings.classifier == str(moved)
    assert set(resumed.provenance.checkpoints) == {str(moved)}


def test_detectors_are_fitted_on_images_of_the_runs_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import comdefend.data.datasets as datasets
    from comdefend.evaluation import harness

    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)))
    config = EvaluationConfig(
        dataset="imagenet", classifier="x", detectors=["pca"], image_size=64, data_dir="here"
    )
    harness._detector_train_set(SimpleNamespace(config=config))  # type: ignore[arg-type]
    assert calls == [
        (("imagenet", "train", "here", 64), {"max_images": harness.DETECTOR_TRAIN_IMAGES})
    ]


def test_test_classifier_reads_only_the_images_it_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    import comdefend.data.datasets as datasets

    real = datasets.load_dataset
    asked: list[int | None] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("max_images"))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    arguments = ["test-classifier", "-c", "fashion-cnn", "--split", "sample", "--n", "2"]
    done = CliRunner().invoke(app, [*arguments, "--device", "cpu", "--json"])
    assert done.exit_code == 0, done.output
    assert asked == [2] and json.loads(done.stdout)["images"] == 2
