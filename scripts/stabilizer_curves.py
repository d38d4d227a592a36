"""Training runs with and without a stabilizer side by side: a markdown table and a chart.

    python scripts/stabilizer_curves.py docs/runs-cpu/comdefend-fashion-mnist.jsonl \
        docs/runs-cpu/fashion-mnist-amsgrad.jsonl --out docs/stabilizers

Each input is a run's ``log.jsonl`` (or a run folder holding one; a file's name, without
``.jsonl``, names the run). The table gives, per run: dataset, stabilizers, seed, learning rate,
iterations reached, held-out PSNR at 1,000 / 2,500 / 5,000 / 7,500 iterations (``--at``), best
and last (after a rollback: the evaluations of the redone iterations), whether it collapsed (the
first evaluation the engine flagged, or one more than ``COLLAPSE_DB`` below the best so far in
older logs), its rollbacks and the
largest code logit and saturated-output fraction of its last logged window (logs written since
these were recorded). The chart (``OUT.png``) has held-out PSNR along training on top and the
largest code logit below.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from comdefend.errors import UsageError
from comdefend.training.trainer import COLLAPSE_DB

MARKS = (1000, 2500, 5000, 7500)  # default columns; --at chooses others


def read_run(path: Path) -> dict[str, Any]:
    log = path / "log.jsonl" if path.is_dir() else path
    if not log.is_file():
        raise UsageError(f"{path}: no training log found")
    config: dict[str, Any] | None = None
    psnr: dict[int, float] = {}
    logits: dict[int, float] = {}
    saturated: dict[int, float] = {}
    added: list[str] = []
    rollbacks: list[str] = []
    flagged: list[int] = []  # evaluations the engine flagged as a collapse
    last = 0
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("event") == "start" and config is None:
            config = record["config"]
        if record.get("event") == "resume" and config is not None and "stabilize" in record:
            before = config.get("stabilize") or {}
            for name in set(record["stabilize"]) - set(before):  # added at this resume
                added.append(f"{name} from {int(record['iteration']):,}")
            config = {**config, "stabilize": {**before, **record["stabilize"]}}
        iteration = int(record.get("iteration", 0))
        if "heldout_psnr_db" in record and record.get("event") is None:
            psnr[iteration] = float(record["heldout_psnr_db"])  # after a rollback: the redo
            if record.get("collapse"):
                flagged.append(iteration)
        if record.get("event") == "rollback":
            rollbacks.append(f"{iteration:,} to {int(record['to']):,}")
        if "max_abs_code_logit" in record:
            logits[iteration] = float(record["max_abs_code_logit"])
            saturated[iteration] = float(record["saturated_output"])
        if record.get("event") is None:
            last = max(last, iteration)
    if config is None or not psnr:
        raise UsageError(f"{log}: needs a start record and at least one held-out evaluation")
    name = log.parent.name if log.name == "log.jsonl" else log.stem
    return {
        "name": name,
        "config": config,
        "psnr": psnr,
        "logits": logits,
        "saturated": saturated,
        "last": last,
        "added": added,
        "rollbacks": rollbacks,
        "flagged": flagged,
    }


def collapsed_at(psnr: dict[int, float]) -> int | None:
    """The first evaluation more than COLLAPSE_DB below the best before it."""
    best = float("-inf")
    for iteration in sorted(psnr):
        if psnr[iteration] < best - COLLAPSE_DB:
            return iteration
        best = max(best, psnr[iteration])
    return None


def table(runs: list[dict[str, Any]], at: tuple[int, ...] = MARKS) -> str:
    marks = " / ".join(f"{m:,}" for m in at)
    rows = [
        f"| run | dataset | stabilize | seed | lr | iterations | PSNR at {marks} (dB) | best (at) "
        "| last | collapsed at | rollbacks | largest code logit, last window "
        "| saturated output, last |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for run in runs:
        config, psnr = run["config"], run["psnr"]
        stabilize = ", ".join(
            f"{k}={v:g}" if k not in ("amsgrad", "cosine-decay") else k
            for k, v in (config.get("stabilize") or {}).items()
            if not any(a.startswith(f"{k} from") for a in run["added"])
        )
        stabilize = ", ".join(filter(None, [stabilize, *run["added"]]))
        values = " / ".join(f"{psnr[m]:.2f}" if m in psnr else "-" for m in at)
        best_at = max(psnr, key=lambda i: psnr[i])
        last = max(psnr)
        collapse = run["flagged"][0] if run["flagged"] else collapsed_at(psnr)
        logit = f"{run['logits'][max(run['logits'])]:.3g}" if run["logits"] else "-"
        sat = f"{run['saturated'][max(run['saturated'])]:.2f}" if run["saturated"] else "-"
        rows.append(
            f"| {run['name']} | {config['dataset']} | {stabilize or 'none'} | {config['seed']} "
            f"| {config['lr']:g} | {run['last']:,} | {values} | {psnr[best_at]:.2f} ({best_at:,}) "
            f"| {psnr[last]:.2f} | {f'{collapse:,}' if collapse else 'no'} "
            f"| {'; '.join(run['rollbacks']) or '-'} | {logit} | {sat} |"
        )
    return "\n".join(rows)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for run in runs:
        psnr = run["psnr"]
        label = f"{run['name']}"
        line = top.plot(sorted(psnr), [psnr[i] for i in sorted(psnr)], label=label)[0]
        if run["logits"]:
            logits = run["logits"]
            bottom.plot(sorted(logits), [logits[i] for i in sorted(logits)], color=line.get_color())
    top.set_ylabel("held-out PSNR (dB)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylabel("largest |code logit| (batch)")
    bottom.set_xlabel("training iteration")
    bottom.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.png")
    parser.add_argument("--at", default="1000,2500,5000,7500", help="iterations of the table")
    args = parser.parse_args()
    runs = [read_run(path) for path in args.logs]
    names = [run["name"] for run in runs]
    for run, path in zip(runs, args.logs, strict=True):
        if names.count(run["name"]) > 1:  # the same file name in two folders: say which
            log = path / "log.jsonl" if path.is_dir() else path
            folder = log.parent.parent if log.name == "log.jsonl" else log.parent
            run["name"] = f"{folder.name}/{run['name']}"
    text = table(runs, tuple(int(i) for i in args.at.split(",")))
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
        plot(runs, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
