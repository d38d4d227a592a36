"""One command line (issue 24): every command's ``--help`` and the options they share.

The walk enumerates the typer app's commands, sub-apps (``zoo``) included, so a new command is
checked without being listed here: an image count is ``--images``/``-n``, ``--device`` defaults
to ``auto`` and comes with ``--threads``, lists of names in help texts come from the registries,
flags show no ``<bool>``. The usage checks run ``comdefend.cli.main`` in this process and stop
before any model or dataset is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer

from comdefend.attacks import ATTACKS
from comdefend.cli import app
from comdefend.commands.options import warn_small_eps
from comdefend.data.datasets import DATASETS
from comdefend.defenses.spec import COMDEFEND_OPTIONS, DEFENSES
from comdefend.models.presets import PRESETS
from support import run_cli as run

#: Parameter names that count images (a command taking one of these must spell it --images).
IMAGE_COUNTS = {"n", "images", "eval_images"}
#: Commands whose image count is held-out images during training, a separate setting.
TRAINING_HELD_OUT = {"train", "train-classifier", "residual-study"}


def _commands() -> Iterator[tuple[str, object]]:
    """(``"zoo list"``, click command) for every command of the app, sub-apps included."""
    root = typer.main.get_command(app)

    def walk(group: object, prefix: str) -> Iterator[tuple[str, object]]:
        for name, command in sorted(group.commands.items()):  # type: ignore[attr-defined]
            path = f"{prefix} {name}".strip()
            if hasattr(command, "commands"):
                yield from walk(command, path)
            else:
                yield path, command

    yield from walk(root, "")


COMMANDS = dict(_commands())


def _options(command: object) -> list[typer.core.TyperOption]:
    return [p for p in command.params if isinstance(p, typer.core.TyperOption)]  # type: ignore[attr-defined]


def _help_text(command: object) -> str:
    """The command's docstring and every option's help, whitespace collapsed."""
    parts = [command.help or ""]  # type: ignore[attr-defined]
    parts += [option.help or "" for option in _options(command)]
    return " ".join(" ".join(parts).split())


def test_the_walk_finds_every_command() -> None:
    for name in ("evaluate", "purify", "reconstruct", "test-classifier", "residual-study"):
        assert name in COMMANDS
    assert "zoo list" in COMMANDS and "zoo show" in COMMANDS


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_shares_the_options(name: str) -> None:
    command = COMMANDS[name]
    for option in _options(command):
        if option.name == "device":
            assert option.default == "auto", f"{name} --device defaults to {option.default}"
            assert "threads" in {o.name for o in _options(command)}, f"{name} lacks --threads"
        if option.name in IMAGE_COUNTS and not (
            name in TRAINING_HELD_OUT and option.name == "eval_images"
        ):
            assert "--images" in option.opts and "-n" in option.opts, (name, option.opts)
        assert "--n" not in option.opts or "--images" in option.opts, (name, option.opts)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_renders_without_bool_placeholders(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code, out, err = run(capsys, *name.split(), "--help")
    assert code == 0, err
    assert "Usage" in out
    assert "<bool>" not in out


#: The registries' names when the command line was built (collected before any test runs:
#: other tests register their own attacks later, which the already-built help cannot show).
BUILT_IN = {id(registry): registry.names() for registry in (ATTACKS, DATASETS, DEFENSES, PRESETS)}


def test_help_lists_come_from_the_registries() -> None:
    evaluate = _help_text(COMMANDS["evaluate"])
    for registry in (ATTACKS, DATASETS, DEFENSES):
        for item in BUILT_IN[id(registry)]:
            assert item in evaluate, f"evaluate --help lacks {item}"
    for option in COMDEFEND_OPTIONS:
        assert f"@{option}=" in evaluate
    assert "jpeg:75" in evaluate
    for command in ("train", "residual-study"):
        text = _help_text(COMMANDS[command])
        for item in BUILT_IN[id(PRESETS)]:
            assert item in text, f"{command} --help lacks preset {item}"
    for command in ("train", "train-classifier", "test-classifier", "reconstruct"):
        text = _help_text(COMMANDS[command])
        for item in BUILT_IN[id(DATASETS)]:
            assert item in text, f"{command} --help lacks dataset {item}"
    assert "--split sample" in _help_text(COMMANDS["test-classifier"])


def test_rendered_evaluate_help_keeps_the_comdefend_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = run(capsys, "evaluate", "--help")
    flat = "".join(out.split())
    for name in ("imagenet", "apgd-ce", "apgd-dlr", "@noise=", "@precision="):
        assert name in flat


def test_a_registered_name_appears_in_help_without_editing_it() -> None:
    from comdefend.commands.options import names_of

    assert names_of("attacks") == ", ".join(ATTACKS.names())
    assert names_of("presets") == ", ".join(PRESETS.names())


def test_eps_below_one_warns(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "evaluate", "--dataset", "cifar10", "-c", "no-such-model", "--eps", "0.031",
        "--json",
    )  # fmt: skip
    assert code == 2
    assert "warning: --eps 0.031 means 0.031/255" in err
    assert "did you mean --eps 8" in err
    warn_small_eps([2.0, 8.0, 0.0])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--attack", "pgd", "--attack-param", "pgd.stepz=3"], "pgd does not take stepz"),
        (["--attack", "pgd", "--attack-param", "pgd.steps=0"], "steps"),
        (["--attack", "fgsm", "--attack-param", "pgd.steps=3"], "not evaluated"),
        (["--attack", "fgsm", "--attack-param", "nosuch.steps=3"], "unknown attack"),
    ],
)
def test_attack_params_are_checked_before_any_work(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # the classifier does not exist: the attack parameters are refused before it is looked up
    code, _, err = run(capsys, "evaluate", "--dataset", "cifar10", "-c", "x.pt", "--json", *args)
    assert code == 2, err
    assert message in err


@pytest.mark.parametrize(
    "args",
    [
        ["test-classifier", "-c", "no-such-model"],
        ["evaluate", "--dataset", "cifar10", "-c", "no-such-model", "--json"],
        ["reconstruct", "-m", "no-such-model"],
        ["zoo", "show", "no-such-model"],
    ],
)
def test_an_unknown_zoo_name_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert "no-such-model" in err


def test_old_spellings_still_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for args in (
        ["evaluate", "--dataset", "cifar10", "--json"],
        ["residual-study", "-o", str(tmp_path / "study")],
        ["test-classifier"],
    ):
        code, _, err = run(capsys, *args, "-c", "no-such-model", "--n", "5")
        assert "No such option" not in err and code == 2, err
        assert "no zoo model of that name" in err


def test_the_classifier_table_is_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    from comdefend.models.classifiers import list_classifiers

    code, out, _ = run(capsys, "classifiers")
    assert code == 0
    lines = out.splitlines()
    rows = list_classifiers()
    assert len(lines) == len(rows) + 1
    starts = {line.index(str(row["dataset"])) for line, row in zip(lines[1:], rows, strict=True)}
    assert starts == {lines[0].index("dataset")}
