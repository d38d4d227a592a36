"""The documentation: every Python block of its pages runs, every other block says it is not
run, every ``comdefend`` command it shows exists with the options it uses, the command-line
reference is generated from the command itself, and every page speaks to users.

A page's ``python`` blocks run in order in one namespace (a page reads as one script), in a
temporary folder. A block preceded by an ``<!-- not-run: why -->`` comment is skipped (it needs
a download, a GPU or minutes); blocks in other languages (``bash``, ``toml``, ``bibtex``, ...)
are never run.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from support import load_module

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

#: Languages whose blocks are executed.
RUN = {"python", "py"}
#: Pages written by scripts from data files (the results pages, the tables beside the notes):
#: their code blocks and commands are the scripts' business, their language is checked.
GENERATED_FOLDERS = ("results/",)
#: The project's files beside the site that users read.
ROOT_PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "CONTRIBUTING.md"]

_FENCE = re.compile(
    r"(?P<marker><!--\s*not-run\b[^>]*-->\s*\n)?^(?P<indent>[ \t]*)```(?P<lang>[^\n`]*)\n"
    r"(?P<code>.*?)^(?P=indent)```[ \t]*$",
    re.M | re.S,
)


def _excluded() -> list[str]:
    """mkdocs.yml's ``exclude_docs`` patterns (gitignore style; only the forms used there)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    block = re.search(r"^exclude_docs:\s*\|\n((?:[ \t]+\S.*\n)+)", text, re.M)
    return [line.strip() for line in block.group(1).splitlines()] if block else []


