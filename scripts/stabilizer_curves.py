"""Training runs with and without a stabilizer side by side: a markdown table and a chart.

    cd docs/notes/zoo-trainings/runs-cpu
    python ../../../../scripts/stabilizer_curves.py comdefend-fashion-mnist.jsonl \
        comdefend-fashion-mnist-stabilized.jsonl --out stabilizers

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
from pathlib import Path

from comdefend.errors import UsageError
from comdefend.training.logs import TrainingLog, log_file, read_training_log

MARKS = (1000, 2500, 5000, 7500)  # default columns; --at chooses others


def table(runs: list[TrainingLog], at: tuple[int, ...] = MARKS) -> str:
    marks = " / ".join(f"{m:,}" for m in at)
    rows = [
        f"| run | dataset | stabilize | seed | lr | iterations | PSNR at {marks} (dB) | best (at) "
        "| last | collapsed at | rollbacks | largest code logit, last window "
        "| saturated output, last |",
        "|---|---|---|---:|---:|---:|---|---|---:|---:|---|---:|---:|",
    ]
    for run in runs:
        config, psnr = run.config, run.psnr
        stabilize = ", ".join(
            f"{k}={v:g}" if k not in ("amsgrad", "cosine-decay") else k
            for k, v in (config.get("stabilize") or {}).items()
            if not any(a.startswith(f"{k} from") for a in run.added_stabilizers)
        )
        stabilize = ", ".join(filter(None, [stabilize, *run.added_stabilizers]))
        values = " / ".join(f"{psnr[m]:.2f}" if m in psnr else "-" for m in at)
        best_at, last = run.best_iteration, run.last_evaluation
        collapse = run.collapsed_at()
        rollbacks = "; ".join(f"{a:,} to {b:,}" for a, b in run.rollbacks) or "-"
        logit = f"{run.code_logit[max(run.code_logit)]:.3g}" if run.code_logit else "-"
        sat = (
            f"{run.saturated_output[max(run.saturated_output)]:.2f}"
            if run.saturated_output
            else "-"
        )
        rows.append(
            f"| {run.name} | {config['dataset']} | {stabilize or 'none'} | {config['seed']} "
            f"| {config['lr']:g} | {run.last_iteration:,} | {values} "
            f"| {psnr[best_at]:.2f} ({best_at:,}) "
            f"| {psnr[last]:.2f} | {f'{collapse:,}' if collapse else 'no'} "
            f"| {rollbacks} | {logit} | {sat} |"
        )
    return "\n".join(rows)


def plot(runs: list[TrainingLog], path: Path) -> None:
    from comdefend.figures import panels, save_png

    figure, (top, bottom) = panels(2, width=9, height=3.5, rows=2, sharex=True)
    for run in runs:
        psnr = run.psnr
        line = top.plot(sorted(psnr), [psnr[i] for i in sorted(psnr)], label=run.name)[0]
        if run.code_logit:
            logits = run.code_logit
            bottom.plot(sorted(logits), [logits[i] for i in sorted(logits)], color=line.get_color())
    top.set_ylabel("held-out PSNR (dB)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylabel("largest |code logit| (batch)")
    bottom.set_xlabel("training iteration")
    bottom.grid(alpha=0.3)
    save_png(figure, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="write OUT.md and OUT.png")
    parser.add_argument("--at", default="1000,2500,5000,7500", help="iterations of the table")
    args = parser.parse_args()
    try:
        runs = [read_training_log(path) for path in args.logs]
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None
    names = [run.name for run in runs]
    for run, path in zip(runs, args.logs, strict=True):
        if names.count(run.name) > 1:  # the same file name in two folders: say which
            log = log_file(path)
            folder = log.parent.parent if log.name == "log.jsonl" else log.parent
            run.name = f"{folder.name}/{run.name}"
    text = table(runs, tuple(int(i) for i in args.at.split(",")))
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
        plot(runs, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
