"""The documentation: every Python block of its pages runs, every other block says it is not
run, the command-line reference is generated from the command itself, and the pages speak to
users.

A page's ``python`` blocks run in order in one namespace (a page reads as one script), in a
temporary folder. A block preceded by an ``<!-- not-run: why -->`` comment is skipped (it needs
a download, a GPU or minutes); blocks in other languages (``bash``, ``toml``, ``bibtex``, ...)
are never run.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: Languages whose blocks are executed.
RUN = {"python", "py"}
#: The dated lab notebook and the generated results pages keep their own conventions.
NOTEBOOK = {"RESULTS.md", "PERFORMANCE.md"}
NOTEBOOK_FOLDERS = ("results/", "notes/")

_FENCE = re.compile(
    r"(?P<marker><!--\s*not-run\b[^>]*-->\s*\n)?^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n"
    r"(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


def _guide(page: Path) -> bool:
    """A hand-written page of the site (not the lab notebook nor a generated results page)."""
    name = page.relative_to(DOCS).as_posix()
    return name not in NOTEBOOK and not name.startswith(NOTEBOOK_FOLDERS) and page.parent == DOCS


def _blocks(page: Path) -> list[tuple[int, str, str, bool]]:
    """(line, language, code, marked not-run) of every fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        found.append((line, match["lang"].strip().lower(), match["code"], bool(match["marker"])))
    return found


def _runnable(page: Path) -> list[tuple[int, str]]:
    return [(line, code) for line, lang, code, skip in _blocks(page) if lang in RUN and not skip]


PAGES_WITH_CODE = [p for p in _pages() if _runnable(p)]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_python_blocks_run(page: Path, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for line, code in _runnable(page):
        # padded so that a traceback's line numbers are the page's own
        source = "\n" * (line - 1) + code
        exec(compile(source, str(page), "exec"), namespace)  # noqa: S102


def test_pages_have_python_examples() -> None:
    names = {p.name for p in PAGES_WITH_CODE}
    for expected in ("your-classifier.md", "evaluation.md", "adaptive-evaluation.md"):
        assert expected in names


@pytest.mark.parametrize(
    "page", [p for p in _pages() if _guide(p)], ids=lambda p: p.relative_to(DOCS).as_posix()
)
def test_every_block_is_run_or_marked(page: Path) -> None:
    """A block without a language would be neither run nor visibly marked as not run."""
    for line, lang, _, _ in _blocks(page):
        assert lang, f"{page.name}:{line}: a code block needs a language (python runs)"


def _hook(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / "hooks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_every_command() -> None:
    import typer.main

    from comdefend.cli import app

    page = _hook("cli_reference").render_cli_reference()
    root = typer.main.get_command(app)
    ctx = root.make_context("comdefend", [], resilient_parsing=True)
    for name, command in root.commands.items():
        if command.hidden:
            continue
        assert f"## `comdefend {name}`" in page
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        for param in command.get_params(sub):
            record = param.get_help_record(sub)
            if record is not None and not getattr(param, "hidden", False):
                assert f"`{record[0]}`" in page, f"{name}: {record[0]} missing"
    assert "### `comdefend zoo list`" in page


def test_docstring_translation() -> None:
    pytest.importorskip("griffe")
    translate = _hook("griffe_docstrings").translate
    text = "Text.\n\n    Example:\n        >>> f()\n\nSee :class:`~comdefend.zoo.WeightsRef`."
    assert translate(text) == "Text.\n\n    Examples:\n        >>> f()\n\nSee `WeightsRef`."
    assert translate(":func:`comdefend.evaluation.evaluate`") == "`comdefend.evaluation.evaluate`"


#: What a user-facing page must not contain: private paths, work items, process talk.
PRIVATE = [
    r"\.\./shared",
    r"/tmp/",
    r"\bissue\s*#?\d",
    r"\bitems?\s+\d",
    r"\bsessions?\b",
    r"\bload average\b",
]


@pytest.mark.parametrize(
    "page",
    [p for p in _pages() if _guide(p)] + [ROOT / "README.md", ROOT / "CHANGELOG.md"],
    ids=lambda p: p.name,
)
def test_pages_speak_to_users(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for pattern in PRIVATE:
        match = re.search(pattern, text, re.I)
        assert match is None, f"{page.name}: {match.group(0)!r} does not belong in user docs"
