"""Publish a residual study's results into ``docs/results/<name>/``: data, charts and a README
generated from them (no number typed by hand).

    python scripts/publish_residual_study.py runs/residual-study-imagenet \
        docs/results/residual-study-imagenet --hardware "2-core Xeon CPU, 1 thread per stage" \
        --command "comdefend residual-study ..." \
        --notes docs/results/residual-study-imagenet/notes.md

Copies ``results.json``, ``points.csv``, ``table.md`` and the three charts from the study folder,
writes ``provenance.json`` (command, hardware, software, the training and measuring time spent
so far, read from the runs' logs and the points) and ``README.md``: the state of every preset,
the comparison of each residual preset with the plain model (at the same iterations, at their
best points, at the end, at equal held-out PSNR), the charts, and the hand-written notes file if
given (the written answer lives there, beside the generated numbers).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import comdefend
from comdefend.evaluation.residual_study import (
    CLEAN_PLOT_FILE,
    LEGACY_FOOLING_SET_METHOD,
    PLOT_FILE,
    POINTS_CSV,
    POINTS_FOLDER,
    PSNR_PLOT_FILE,
    RESULTS_FILE,
    TABLE_FILE,
    interval_text,
)
from comdefend.training.logs import read_training_log

COPIED = (RESULTS_FILE, POINTS_CSV, TABLE_FILE, PLOT_FILE, PSNR_PLOT_FILE, CLEAN_PLOT_FILE)


def _interval(point: dict[str, Any]) -> str:
    return interval_text(point, "accuracy_after_defense", digits=2)


def measuring_seconds(study: Path) -> dict[str, float]:
    """Seconds spent measuring each preset, from its points file."""
    spent = {}
    for path in sorted((study / POINTS_FOLDER).glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        spent[path.stem] = round(sum(p["seconds"] for p in data["points"]), 1)
    return spent


def compare_with_plain(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each residual preset against plain: mean accuracy difference over the iterations both
    measured, how often it is above/below with non-overlapping 95% intervals, the best points,
    the end, and at equal held-out PSNR (the nearest plain point within 0.5 dB)."""
    presets = results["presets"]
    plain = {p["iteration"]: p for p in presets.get("plain", {}).get("evaluations", [])}
    rows = []
    for name, entry in presets.items():
        if name == "plain" or not entry["evaluations"] or not plain:
            continue
        mine = {p["iteration"]: p for p in entry["evaluations"]}
        common = sorted(set(mine) & set(plain))
        if not common:
            continue
        differences = [
            mine[i]["accuracy_after_defense"] - plain[i]["accuracy_after_defense"] for i in common
        ]
        above = sum(
            mine[i]["accuracy_after_defense_interval"][0]
            > plain[i]["accuracy_after_defense_interval"][1]
            for i in common
        )
        below = sum(
            mine[i]["accuracy_after_defense_interval"][1]
            < plain[i]["accuracy_after_defense_interval"][0]
            for i in common
        )
        equal_psnr = []
        plain_points = [p for p in plain.values() if p["heldout_psnr_db"] is not None]
        for iteration in common:
            point = mine[iteration]
            if point["heldout_psnr_db"] is None or not plain_points:
                continue
            nearest = min(
                plain_points, key=lambda p: abs(p["heldout_psnr_db"] - point["heldout_psnr_db"])
            )
            if abs(nearest["heldout_psnr_db"] - point["heldout_psnr_db"]) <= 0.5:
                equal_psnr.append(
                    point["accuracy_after_defense"] - nearest["accuracy_after_defense"]
                )
        last = common[-1]
        rows.append(
            {
                "preset": name,
                "study_name": entry["study_name"],
                "common_iterations": len(common),
                "up_to": last,
                "mean_difference": sum(differences) / len(differences),
                "above_plain": above,
                "below_plain": below,
                "best": entry["best"],
                "plain_best": max(
                    (plain[i] for i in common), key=lambda p: p["accuracy_after_defense"]
                ),
                "last": mine[last],
                "plain_last": plain[last],
                "equal_psnr_pairs": len(equal_psnr),
                "equal_psnr_mean_difference": (
                    sum(equal_psnr) / len(equal_psnr) if equal_psnr else None
                ),
            }
        )
    return rows


