"""Carry a residual study that is still running from one machine to the next, without its
fooling set: ``save`` copies what the next machine needs to continue, ``restore`` puts it back.

    python scripts/carry_study.py save runs/residual-study-imagenet studies/residual-study-imagenet
    python scripts/carry_study.py restore studies/residual-study-imagenet \
        runs/residual-study-imagenet

What travels: every points file, every run's log, summary and best weights, the training
checkpoint of each unfinished run, and the snapshots that have no point yet. What stays: the
fooling set (ImageNet-derived images may not be copied; the next machine makes it again, and the
points files refuse it unless it is identical, by sha256), the measured snapshots and the final
weights of finished runs (the last snapshot is measured; ``comdefend residual-study`` needs only
their summary to know they are finished).

Stop both stages first (Ctrl-C or SIGTERM: training keeps a checkpoint, measuring every point).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Collection
from pathlib import Path

from comdefend.evaluation.residual_study import POINTS_FOLDER, RUNS_FOLDER
from comdefend.evaluation.snapshots import list_snapshots

RUN_FILES = ("log.jsonl", "summary.json", "best.safetensors")


def measured(study: Path, run: str) -> dict[int, str]:
    """Iteration -> snapshot sha256 of the measured points of ``run``."""
    path = study / POINTS_FOLDER / f"{run}.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {p["iteration"]: p["snapshot_sha256"] for p in data["points"]}


def save(study: Path, dest: Path, snapshots: bool | Collection[int] = True) -> list[str]:
    """Copy what continues the study into ``dest`` (replaced); returns the copied paths.
    ``snapshots=False`` leaves the unmeasured snapshots behind (training is deterministic, so
    retraining the run from the start with its seed makes them again, bit for bit, on a CPU of
    the same kernels); a collection of iterations keeps only the unmeasured snapshots at
    those iterations."""
    from comdefend.checkpoint import sha256_of

    if dest.exists():
        shutil.rmtree(dest)
    copied = []

    def copy(source: Path) -> None:
        target = dest / source.relative_to(study)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        copied.append(str(source.relative_to(study)))

    for path in sorted((study / POINTS_FOLDER).glob("*.json")):
        copy(path)
    for run in sorted(p for p in (study / RUNS_FOLDER).iterdir() if p.is_dir()):
        for name in RUN_FILES:
            if (run / name).is_file():
                copy(run / name)
        if not (run / "summary.json").is_file() and (run / "checkpoint.safetensors").is_file():
            copy(run / "checkpoint.safetensors")
        points = measured(study, run.name)
        for iteration, path in list_snapshots(run) if snapshots else []:
            wanted = snapshots is True or (snapshots is not False and iteration in snapshots)
            if wanted and points.get(iteration) != sha256_of(path):
                copy(path)
    return copied


def restore(saved: Path, study: Path) -> list[str]:
    """Put a saved study back (files already there are overwritten, others kept)."""
    restored = []
    for source in sorted(p for p in saved.rglob("*") if p.is_file()):
        target = study / source.relative_to(saved)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
        restored.append(str(source.relative_to(saved)))
    return restored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("save", "restore"))
    parser.add_argument("source", type=Path)
    parser.add_argument("dest", type=Path)
    parser.add_argument(
        "--no-snapshots", action="store_true",
        help="save: leave the unmeasured snapshots (retraining from the start remakes them)",
    )  # fmt: skip
    parser.add_argument(
        "--snapshots-at", default=None, metavar="ITERATIONS",
        help="save: of the unmeasured snapshots keep only those at these iterations "
        "(comma-separated), e.g. of runs that cannot be retrained on the next machine's kernels",
    )  # fmt: skip
    args = parser.parse_args()
    keep: bool | set[int] = not args.no_snapshots
    if args.snapshots_at is not None:
        try:
            keep = {int(item) for item in args.snapshots_at.split(",")}
        except ValueError:
            raise SystemExit(
                f"error: --snapshots-at takes comma-separated iterations, got {args.snapshots_at!r}"
            ) from None
        if args.no_snapshots:
            raise SystemExit("error: --snapshots-at and --no-snapshots exclude each other")
    if not args.source.is_dir():
        raise SystemExit(f"error: {args.source} is not a folder")
    done = (
        save(args.source, args.dest, snapshots=keep)
        if args.action == "save"
        else restore(args.source, args.dest)
    )
    size = sum((args.dest / name).stat().st_size for name in done)
    print(f"{args.action}d {len(done)} files ({size / 1e6:.1f} MB) into {args.dest}")


if __name__ == "__main__":
    main()
