"""README: its Python examples run as written, its commands are the ones CI runs, and its tables
list exactly the package's commands and zoo models."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

#: The two command lines the project promises, verbatim.
QUICK_START = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e "
    '".[report]" && comdefend demo --out reports/demo'
)
TEST_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0 && pip install "
    '-q -e ".[dev]" && ruff check src tests && mypy && python -m pytest -q'
)


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _table(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table after ``## heading``, header excluded."""
    section = _text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_readme_is_short() -> None:
    assert len(_text().splitlines()) <= 150


def test_python_examples_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", _text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    x, x_adv = namespace["x"], namespace["x_adv"]
    assert namespace["purified"].shape == x.shape
    assert x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert 0.0 <= float(namespace["robust_accuracy"]) <= 1.0


def test_readme_commands_match_ci() -> None:
    """README shows the quick start and the test command verbatim, and CI runs exactly that test
    command, whose steps are joined by ``&&`` so that a failing linter or test fails CI."""
    text = _text()
    assert QUICK_START in text
    block = re.search(r"Tests \(this is what `\.ci/run` runs.*?```bash\n(.*?)\n```", text, re.S)
    assert block, "README has no test command"
    assert block.group(1).strip() == TEST_COMMAND
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    lines = [line.strip() for line in ci.splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert TEST_COMMAND in commands, ".ci/run does not run README's test command"
    steps = [step.strip() for step in TEST_COMMAND.split("&&")]
    assert "ruff check src tests" in steps
    assert "mypy" in steps  # [tool.mypy] in pyproject.toml says what it checks
    assert steps[-1] == "python -m pytest -q"
    assert "set -euo pipefail" in ci
    # the documentation site is built after the tests, by the same script
    assert commands.index(TEST_COMMAND) < next(
        i for i, line in enumerate(commands) if "mkdocs build --strict" in line
    )


def test_results_marker_pair() -> None:
    """The generated "results at a glance" table goes between these markers."""
    text = _text()
    start, end = "<!-- results-at-a-glance:start -->", "<!-- results-at-a-glance:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    between = text.split(start)[1].split(end)[0]
    assert "docs/results/README.md" in between


def test_command_table_lists_every_command() -> None:
    import typer.main

    from comdefend.cli import app

    root = typer.main.get_command(app)
    commands = {name for name, command in root.commands.items() if not command.hidden}
    listed = {row[0].strip("`").removeprefix("comdefend ") for row in _table("Command line")}
    assert listed == commands


def test_zoo_table_lists_every_model() -> None:
    from comdefend import list_pretrained

    listed = {row[0].strip("`") for row in _table("Pretrained models")}
    assert listed == set(list_pretrained())


def test_links_point_to_files() -> None:
    """Relative links lead to files of the repository (the generated results pages may be
    missing before they are first generated: the documentation site stands in for them)."""
    generated = {"docs/results/README.md", "docs/results/residual-study-imagenet/README.md"}
    for target in re.findall(r"\]\(([^)#\s]+)", _text()):
        if "://" in target or target in generated:
            continue
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_contributing_and_citation() -> None:
    """CONTRIBUTING shows the same test command as README and CI; CITATION.cff cites the package
    and the ComDefend paper, and the documentation's citation page gives both in BibTeX."""
    contributing = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    assert TEST_COMMAND in contributing
    assert "mkdocs build --strict" in contributing
    for target in re.findall(r"\]\(([^)#\s]+)", contributing):
        assert "://" in target or (ROOT / target).exists(), f"CONTRIBUTING links to {target}"
    assert "(CONTRIBUTING.md)" in _text()

    cff = (ROOT / "CITATION.cff").read_text(encoding="utf-8")
    assert re.search(r"^type: software$", cff, re.M)
    assert re.search(r"^title: .*comdefend", cff, re.M)
    assert "ComDefend: An Efficient Image Compression Model to Defend Adversarial Examples" in cff
    assert "arXiv:1811.12673" in cff
    citation = (ROOT / "docs" / "citation.md").read_text(encoding="utf-8")
    assert "@software{comdefend" in citation and "@inproceedings{jia2019comdefend" in citation