def state_text(results: dict[str, Any]) -> str:
    """Whether the study is complete and, if not, whether its points can still be added to: a
    fooling set made the earlier way (float32, no ``method`` recorded) is made again only on
    the machine that made it, so elsewhere the study cannot go on measuring.

    Example:
        >>> state_text({"complete": True, "adversarial_set": {}})
        'The study is complete.'
        >>> state_text({"complete": False, "adversarial_set": {"method": "bim-float64-8bit"}})[:38]
        '**The study is not complete.** Continu'
    """
    if results["complete"]:
        return "The study is complete."
    method = results["adversarial_set"].get("method", LEGACY_FOOLING_SET_METHOD)
    if method == LEGACY_FOOLING_SET_METHOD:
        return (
            "**The study is not complete, and its points cannot be added to.** Its fooling set "
            "was made the earlier way (BIM in float32), which only the machine that made it "
            "makes again bit for bit, and the points files refuse any other set. Its runs can "
            "still be trained further and their snapshots measured in a new study folder, on a "
            "fooling set that every machine makes alike (BIM in float64, rounded to 8-bit "
            "levels)."
        )
    return (
        "**The study is not complete.** Continue it with the command below (it resumes: no "
        "point is measured twice and no training iteration is redone)."
    )


def readme(results: dict[str, Any], provenance: dict[str, Any], notes: str | None) -> str:
    settings = results["settings"]
    adv = results["adversarial_set"]
    attack = results["attack"]
    lines = [
        "# The residual study on ImageNet",
        "",
        "Does putting residual blocks in ComDefend's encoder, its decoder, or both change how "
        "many adversarial examples it restores? Every preset is trained on "
        f"{settings['train_dataset']} with the study's schedule ({settings['iterations']:,} "
        f"iterations of batch {settings['batch_size']}, Adam, no stabilizer) and, every "
        f"{settings['eval_every']} iterations, measured on {settings['dataset']} with "
        f"{results['classifier']['arch']}: the accuracy after defending on the BIM examples "
        f"(L-inf {attack['eps'] * 255:.4g}/255, {attack['steps']} steps) that fooled the "
        f"undefended classifier: the classifier got {adv['clean_correct']} of the first "
        f"{adv['attacked_images']} images right and BIM fooled it on {adv['size']} of those, "
        "the fooling set. Defended clean accuracy "
        f"on the same images every {settings['clean_every']} iterations; held-out PSNR on "
        f"{settings['eval_images']} {settings['train_dataset']} test images at every point. "
        "Intervals are 95% Wilson intervals over the fooling set's images.",
        "",
        "*This page is generated from `results.json` by `scripts/publish_residual_study.py`.*",
        "",
        "## State",
        "",
        "| preset | study name | trained (iterations) | measured points | last point: accuracy "
        "after defending [95%] | best (iteration) | held-out PSNR, last (dB) | first PSNR "
        "collapse |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["presets"].values():
        points = entry["evaluations"]
        last = points[-1] if points else None
        best = entry["best"]
        lines.append(
            f"| {entry['name']} | {entry['study_name']} | "
            f"{entry['training']['iterations_done']:,} | {len(points)} | "
            + (f"{_interval(last)} at {last['iteration']:,}" if last else "n/a")
            + " | "
            + (f"{best['accuracy_after_defense']:.3f} ({best['iteration']:,})" if best else "n/a")
            + " | "
            + (f"{last['heldout_psnr_db']:.2f}" if last and last["heldout_psnr_db"] else "n/a")
            + f" | {entry['first_psnr_collapse'] or 'none'} |"
        )
    lines += ["", state_text(results), "", "## Residual presets against the plain model", ""]
    rows = compare_with_plain(results)
    if rows:
        lines += [
            "Over the iterations both measured: the mean difference in accuracy after "
            "defending (preset minus plain), how many points lie above or below plain with "
            "non-overlapping 95% intervals, the best points, the last common point, and at "
            "equal held-out PSNR (pairs within 0.5 dB).",
            "",
            "| preset | common points (to) | mean difference | above / below plain | best "
            "(plain's best) | last common point (plain) | equal PSNR: pairs, mean difference |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            equal = (
                "n/a"
                if row["equal_psnr_mean_difference"] is None
                else f"{row['equal_psnr_pairs']}, {row['equal_psnr_mean_difference']:+.3f}"
            )
            lines.append(
                f"| {row['preset']} | {row['common_iterations']} ({row['up_to']:,}) | "
                f"{row['mean_difference']:+.3f} | {row['above_plain']} / {row['below_plain']} | "
                f"{row['best']['accuracy_after_defense']:.3f} ({row['best']['iteration']:,}) "
                f"({row['plain_best']['accuracy_after_defense']:.3f}, "
                f"{row['plain_best']['iteration']:,}) | {_interval(row['last'])} "
                f"({_interval(row['plain_last'])}) | {equal} |"
            )
    else:
        lines.append("No residual preset has been measured yet: nothing to compare.")
    lines += [
        "",
        "## Charts",
        "",
        "Accuracy after defending along training, one panel per residual family, each with the "
        "plain model (dashed); bands are 95% intervals:",
        "",
        f"![accuracy after defending vs iteration]({PLOT_FILE})",
        "",
        "The same points against held-out PSNR (at equal reconstruction quality, do the "
        "families differ?):",
        "",
        f"![accuracy after defending vs held-out PSNR]({PSNR_PLOT_FILE})",
        "",
        "Defended clean accuracy:",
        "",
        f"![clean accuracy (defended) vs iteration]({CLEAN_PLOT_FILE})",
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        "## How it ran",
        "",
        "```bash",
        provenance["command"],
        "```",
        "",
        f"- Hardware: {provenance['hardware']}.",
        f"- Software: comdefend {provenance['comdefend']}, torch {provenance['torch']}, "
        f"Python {provenance['python']}.",
        f"- Training time so far: {_hours(provenance['training_seconds'])}; "
        f"measuring time: {_hours(provenance['measuring_seconds'])}.",
        f"- Published {provenance['published']}.",
        "",
        "Files: `results.json` (settings, classifier and fooling-set provenance, every point), "
        f"`{POINTS_CSV}` (one row per point), `{TABLE_FILE}`, `provenance.json`.",
        "",
    ]
    return "\n".join(lines)


def _hours(seconds: dict[str, float]) -> str:
    total = sum(seconds.values())
    parts = ", ".join(f"{name} {value / 3600:.1f} h" for name, value in seconds.items())
    return f"{total / 3600:.1f} h ({parts})" if parts else "none"


def training_seconds(study: Path) -> dict[str, float]:
    """Wall time of every run's training, summed over its sessions that ended and logged their
    time (:attr:`~comdefend.training.logs.TrainingLog.session_seconds`); a log being written
    right now is read up to its last whole line."""
    return {
        log.parent.name: round(read_training_log(log, running=True).session_seconds, 1)
        for log in sorted((study / "runs").glob("*/log.jsonl"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study's --out folder")
    parser.add_argument("dest", type=Path, help="e.g. docs/results/residual-study-imagenet")
    parser.add_argument("--command", required=True, help="the command that runs the study")
    parser.add_argument("--hardware", required=True, help="where it ran, in words")
    parser.add_argument("--notes", type=Path, default=None, help="hand-written notes (Markdown)")
    parser.add_argument(
        "--training-seconds", type=Path, default=None,
        help="JSON {preset: seconds} of training time measured outside the logs",
    )  # fmt: skip
    args = parser.parse_args()

    results_path = args.study / RESULTS_FILE
    if not results_path.is_file():
        raise SystemExit(f"error: {results_path} not found: measure the study first")
    results = json.loads(results_path.read_text(encoding="utf-8"))
    args.dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = args.study / name
        if source.is_file():
            shutil.copyfile(source, args.dest / name)
    trained = training_seconds(args.study)
    if args.training_seconds is not None:
        trained = json.loads(args.training_seconds.read_text(encoding="utf-8"))
    provenance = {
        "command": args.command,
        "hardware": args.hardware,
        "comdefend": comdefend.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "training_seconds": trained,
        "measuring_seconds": measuring_seconds(args.study),
        "published": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "complete": results["complete"],
    }
    (args.dest / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    notes = args.notes.read_text(encoding="utf-8") if args.notes and args.notes.is_file() else None
    (args.dest / "README.md").write_text(readme(results, provenance, notes), encoding="utf-8")
    print(f"wrote {args.dest}")


if __name__ == "__main__":
    main()
