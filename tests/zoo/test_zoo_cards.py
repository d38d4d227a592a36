"""Model cards: rendered for every entry, numbers read from results.json (never typed), the
``zoo list / show / register / card`` commands, and their one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import comdefend.zoo as zoo
from comdefend import ComDefend, ComDefendConfig
from comdefend.checkpoint import sha256_of
from comdefend.errors import CheckpointError, UsageError
from comdefend.zoo.cards import (
    CLEAN,
    NOT_MEASURED,
    ROBUST,
    WORST_CASE,
    card_dict,
    headline,
    measurements_from_results,
    render_card,
)
from comdefend.zoo.registration import attach_results, derive_purpose, register_weights
from support import run_cli as run

REPO = Path(__file__).resolve().parents[2]
ENTRIES = zoo.list_pretrained()


def _evaluations() -> list[Path]:
    """Every evaluation results.json under docs/ (wherever the docs keep them)."""
    found = []
    for path in sorted((REPO / "docs").glob("**/results.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("cells"), list):
            found.append(path)
    return found


def _results_of(defense: str) -> Path:
    for path in _evaluations():
        data = json.loads(path.read_text(encoding="utf-8"))
        if any(d["spec"] == defense for d in data["defenses"]):
            return path
    pytest.skip(f"no results.json under docs/ evaluates {defense}")


@pytest.fixture(scope="module")
def fashion_results() -> Path:
    """The Fashion-MNIST test-set evaluation in docs/ (10,000 images, oblivious)."""
    return _results_of("comdefend:comdefend-fashion-mnist")


def assert_one_error_line(result: tuple[int, str, str], message: str) -> None:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err


@pytest.fixture()
def registry(tmp_path: Path) -> Path:
    """A copy of the shipped registry (cards without measurements) in a temporary folder."""
    data = json.loads(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))
    for entry in data["entries"]:
        entry["card"]["measurements"] = []
    path = tmp_path / "zoo" / "registry.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- every shipped entry has a card ------------------------------------------------------------


@pytest.mark.parametrize("name", ENTRIES)
def test_every_entry_has_a_card_that_renders(name: str) -> None:
    entry = zoo.get_entry(name)
    card = entry.card
    assert card.intended_use and card.image_size
    assert (card.mode in ("full", "patch")) == (entry.kind == "purifier")
    text = render_card(entry, [zoo.get_entry(n) for n in ENTRIES])
    for part in ("What it is for", "Measured accuracy", "Training provenance", entry.command):
        assert part in text
    assert f"{card.image_size}x{card.image_size}" in text
    if not card.measurements:
        assert f"robust accuracy: {NOT_MEASURED}" in text
        assert f"comdefend zoo card {name} --results" in text
    as_json = card_dict(entry)
    assert json.loads(json.dumps(as_json)) == as_json
    assert as_json["purpose"]["image_size"] == card.image_size
    assert as_json["provenance"]["command"] == entry.command
    assert ("robust" in as_json["not_measured"]) == (as_json["headline"] is None)


@pytest.mark.parametrize("name", [n for n in ENTRIES if zoo.get_entry(n).source is None])
def test_card_purpose_is_what_the_files_say(name: str) -> None:
    entry = zoo.get_entry(name)
    purpose = derive_purpose(entry)
    card = entry.card
    assert (card.image_size, card.mode, card.patch_size) == (
        purpose["image_size"],
        purpose["mode"],
        purpose["patch_size"],
    )


@pytest.mark.parametrize("name", ENTRIES)
def test_card_numbers_are_those_of_their_source_files(name: str) -> None:
    """Every number on a shipped card is read again from its results.json: none is typed."""
    entry = zoo.get_entry(name)
    sources = sorted({(m.source, m.defense) for m in entry.card.measurements})
    for source, defense in sources:
        assert source.startswith("docs/") and source.endswith("results.json"), source
        assert (REPO / source).is_file(), f"{name}: {source} is gone; re-attach with zoo card"
        again = measurements_from_results(
            entry,
            REPO / source,
            defense=None if entry.kind == "classifier" else defense,
            source=source,
        )
        on_card = [m for m in entry.card.measurements if m.source == source]
        assert [m for m in again if m.defense == defense] == [
            m for m in on_card if m.defense == defense
        ]


def test_the_fashion_mnist_entries_carry_the_test_set_evaluation(fashion_results: Path) -> None:
    source = fashion_results.relative_to(REPO).as_posix()
    for name in ("comdefend-fashion-mnist", "fashion-cnn"):
        measured = zoo.get_entry(name).card.measurements
        assert any(m.source == source for m in measured), f"{name}: zoo card --all --results"


# -- reading results.json ----------------------------------------------------------------------


def test_extraction_gives_the_numbers_in_the_file(fashion_results: Path) -> None:
    raw = json.loads(fashion_results.read_text(encoding="utf-8"))
    entry = zoo.get_entry("comdefend-fashion-mnist")
    spec = next(
        d["spec"]
        for d in raw["defenses"]
        if (d["settings"].get("weights") or {}).get("sha256") == entry.sha256
    )
    found = measurements_from_results(entry, fashion_results, source="r.json")
    assert {m.defense for m in found} == {spec} and {m.source for m in found} == {"r.json"}
    (clean,) = [m for m in found if m.metric == CLEAN]
    row = next(r for r in raw["clean"] if r["defense"] == spec)
    assert clean.value == row["accuracy"] and clean.images == raw["dataset"]["n"]
    cells = [c for c in raw["cells"] if c["defense"] == spec and c["status"] != "skipped"]
    robust = [m for m in found if m.metric == ROBUST]
    assert len(robust) == len(cells) > 0
    for m, cell in zip(robust, cells, strict=True):
        assert (m.attack, m.eps, m.threat_model) == (
            cell["attack"],
            cell["eps"],
            cell["threat_model"],
        )
        assert m.value == cell["robust_accuracy"] and m.images == cell["n"]
        assert m.steps == cell["attack_settings"].get("steps")
        assert m.attack_settings == cell["attack_settings"]
        assert m.classifier == raw["classifier"]["weights"]["zoo_name"]
        assert m.purify_mode == "full" and m.dataset == raw["dataset"]["name"]
    worst = [m for m in found if m.metric == WORST_CASE]
    rows = [r for r in raw["worst_case"] if r["defense"] == spec]
    assert [(m.value, m.eps, list(m.attacks)) for m in worst] == [
        (r["worst_case_robust_accuracy"], r["eps"], r["attacks"]) for r in rows
    ]
    # The classifier's card takes the undefended rows; other entries find nothing here.
    classifier = measurements_from_results(zoo.get_entry("fashion-cnn"), raw)
    assert {m.defense for m in classifier} == {"none"}
    none_cells = [c for c in raw["cells"] if c["defense"] == "none"]
    assert [m.value for m in classifier if m.metric == ROBUST] == [
        c["robust_accuracy"] for c in none_cells
    ]
    assert measurements_from_results(zoo.get_entry("comdefend-cifar10"), raw) == []
    assert measurements_from_results(zoo.get_entry("resnet20-cifar10"), raw) == []


def test_both_layouts_and_older_files_give_the_same_numbers(fashion_results: Path) -> None:
    raw = json.loads(fashion_results.read_text(encoding="utf-8"))
    entry = zoo.get_entry("comdefend-fashion-mnist")
    expected = measurements_from_results(entry, raw, source="s")
    assert expected
    results_module = pytest.importorskip("comdefend.evaluation.results")
    typed = results_module.EvaluationResult.from_dict(raw)
    assert measurements_from_results(entry, typed, source="s") == expected
    assert measurements_from_results(entry, typed.to_dict(), source="s") == expected
    # A file without recorded weights: the defense is matched by its spec.
    older = json.loads(json.dumps(raw))
    for defense in older["defenses"]:
        defense["settings"].pop("weights", None)
    older["defenses"] = [d["spec"] for d in older["defenses"]]
    matched = measurements_from_results(entry, older, source="s")
    assert [m.value for m in matched] == [m.value for m in expected]


def test_defense_option_and_its_errors(fashion_results: Path) -> None:
    raw = json.loads(fashion_results.read_text(encoding="utf-8"))
    entry = zoo.get_entry("comdefend-fashion-mnist")
    mine = next(d["spec"] for d in raw["defenses"] if entry.name in d["spec"])
    assert measurements_from_results(entry, raw, defense=mine) == measurements_from_results(
        entry, raw
    )
    with pytest.raises(UsageError, match="is not in .* its defenses: none"):
        measurements_from_results(entry, raw, defense="jpeg:10")
    other = next(
        d["spec"]
        for d in raw["defenses"]
        if (d["settings"].get("weights") or {}).get("sha256") not in (None, entry.sha256)
    )
    with pytest.raises(UsageError, match="ran weights with sha256"):
        measurements_from_results(entry, raw, defense=other)
    with pytest.raises(UsageError, match="is a classifier"):
        measurements_from_results(zoo.get_entry("fashion-cnn"), raw, defense="none")
    study = REPO / "docs" / "results" / "residual-study-imagenet" / "results.json"
    if study.is_file():
        with pytest.raises(UsageError, match="not the results of `comdefend evaluate`"):
            measurements_from_results(entry, study)


def test_headline_prefers_adaptive_then_8_over_255_then_the_worst_attack(
    fashion_results: Path,
) -> None:
    found = measurements_from_results(zoo.get_entry("comdefend-fashion-mnist"), fashion_results)
    chosen = headline(found)
    assert chosen is not None
    robust, clean = chosen
    at_8 = [m for m in found if m.robust and m.eps == 8.0]
    assert robust.value == min(m.value for m in at_8) and robust.eps == 8.0
    assert clean is not None and clean.metric == CLEAN
    one = next(m for m in found if m.metric == ROBUST and m.eps == 25.0)
    adaptive = dataclasses.replace(one, threat_model="bpda", source="other")
    assert headline([*found, adaptive]) == (adaptive, None)
    assert headline([m for m in found if m.metric == CLEAN]) is None
    # Given the model's own dataset, its results there come before an adaptive number measured
    # on another dataset; an adaptive number on its own dataset still comes first.
    elsewhere = dataclasses.replace(adaptive, dataset="imagenet")
    assert headline([*found, elsewhere], "fashion-mnist") == chosen
    assert headline([*found, elsewhere]) == (elsewhere, None)
    assert headline([*found, elsewhere, adaptive], "fashion-mnist") == (adaptive, None)


# -- the commands ------------------------------------------------------------------------------


def test_zoo_card_list_and_show_through_the_cli(
    capsys: pytest.CaptureFixture[str], registry: Path, fashion_results: Path
) -> None:
    code, out, err = run(capsys, "zoo", "list", "--registry", str(registry))
    assert code == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert set(rows) == set(ENTRIES) and all(line.rstrip().endswith("—") for line in rows.values())

    code, out, err = run(
        capsys,
        "zoo",
        "card",
        "--all",
        "--results",
        str(fashion_results),
        "--registry",
        str(registry),
    )
    assert code == 0, err
    assert "comdefend-fashion-mnist:" in out and "fashion-cnn:" in out
    expected = measurements_from_results(zoo.get_entry("comdefend-fashion-mnist"), fashion_results)
    chosen = headline(expected)
    assert chosen is not None and chosen[1] is not None
    robust, clean = chosen

    code, out, _ = run(capsys, "zoo", "list", "--registry", str(registry))
    row = next(line for line in out.splitlines() if line.startswith("comdefend-fashion-mnist "))
    assert f"{100 * robust.value:.1f}%" in row and f"{100 * clean.value:.1f}%" in row
    assert "8/255" in row and f"{robust.images:,} images" in row and "28x28" in row

    code, out, _ = run(capsys, "zoo", "list", "--json", "--registry", str(registry))
    listed = {item["name"]: item for item in json.loads(out)}
    assert listed["comdefend-fashion-mnist"]["headline"]["value"] == robust.value
    assert listed["comdefend-cifar10"]["headline"] is None

    code, out, _ = run(
        capsys, "zoo", "show", "comdefend-fashion-mnist", "--registry", str(registry)
    )
    assert code == 0
    assert f"{100 * robust.value:.2f}%" in out and f"{100 * clean.value:.2f}%" in out
    assert fashion_results.name in out and "full mode" in out
    if not any(m.threat_model != "oblivious" for m in expected if m.robust):
        assert f"adaptive (bpda): {NOT_MEASURED}" in out and "--threat-model oblivious,bpda" in out

    code, out, _ = run(
        capsys, "zoo", "show", "comdefend-fashion-mnist", "--json", "--registry", str(registry)
    )
    card = json.loads(out)
    assert card["headline"]["robust"]["value"] == robust.value
    assert len(card["measurements"]) == len(expected)
    assert card["purpose"] == {
        "dataset": "fashion-mnist",
        "image_size": 28,
        "mode": "full",
        "patch_size": None,
        "intended_use": zoo.get_entry("comdefend-fashion-mnist").card.intended_use,
    }

    code, out, _ = run(capsys, "zoo", "show", "comdefend-cifar10", "--registry", str(registry))
    assert f"robust accuracy: {NOT_MEASURED}" in out
    assert "comdefend evaluate --dataset cifar10 --classifier resnet20-cifar10" in out


def test_attaching_twice_changes_nothing(registry: Path, fashion_results: Path) -> None:
    attach_results(["comdefend-fashion-mnist"], fashion_results, registry=registry)
    once = registry.read_text(encoding="utf-8")
    attach_results(["comdefend-fashion-mnist"], fashion_results, registry=registry)
    assert registry.read_text(encoding="utf-8") == once
    entries = json.loads(once)["entries"]
    assert [e["name"] for e in entries] == ENTRIES  # order kept, every entry still loads
    assert zoo.get_entry("comdefend-fashion-mnist", registry).card.measurements


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["zoo", "show", "no-such-model"], "unknown pretrained model 'no-such-model'"),
        (["zoo", "card", "--results", "R"], "name the entries"),
        (["zoo", "card", "fashion-cnn", "--all", "--results", "R"], "not both"),
        (["zoo", "card", "--all", "--defense", "none", "--results", "R"], "exactly one entry"),
        (["zoo", "card", "nope", "--results", "R"], "unknown zoo entry 'nope'"),
        (["zoo", "card", "fashion-cnn", "--results", "missing.json"], "results file not found"),
    ],
)
def test_bad_card_and_show_arguments_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], registry: Path, args: list[str], message: str
) -> None:
    assert_one_error_line(run(capsys, *args, "--registry", str(registry)), message)


def test_results_that_do_not_measure_the_entry_are_refused(
    capsys: pytest.CaptureFixture[str], registry: Path, fashion_results: Path, tmp_path: Path
) -> None:
    before = registry.read_text(encoding="utf-8")
    args = ("--results", str(fashion_results), "--registry", str(registry))
    assert_one_error_line(run(capsys, "zoo", "card", "comdefend-cifar10", *args), "nowhere")
    not_json = tmp_path / "results.json"
    not_json.write_text("{", encoding="utf-8")
    assert_one_error_line(
        run(
            capsys,
            "zoo",
            "card",
            "fashion-cnn",
            "--results",
            str(not_json),
            "--registry",
            str(registry),
        ),  # fmt: skip
        "cannot read evaluation results",
    )
    assert registry.read_text(encoding="utf-8") == before


def test_bad_registries_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert_one_error_line(
        run(capsys, "zoo", "list", "--registry", str(tmp_path / "none.json")), "no registry.json"
    )
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"format": "comdefend-zoo/99", "entries": []}), encoding="utf-8")
    assert_one_error_line(run(capsys, "zoo", "list", "--registry", str(future)), "comdefend-zoo/99")
    with pytest.raises(CheckpointError, match="not a zoo registry"):
        zoo.list_pretrained(registry=future)


# -- registering -------------------------------------------------------------------------------


def _run_folder(path: Path, collapsed: bool = False, seed: int = 0, **summary: Any) -> Path:
    """A finished (tiny, untrained) purifier run: model.safetensors, best.safetensors and a
    summary.json as `comdefend train` writes them."""
    path.mkdir(parents=True)
    torch.manual_seed(seed)
    ComDefend(ComDefendConfig(image_channels=1, code_channels=2)).save(path / "model.safetensors")
    torch.manual_seed(seed + 1)
    ComDefend(ComDefendConfig(image_channels=1, code_channels=2)).save(path / "best.safetensors")
    values = {
        "config": {"dataset": "fashion-mnist", "eval_images": 16, "seed": seed},
        "iterations": 6,
        "heldout": {"psnr_db": 11.0 if collapsed else 20.0, "bit_density": 0.5},
        "best": {"iteration": 4, "psnr_db": 25.0},
        "collapsed": collapsed,
        "env": {"torch": torch.__version__},
        **summary,
    }
    (path / "summary.json").write_text(json.dumps(values), encoding="utf-8")
    return path


def test_zoo_register_into_a_temporary_registry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_folder = _run_folder(tmp_path / "runs" / "a")
    registry = tmp_path / "myzoo" / "registry.json"
    common = ["--command", "comdefend train ...", "--hardware", "test", "--registry", str(registry)]
    code, out, err = run(
        capsys, "zoo", "register", "tiny", "--weights", str(run_folder), "--no-measure",
        "--intended-use", "testing", *common,
    )  # fmt: skip
    assert code == 0, err
    entry = json.loads(out)
    shipped = registry.parent / "weights" / "tiny.safetensors"
    assert entry["sha256"] == sha256_of(shipped) == sha256_of(run_folder / "model.safetensors")
    assert json.loads(registry.read_text(encoding="utf-8"))["format"] == zoo.REGISTRY_FORMAT
    loaded = zoo.get_entry("tiny", registry)
    assert loaded.path == shipped and loaded.card.intended_use == "testing"
    assert (loaded.card.image_size, loaded.card.mode) == (28, "full")
    assert loaded.metrics["heldout_psnr_db"] == 20.0 and loaded.iterations == 6
    assert "tiny" not in zoo.list_pretrained()  # the package's zoo is untouched
    assert zoo.pretrained_path("tiny", registry=registry) == shipped

    code, out, _ = run(capsys, "zoo", "list", "--registry", str(registry), "--verify")
    assert code == 0 and out.splitlines()[1].startswith("tiny ") and out.rstrip().endswith("—")
    code, out, _ = run(capsys, "zoo", "show", "tiny", "--registry", str(registry))
    assert f"robust accuracy: {NOT_MEASURED}" in out and "--classifier CLASSIFIER" in out

    # The same name again needs --replace; the same weights keep their card's measurements.
    assert_one_error_line(
        run(capsys, "zoo", "register", "tiny", "--weights", str(run_folder), *common),
        "already in",
    )
    code, _, err = run(
        capsys, "zoo", "register", "tiny", "--weights", str(run_folder / "best.safetensors"),
        "--replace", "--no-measure", *common,
    )  # fmt: skip
    assert code == 0, err
    replaced = zoo.get_entry("tiny", registry)
    assert replaced.sha256 == sha256_of(run_folder / "best.safetensors")
    assert zoo.list_pretrained(registry=registry) == ["tiny"]


def test_zoo_register_a_classifier_measures_it_on_the_sample(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from comdefend.models.classifiers import build_classifier, save_classifier

    run_folder = tmp_path / "classifier-run"
    run_folder.mkdir()
    torch.manual_seed(0)
    save_classifier(build_classifier("fashion-cnn").eval(), run_folder / "model.safetensors")
    summary = {
        "config": {"dataset": "fashion-mnist", "arch": "fashion-cnn", "seed": 0},
        "iterations": 3,
        "test_accuracy": 0.1,
    }
    (run_folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    registry = tmp_path / "zoo"  # a folder: its registry.json is made
    code, _, err = run(
        capsys, "zoo", "register", "c", "--weights", str(run_folder / "model.safetensors"),
        "--command", "c", "--hardware", "h", "--registry", str(registry),
    )  # fmt: skip
    assert code == 0, err
    assert (registry / "registry.json").is_file()
    assert (registry / "weights" / "c.safetensors").is_file()
    entry = zoo.get_entry("c", registry)
    assert (entry.kind, entry.architecture, entry.card.mode, entry.card.image_size) == (
        "classifier",
        "fashion-cnn",
        None,
        28,
    )
    assert entry.metrics["test_accuracy"] == 0.1 and entry.metrics["sample_images"] == 500
    assert entry.metrics == {**entry.metrics, **zoo.measure_on_sample("c", registry)}


def test_zoo_register_refuses_a_collapsed_runs_final_weights(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run_folder = _run_folder(tmp_path / "run", collapsed=True)
    registry = tmp_path / "zoo" / "registry.json"
    common = ["--command", "c", "--hardware", "h", "--registry", str(registry), "--no-measure"]
    assert_one_error_line(
        run(capsys, "zoo", "register", "x", "--weights", str(run_folder), *common),
        "collapsed (final held-out PSNR 11.00 dB, best 25.00 dB at iteration 4)",
    )
    assert not registry.exists()
    code, _, err = run(
        capsys, "zoo", "register", "x", "--weights", str(run_folder), "--if-collapsed", "best",
        "--notes", "n", *common,
    )  # fmt: skip
    assert code == 0 and "registering best.safetensors" in err
    entry = zoo.get_entry("x", registry)
    assert entry.sha256 == sha256_of(run_folder / "best.safetensors")
    assert entry.notes.startswith("n; the run collapsed")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad/name", "--weights", "W"], "zoo name 'bad/name'"),
        (["ok", "--weights", "W", "--if-collapsed", "maybe"], "--if-collapsed must be"),
        (["ok", "--weights", "no/such/run"], "no such file or folder"),
        (["ok", "--weights", "EMPTY"], "summary.json not found"),
    ],
)
def test_bad_register_arguments_are_one_line_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    run_folder = _run_folder(tmp_path / "run")
    empty = tmp_path / "empty"  # weights, but no summary.json: not a finished run
    empty.mkdir()
    shutil.copyfile(run_folder / "model.safetensors", empty / "model.safetensors")
    args = [str(run_folder) if a == "W" else str(empty) if a == "EMPTY" else a for a in args]
    registry = tmp_path / "zoo" / "registry.json"
    result = run(
        capsys, "zoo", "register", *args, "--command", "c", "--hardware", "h",
        "--registry", str(registry),
    )  # fmt: skip
    assert_one_error_line(result, message)
    assert not registry.exists()


def test_register_keeps_old_entries_of_a_format_1_registry(tmp_path: Path) -> None:
    registry = tmp_path / "registry.json"
    old = json.loads(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))["entries"]
    for entry in old:
        entry.pop("card")
    registry.write_text(json.dumps(old), encoding="utf-8")  # format 1: a bare list
    assert zoo.list_pretrained(registry=registry) == ENTRIES
    assert zoo.get_entry("comdefend-cifar10", registry).card.measurements == ()
    run_folder = _run_folder(tmp_path / "run")
    register_weights(
        "new", run_folder, command="c", hardware="h", registry=registry, measure=False,
        echo=lambda line: None,
    )  # fmt: skip
    assert zoo.list_pretrained(registry=registry) == [*ENTRIES, "new"]
    for name in ENTRIES:
        assert zoo.get_entry(name, registry).sha256 == zoo.get_entry(name).sha256


def test_the_shipped_registry_is_versioned_and_its_weights_stay(tmp_path: Path) -> None:
    data = json.loads(zoo.REGISTRY_FILE.read_text(encoding="utf-8"))
    assert data["format"] == zoo.REGISTRY_FORMAT
    assert [e["name"] for e in data["entries"]] == ENTRIES
    copy = tmp_path / "registry.json"
    shutil.copyfile(zoo.REGISTRY_FILE, copy)
    for name in ENTRIES:  # entries read from a copy elsewhere equal the shipped ones
        assert zoo.get_entry(name, copy) == zoo.get_entry(name)
