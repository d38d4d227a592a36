"""Publish a finished evaluation into ``docs/results/<name>/``: its data, the report made from
it, and its provenance (no number typed by hand).

    python scripts/publish_results.py runs/imagenet-1000 imagenet-1000 \
        --command-file runs/imagenet-1000.sh --notes "The first 1,000 ..."

Copies ``results.json`` with the checkout's absolute path removed from every string (a
published result names files as the command did, relative to the repository), copies the
accuracy chart, renders ``report.md`` from the data, and writes ``provenance.json``: the
command, the hardware (from the machines ``results.json`` records, or ``--hardware``), the wall
time (from its ``elapsed_s``, or ``--wall-time``), the date and the notes. Then run
``python scripts/results_page.py`` and ``comdefend zoo card --all --results ...`` to bring the
results page, the README's table and the model cards up to date.

A folder without ``results.json`` (a run still in progress) is refused, and so is an existing
publication unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from comdefend.console import duration
from comdefend.evaluation.report import machines, render_markdown

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "docs" / "results"


def strip_paths(value: Any, root: str) -> Any:
    """``value`` with ``root`` + "/" removed from every string in it.

    Example:
        >>> strip_paths({"a": ["/x/repo/runs/m.safetensors", 3]}, "/x/repo")
        {'a': ['runs/m.safetensors', 3]}
    """
    if isinstance(value, str):
        return value.replace(root.rstrip("/") + "/", "")
    if isinstance(value, list):
        return [strip_paths(v, root) for v in value]
    if isinstance(value, dict):
        return {strip_paths(k, root): strip_paths(v, root) for k, v in value.items()}
    return value


def wall_time(elapsed_s: float, resumed: bool) -> str:
    """The wall time line of a run from its ``elapsed_s``.

    Example:
        >>> wall_time(3097.4, False), wall_time(16638, True)
        ('52 min (elapsed_s 3,097; one run, no resume)', '4 h 37 min (elapsed_s 16,638, summed over the run and its resumes)')
    """  # noqa: E501
    spent = duration(elapsed_s)
    how = "summed over the run and its resumes" if resumed else "one run, no resume"
    separator = ", " if resumed else "; "
    return f"{spent} (elapsed_s {round(elapsed_s):,}{separator}{how})"


def hardware(results: dict[str, Any]) -> str:
    """The machines and processes of a run, from what ``results.json`` records."""
    environments = results.get("environments") or [results.get("environment") or {}]
    processes = int(results.get("processes") or 1)
    runs = f"{processes} torchrun processes" if processes > 1 else "one process"
    return f"{machines(environments)}, {runs}"


def publish(
    run: Path,
    name: str,
    command: str,
    notes: str = "",
    hardware_text: str | None = None,
    wall_time_text: str | None = None,
    date: str | None = None,
    force: bool = False,
    root: Path = RESULTS,
) -> Path:
    """Write ``root/name`` from the finished run folder ``run``; returns the folder."""
    source = run / "results.json"
    if not source.is_file():
        state = " (still in progress: resume it first)" if any(run.glob("progress*")) else ""
        raise SystemExit(f"error: {run} has no results.json{state}")
    target = root / name
    if target.exists() and not force:
        raise SystemExit(f"error: {target} exists; --force replaces it")
    results = strip_paths(json.loads(source.read_text()), str(REPO))
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if (run / "accuracy.png").is_file():
        shutil.copyfile(run / "accuracy.png", target / "accuracy.png")
    (target / "report.md").write_text(render_markdown(results))
    provenance = {
        "command": command.strip(),
        "hardware": hardware_text or hardware(results),
        "wall_time": wall_time_text
        or wall_time(float(results["elapsed_s"]), bool(results.get("resumed_groups"))),
        "date": date or datetime.now(timezone.utc).date().isoformat(),
        "notes": notes.strip(),
    }
    (target / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the evaluation's --out folder")
    parser.add_argument("name", help="the name under docs/results/")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--command", help="the command that made it")
    given.add_argument("--command-file", type=Path, help="a file holding the command")
    parser.add_argument("--notes", default="", help="what a reader must know (text)")
    parser.add_argument("--hardware", help="instead of the machines results.json records")
    parser.add_argument("--wall-time", help="instead of the time results.json records")
    parser.add_argument("--date", help="the date of the run (default: today)")
    parser.add_argument("--force", action="store_true", help="replace an earlier publication")
    args = parser.parse_args(argv)
    command = args.command if args.command is not None else args.command_file.read_text()
    target = publish(
        args.run,
        args.name,
        command,
        args.notes,
        args.hardware,
        args.wall_time,
        args.date,
        args.force,
    )
    print(f"wrote {target}; now run python scripts/results_page.py", file=sys.stderr)


if __name__ == "__main__":
    main()