def _in_site(name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/") and (name + "/").startswith(pattern.lstrip("/")):
            return False
        if fnmatch.fnmatch(name, pattern.lstrip("/")):
            return False
    return True


def _pages() -> list[Path]:
    """Every page of the site: the Markdown files under docs/ that mkdocs does not exclude."""
    patterns = _excluded()
    return sorted(
        p for p in DOCS.rglob("*.md") if _in_site(p.relative_to(DOCS).as_posix(), patterns)
    )


def _guide(page: Path) -> bool:
    """A hand-written page: a guide in docs/ or a note in docs/notes/ (not a generated page nor
    a data table beside a note)."""
    return page.parent in (DOCS, DOCS / "notes")


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
    return load_module(DOCS / "hooks" / f"{name}.py")


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


#: What a user-facing page must not contain: private paths, work items, process talk, machine
#: load, commit hashes.
PRIVATE = [
    r"\.\./shared",
    r"/tmp/",
    r"/work/",
    r"\bissue\s*#?\d",
    r"\bitems?\s+\d",
    r"\bwork items?\b",
    r"\bsessions?\b",
    r"\bload average\b",
    r"\bother jobs\b",
    r"\bdevelopers' tests\b",
    r"\b(?:commit|main at|checked out at)\s+[0-9a-f]{7,40}\b",
]

#: Generated pages that still break a rule, with the script that must change: the check runs
#: (and is expected to fail) until the script is fixed and the page regenerated.
KNOWN_GENERATED: dict[str, str] = {}


def _user_pages() -> list:
    params = []
    for page in _pages():
        name = page.relative_to(DOCS).as_posix()
        marks = [pytest.mark.xfail(reason=KNOWN_GENERATED[name])] if name in KNOWN_GENERATED else []
        params.append(pytest.param(page, id=name, marks=marks))
    return params + [pytest.param(page, id=page.name) for page in ROOT_PAGES]


def test_every_page_is_checked() -> None:
    """The language check covers the guides, the notes, the generated pages and the data tables
    beside the notes: every page the site builds."""
    names = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert {"index.md", "PERFORMANCE.md", "notes/index.md", "results/README.md"} <= names
    assert any(name.startswith("notes/") and name.count("/") == 2 for name in names)
    assert "results/fashion-test-10000/report.md" not in names  # excluded from the site


@pytest.mark.parametrize("page", _user_pages())
def test_pages_speak_to_users(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for pattern in PRIVATE:
        match = re.search(pattern, text, re.I)
        assert match is None, f"{page.name}: {match.group(0)!r} does not belong in user docs"


def test_private_patterns_catch_lab_talk() -> None:
    """The patterns above catch what a lab notebook says and a user page must not."""
    lab = [
        "copied from ../shared/data/cifar10",
        "run with main at bd66436",
        "measured in the previous session",
        "issue 12, item 1",
        "load average 18-23 while other jobs ran",
        "--out /tmp/imn/rs",
    ]
    for line in lab:
        assert any(re.search(pattern, line, re.I) for pattern in PRIVATE), line
    user = "PGD at 8/255 keeps 6.0% of 200 images; sha256 f999bdd0; iteration 7,500 of 7,500"
    assert not any(re.search(pattern, user, re.I) for pattern in PRIVATE)


def test_notes_are_in_the_navigation_and_the_index() -> None:
    """Every note is reachable: from the site's navigation and from the notes' index."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:", 1)[1]
    index = (DOCS / "notes" / "index.md").read_text(encoding="utf-8")
    notes = sorted((DOCS / "notes").glob("*.md"))
    assert len(notes) > 5
    for note in notes:
        assert f"notes/{note.name}" in nav, f"{note.name} is not in mkdocs.yml's nav"
        if note.name != "index.md":
            assert f"({note.name})" in index, f"notes/index.md does not link {note.name}"


# ---------------------------------------------------------------------------------------------
# Every `comdefend` command the docs show exists, with the options it uses.

#: A command line in a shell block (continuations joined) or an inline code span.
_INLINE = re.compile(r"`(comdefend [^`]+)`")
_OPTION = re.compile(r"^(--?[A-Za-z][\w-]*)")


def _shell_lines(text: str) -> list[tuple[int, str]]:
    """(line, command) of every line of the page's bash blocks, continuations joined."""
    found = []
    for match in _FENCE.finditer(text):
        if match["lang"].strip().lower() not in {"bash", "sh", "shell", "console"}:
            continue
        first = text.count("\n", 0, match.start("code")) + 1
        joined, start = "", first
        for offset, line in enumerate(match["code"].splitlines()):
            if not joined:
                start = first + offset
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            found.append((start, joined + line))
            joined = ""
    for match in _INLINE.finditer(text):
        found.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return found


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose
        return line.split()


def _invocations(line: str) -> list[list[str]]:
    """The argument lists that follow each ``comdefend`` (or ``-m comdefend``) in ``line``, up
    to the end of that command (``&&``, ``|``, ``;``)."""
    tokens, found = _tokens(line), []
    for i, token in enumerate(tokens):
        if token != "comdefend":
            continue
        args = []
        for arg in tokens[i + 1 :]:
            if arg in {"&&", "||", "|", ";"}:
                break
            args.append(arg)
        found.append(args)
    return found


def _command_pages() -> list[Path]:
    return [p for p in _pages() if _guide(p)] + [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]


def _check_invocation(root, args: list[str]) -> str | None:  # noqa: ANN001 - a click group
    """What is wrong with ``comdefend ARGS`` (None when the command and options exist)."""
    command, path = root, "comdefend"
    for arg in args:
        # a group (typer's own click) has subcommands; a leaf command takes options
        if hasattr(command, "commands") and not arg.startswith("-"):
            if arg.isupper() or arg.startswith(("...", "<")):  # a placeholder: COMMAND, CMD
                return None
            sub = command.commands.get(arg)
            if sub is None:
                return f"{path} has no command {arg!r}"
            command, path = sub, f"{path} {arg}"
            continue
        match = _OPTION.match(arg)
        if match is None:
            continue  # a value, an argument or a placeholder such as ...same settings...
        option = match.group(1)
        known = {"--help"}
        for param in command.params:
            known.update(getattr(param, "opts", []))
            known.update(getattr(param, "secondary_opts", []))
        if option not in known:
            return f"{path} has no option {option}"
    return None


@pytest.mark.parametrize(
    "page",
    _command_pages(),
    ids=lambda p: p.relative_to(DOCS).as_posix() if DOCS in p.parents else p.name,
)
def test_commands_match_the_command_line(page: Path) -> None:
    """A command shown in the docs runs as written: its subcommand exists and every option it
    passes is one that ``comdefend SUBCOMMAND --help`` lists (a renamed or removed option or
    command fails here, not in a user's terminal)."""
    import typer.main

    from comdefend.cli import app

    root = typer.main.get_command(app)
    problems = []
    for line, command in _shell_lines(page.read_text(encoding="utf-8")):
        for args in _invocations(command):
            problem = _check_invocation(root, args)
            if problem:
                problems.append(f"{page.name}:{line}: {problem}")
    assert not problems, "\n".join(problems)


def test_command_check_catches_stale_examples() -> None:
    import typer.main

    from comdefend.cli import app

    root = typer.main.get_command(app)
    assert _check_invocation(root, ["seed-experiment", "--n", "10"]) is not None
    assert _check_invocation(root, ["evaluate", "--no-such-option"]) is not None
    assert _check_invocation(root, ["zoo", "list", "--json"]) is None
    assert _check_invocation(root, ["--quiet", "CMD", "..."]) is None
    line = "torchrun --nproc-per-node 2 -m comdefend evaluate --eps 8 && comdefend demo -o x"
    assert _invocations(line) == [["evaluate", "--eps", "8"], ["demo", "-o", "x"]]
