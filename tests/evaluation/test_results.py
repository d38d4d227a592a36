"""The typed result of an evaluation: what ``results.json`` holds, read back to the same object,
files of earlier versions readable, and the public names of :mod:`comdefend.evaluation`."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import pytest

from comdefend.errors import UsageError
from comdefend.evaluation import EvaluationConfig, EvaluationResult, evaluate
from comdefend.evaluation.results import RESULTS_FORMAT, CellResult

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[EvaluationResult, Path]:
    """A small run with a skipped, a reused and a computed cell, and its report folder."""
    out = tmp_path_factory.mktemp("run") / "report"
    result = evaluate(
        "fashion-cnn",
        "fashion-mnist",
        split="sample",
        defenses=["none", "bits:3"],
        attacks=["fgsm", "deepfool"],
        attack_params={"deepfool": {"steps": 2}},
        threat_models=["oblivious", "bpda", "relaxed"],
        eps=[8],
        n=4,
        batch_size=4,
        out=out,
        progress=False,
    )
    return result, out


def test_the_result_is_what_results_json_holds(written: tuple[EvaluationResult, Path]) -> None:
    result, out = written
    saved = json.loads((out / "results.json").read_text())
    assert result.to_dict() == saved
    assert EvaluationResult.load(out / "results.json") == result
    assert EvaluationResult.from_dict(result.to_dict()) == result
    assert saved["format"] == RESULTS_FORMAT and "results.json" in result.files
    # one line per cell in the CSV, the same numbers
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(result.cells) == 1 + 2 * 2 * 3


def test_save_and_load_round_trip(written: tuple[EvaluationResult, Path], tmp_path: Path) -> None:
    result, _ = written
    path = result.save(tmp_path / "copy.json")
    assert EvaluationResult.load(path) == result
    assert json.loads(path.read_text()) == result.to_dict()


def test_cells_are_typed_and_skipped_cells_have_no_numbers(
    written: tuple[EvaluationResult, Path],
) -> None:
    result, _ = written
    computed = result.cell("fgsm", 8, "bits:3", "bpda")
    assert isinstance(computed, CellResult) and computed.status == "ok"
    assert computed.n == 4 and computed.draws == 1 and computed.attacker_model
    assert computed.robust_accuracy is not None and 0 <= computed.robust_accuracy <= 1
    reused = result.cell("fgsm", 8, "none", "bpda")
    assert reused.status == "reused"
    assert reused.robust_accuracy == result.cell("fgsm", 8, "none").robust_accuracy
    skipped = result.cell("fgsm", 8, "bits:3", "relaxed")
    assert skipped.skipped and skipped.robust_accuracy is None and "relaxed" in str(skipped.note)
    assert set(skipped.to_dict()) == {
        "attack", "eps", "eps_value", "defense", "threat_model", "effective_threat_model",
        "status", "note",
    }  # fmt: skip
    assert result.cell("deepfool", "min-norm", "none").eps_value is None
    assert {w.eps for w in result.worst_case} == {8.0, "min-norm"}
    with pytest.raises(KeyError, match="no cell"):
        result.cell("pgd", 8, "none")
    assert result.settings.attack_params == {"deepfool": {"steps": 2}}
    assert result.classifier.kind == "checkpoint" and result.classifier.sha256
    assert result.classifier.sha256 in result.provenance.checkpoints.values()


def test_results_written_before_the_types_are_read() -> None:
    """``results.json`` files of earlier versions (the published ones in docs/) read into
    the types and write back every value they held."""
    published = [
        path
        for path in sorted(DOCS.rglob("results.json"))
        if json.loads(path.read_text()).get("format") == RESULTS_FORMAT
    ]
    if not published:
        pytest.skip("no published evaluation results.json in docs/")
    for path in published:
        old = json.loads(path.read_text())
        result = EvaluationResult.from_dict(old)
        again = result.to_dict()
        for key, value in old.items():
            if key == "classifier":  # gained kind, sha256 and module
                assert {k: again[key][k] for k in value} == value
            else:
                assert again[key] == value, (path, key)
        assert result.classifier.sha256 == old["classifier"]["weights"]["sha256"]
        first = old["cells"][0]
        cell = result.cell(first["attack"], first["eps"], first["defense"], first["threat_model"])
        assert cell.robust_accuracy == first["robust_accuracy"]


def test_other_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not the results of `comdefend evaluate`"):
        EvaluationResult.from_dict({"settings": {}, "presets": []})
    broken = tmp_path / "results.json"
    broken.write_text("{not json")
    with pytest.raises(UsageError, match="cannot read evaluation results"):
        EvaluationResult.load(broken)


def test_public_names_and_one_set_of_defaults() -> None:
    """``evaluate``'s keywords are :class:`EvaluationConfig`'s fields with its defaults."""
    import comdefend.evaluation as evaluation

    assert {"evaluate", "EvaluationResult", "EvaluationConfig"} <= set(evaluation.__all__)
    parameters = inspect.signature(evaluate).parameters
    for config_field in dataclasses.fields(EvaluationConfig):
        assert config_field.name in parameters, config_field.name
        default: Any = parameters[config_field.name].default
        if default is inspect.Parameter.empty:
            continue  # required in both
        if config_field.default is not dataclasses.MISSING:
            expected = config_field.default
        else:
            expected = config_field.default_factory()  # type: ignore[misc]
        if isinstance(expected, list):
            default = list(default)
        if config_field.name == "attack_params":
            default = default or {}
        assert default == expected, config_field.name
