"""Compare ComDefend presets from their training logs: a markdown table and a PSNR-curve chart.

    python scripts/preset_table.py docs/notes/gpu-runs/runs-h100/*.jsonl \
        --speed docs/notes/gpu-runs/runs-h100/probe-ms-per-iteration.json --out docs/presets

Each input is a run's ``log.jsonl`` (or a run folder holding one). The table gives, per run:
preset, parameters, the iterations it reached, held-out PSNR at a common iteration (the largest
that every run reached), at its last evaluation and at its best, and whether it collapsed (an
evaluation more than ``COLLAPSE_DB`` below its best). ``--speed`` adds measured ms/iteration.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from comdefend.errors import UsageError
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import get_preset
from comdefend.training.logs import TrainingLog, read_training_log
from comdefend.training.trainer import image_channels_for


def parameters(config: dict) -> int:
    channels = image_channels_for(config["dataset"])
    model = ComDefend(ComDefendConfig(preset=config["preset"], image_channels=channels))
    return sum(p.numel() for p in model.parameters())


def summarise(runs: list[TrainingLog], speed: dict[str, float]) -> tuple[int, list[dict]]:
    common = min(run.last_evaluation for run in runs)
    rows = []
    for run in runs:
        evaluations, last = run.psnr, run.last_evaluation
        preset = get_preset(run.config["preset"])
        channels = image_channels_for(run.config["dataset"])
        rows.append(
            {
                "run": run.name,
                "dataset": run.config["dataset"],
                "preset": f"{preset.name} ({preset.study_name})",
                "parameters": parameters(run.config),
                "ms_per_iteration": speed.get(f"{preset.name}/{channels}"),
                "iterations": last,
                "planned": run.config["iterations"],
                "psnr_common": evaluations.get(common),
                "psnr_last": evaluations[last],
                "psnr_best": evaluations[run.best_iteration],
                "best_iteration": run.best_iteration,
                "collapsed": run.collapsed_at() is not None,
            }
        )
    return common, rows


def markdown(common: int, rows: list[dict]) -> str:
    head = (
        f"| run | preset | parameters | ms/it | iterations | PSNR @ {common:,} | last PSNR | "
        "best PSNR (at) | collapsed |\n|---|---|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for row in rows:
        speed = f"{row['ms_per_iteration']:.1f}" if row["ms_per_iteration"] else "-"
        common_psnr = f"{row['psnr_common']:.2f}" if row["psnr_common"] is not None else "-"
        lines.append(
            f"| {row['run']} | {row['preset']} | {row['parameters']:,} | {speed} | "
            f"{row['iterations']:,} / {row['planned']:,} | {common_psnr} | "
            f"{row['psnr_last']:.2f} | {row['psnr_best']:.2f} ({row['best_iteration']:,}) | "
            f"{'yes' if row['collapsed'] else 'no'} |"
        )
    return head + "\n".join(lines) + "\n"


def chart(runs: list[TrainingLog], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    for run in runs:
        points = sorted(run.psnr.items())
        axis.plot(*zip(*points, strict=True), marker="o", markersize=3, label=run.name)
    axis.set_xlabel("training iteration (batch 20)")
    axis.set_ylabel("held-out PSNR (dB, 500 test images)")
    axis.set_title("ComDefend presets, seed schedule (Adam 1e-3, noise 20, lambda 1e-4)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--speed", type=Path, default=None, help="JSON of preset/ch -> ms/it")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.png")
    args = parser.parse_args()
    try:
        runs = [read_training_log(path) for path in args.runs]
        speed = json.loads(args.speed.read_text()) if args.speed else {}
    except (UsageError, OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"error: {error}") from None
    common, rows = summarise(runs, speed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(common, rows)
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    chart(runs, args.out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
