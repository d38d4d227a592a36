"""MkDocs hook: the command-line reference, generated from the ``comdefend`` command itself.

At build time every command of the typer app (``comdefend.cli.app``), subcommands included,
is rendered into ``reference/cli.md``: its help text, its usage line and a table of its
arguments and options with their defaults, exactly what ``comdefend CMD --help`` prints. Nothing
in that page is typed by hand, so it cannot fall behind the code.

``render_cli_reference()`` returns the page's Markdown (the docs tests call it too).
"""

from __future__ import annotations

import html
import re
from typing import Any

PAGE = "reference/cli.md"

_INTRO = """# Command line

Every command of `comdefend`, generated from the command itself when this site is built (the
same text as `comdefend COMMAND --help`). `python -m comdefend` is the same command line.
Bad arguments exit with one `error: ...` line and a non-zero code; `--help` works everywhere.
"""


def _inline(text: str) -> str:
    """Help text as Markdown: reStructuredText's ``code`` becomes `code`, and characters that
    Markdown or a table would read as markup are escaped."""
    text = text.replace("\b\n", "").replace("\b", "")
    parts = re.split(r"(``.+?``|`[^`]+`)", text, flags=re.S)
    out = []
    for part in parts:
        if part.startswith("`"):
            out.append("`" + part.strip("`").replace("\n", " ") + "`")
        else:
            escaped = html.escape(part, quote=False)
            for markup in ("*", "|", "["):  # emphasis, a table cell's end, a link
                escaped = escaped.replace(markup, "\\" + markup)
            out.append(escaped)
    return "".join(out)


def _cell(text: str) -> str:
    return _inline(" ".join(text.split()))


def _paragraphs(text: str) -> str:
    blocks = [block.strip() for block in re.split(r"\n\s*\n", text.strip()) if block.strip()]
    return "\n\n".join(_inline(" ".join(block.split())) for block in blocks)


def _commands(group: Any, ctx: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """(full name, command, context) for ``group`` and every command below it, in help order."""
    found = [(prefix, group, ctx)]
    list_commands = getattr(group, "list_commands", None)
    if list_commands is None:
        return found
    for name in list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or getattr(command, "hidden", False):
            continue
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        found += _commands(command, sub, f"{prefix} {name}")
    return found


def _section(name: str, command: Any, ctx: Any, level: int) -> str:
    lines = [f"{'#' * level} `{name}`", ""]
    if command.help:
        lines += [_paragraphs(command.help), ""]
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines += ["```console", f"$ {name} {usage}".rstrip(), "```", ""]
    rows = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        names, description = record
        rows.append(f"| `{names}` | {_cell(description)} |")
    if rows:
        lines += ["| argument or option | meaning |", "|---|---|", *rows, ""]
    subcommands = getattr(command, "list_commands", None)
    if subcommands is not None:
        names = [n for n in subcommands(ctx) if not command.get_command(ctx, n).hidden]
        if names:
            lines += ["Commands: " + ", ".join(f"`{name} {n}`" for n in names) + ".", ""]
    return "\n".join(lines)


def render_cli_reference() -> str:
    """The Markdown of the command-line reference page."""
    import typer.main

    from comdefend.cli import app

    root = typer.main.get_command(app)
    ctx = root.make_context("comdefend", [], resilient_parsing=True)
    sections = [_INTRO]
    for name, command, sub in _commands(root, ctx, "comdefend"):
        level = 2 if name.count(" ") <= 1 else 3
        sections.append(_section(name, command, sub, level))
    return "\n".join(sections)


def on_files(files, config):  # noqa: ANN001 - MkDocs' own signature
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render_cli_reference()))
    return files
