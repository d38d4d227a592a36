"""Compare residual-study runs trained in fp32 and in bf16 autocast, at several seeds: does bf16
train the same model as fp32, within the spread that another seed gives?

    python scripts/compare_precision.py runs/residual-study-imagenet \
        runs/residual-study-imagenet-bf16 --presets plain,residual-decoder-1 --until 2500 \
        --out docs/results/training-precision --command "comdefend residual-study ..." \
        --hardware "2-core Xeon CPU, 1 thread per run"

Every STUDY is the ``--out`` folder of a ``comdefend residual-study``. For each of its presets
asked for, the run's precision and seed are read from its training log's config (a preset the
study lacks is skipped with a note). Up to ``--until``, the script compares:

* the held-out PSNR curves of the training logs: for every pair of runs of a preset, the mean
  and the largest absolute difference over the evaluations both logged, and whether the pair
  differs in precision only, in seed only, or in both;
* the accuracy after defending at ``--until``, from the study's points files: two runs' end
  accuracies are compared only when both were measured on one fooling set (a pair of
  precisions at one seed measured on two sets is reported as missing).

The key summary, per preset: the mean |PSNR difference| between the precisions at the same
seed against the mean |PSNR difference| between the seeds at the same precision, both over the
evaluations that every run in those pairs logged. Writes into ``--out``: ``results.json``,
``psnr.png`` (a panel per preset) and ``README.md``, generated from them, with what is still
missing. The study folders are only read: they may be training and measuring right now.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

import comdefend
from comdefend.checkpoint import atomic_write_text
from comdefend.errors import ComDefendError, UsageError
from comdefend.evaluation.residual_study import (
    POINTS_FOLDER,
    RUNS_FOLDER,
    interval_text,
    parse_presets,
)
from comdefend.evaluation.snapshots import PointsFile
from comdefend.figures import curve, panels, save_png
from comdefend.training.logs import read_training_log
from comdefend.training.trainer import LEGACY_DEFAULTS

RESULTS_FILE = "results.json"
CHART_FILE = "psnr.png"
README_FILE = "README.md"
#: How many iterations of the --until grid the README's tables show.
GRID_POINTS = 5
#: Identity keys that must agree for end accuracies to be compared, and what they name.
SHARED_IDENTITY = (("classifier_sha256", "classifiers"),)
PRECISION_COLORS = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green"}
SEED_STYLES = ("-", "--", ":", "-.")


@dataclass
class Run:
    """One training run of a study, as far as ``--until``."""

    study: str
    path: Path
    preset: str
    precision: str
    seed: int
    planned: int
    last_iteration: int
    psnr: dict[int, float]
    training_seconds: float | None
    end: dict[str, Any] | None
    last_measured: int | None
    identity: dict[str, Any] | None = field(default=None, repr=False)
    kernels: str | None = None
    control: bool = False  # a run repeated on other hardware (--hardware-control)

    @property
    def key(self) -> tuple[str, str, int, bool]:
        return self.preset, self.precision, self.seed, self.control

    @property
    def fooling_set(self) -> str | None:
        """sha256 of the fooling set this run's points were measured on (None: no points)."""
        return None if self.identity is None else self.identity.get("fooling_set_sha256")

    @property
    def label(self) -> str:
        label = f"{self.precision} seed {self.seed}"
        return f"{label} ({self.kernels or 'hardware not recorded'})" if self.control else label

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "study_path": str(self.path),
            "preset": self.preset,
            "precision": self.precision,
            "seed": self.seed,
            "planned_iterations": self.planned,
            "last_iteration": self.last_iteration,
            "training_seconds": self.training_seconds,
            "psnr": {str(iteration): value for iteration, value in sorted(self.psnr.items())},
            "end": self.end,
            "last_measured_iteration": self.last_measured,
            "kernels": self.kernels,
            "hardware_control": self.control,
            "fooling_set_sha256": self.fooling_set,
        }


def run_kernels(log_kernels: list[tuple[int, str | None]], declared: str | None) -> str | None:
    """The hardware a run trained on: ``declared`` (``--kernels``) when given, else the kernels
    its sessions recorded (``"cpu AVX2"``; ``"cpu AVX512, then cpu AVX2 from 908"`` for a run
    that moved), None when its log records none."""
    if declared is not None:
        return declared
    known = [(iteration, kernels) for iteration, kernels in log_kernels if kernels is not None]
    if not known or len(known) < len(log_kernels):
        return None  # some session did not record its kernels
    parts = [known[0][1]]
    for (_, before), (iteration, kernels) in itertools.pairwise(known):
        if kernels != before:
            parts.append(f"then {kernels} from {iteration:,}")
    return ", ".join(str(part) for part in parts)


def read_run(
    study: Path, preset: str, until: int, notes: list[str], declared: str | None = None
) -> Run | None:
    """The run of ``preset`` in ``study``; None while its start record is not written yet.
    Its training time is that of the sessions that ended (unknown, with a note, when one of
    them logged no time)."""
    run = study / RUNS_FOLDER / preset
    log = read_training_log(run, running=True)  # the run may be training right now
    config = log.config
    if not config:
        return None
    if log.untimed_sessions:
        notes.append(
            f"{study.name}: training time of {preset} unknown ({log.untimed_sessions} of its "
            f"{log.sessions_ended} stops logged no time: an older log)"
        )
    if "seed" not in config:
        raise UsageError(f"{run / 'log.jsonl'}: its config records no seed")
    path = study / POINTS_FOLDER / f"{preset}.json"
    points = PointsFile.read(path) if path.is_file() else None
    end = None
    last_measured = None
    if points is not None and points.points:
        last_measured = max(points.points)
        if until in points.points:
            end = points.points[until].summary()
    return Run(
        study=study.name,
        path=study,
        preset=preset,
        precision=str(config.get("precision", LEGACY_DEFAULTS["precision"])),
        seed=int(config["seed"]),
        planned=int(config.get("iterations", 0)),
        last_iteration=log.last_iteration,
        psnr={iteration: db for iteration, db in log.psnr.items() if iteration <= until},
        training_seconds=log.training_seconds or None,  # 0: no session has ended yet
        end=end,
        last_measured=last_measured,
        identity=None if points is None else points.identity,
        kernels=run_kernels(log.kernels, declared),
    )


def collect_runs(
    studies: list[Path],
    presets: list[str],
    until: int,
    notes: list[str],
    kernels: dict[str, str] | None = None,
    controls: list[Path] | None = None,
) -> list[Run]:
    """Every run of ``presets`` in ``studies`` and in the hardware ``controls`` (runs that
    repeat one of ``studies``' runs on other hardware), refusing two runs of one (preset,
    precision, seed) among the studies or among the controls, and points measured on different
    fooling sets. ``kernels`` names the hardware of a study whose logs do not record it."""
    kernels = kernels or {}
    controls = controls or []
    studies = [*studies, *controls]
    runs: list[Run] = []
    for study in studies:
        if not study.is_dir():
            raise UsageError(f"{study}: no such study folder")
        if not (study / RUNS_FOLDER).is_dir():
            raise UsageError(f"{study}: no {RUNS_FOLDER}/ folder: not a residual study")
        for preset in presets:
            if not (study / RUNS_FOLDER / preset / "log.jsonl").is_file():
                notes.append(f"{study.name}: no run of {preset} (skipped)")
                continue
            run = read_run(study, preset, until, notes, kernels.get(study.name))
            if run is not None:
                run.control = study in controls
            if run is None:
                notes.append(f"{study.name}: {preset} has not logged its start yet (skipped)")
                continue
            runs.append(run)
    seen: dict[tuple[str, str, int, bool], Run] = {}
    for run in runs:
        if run.key in seen:
            raise UsageError(
                f"two runs of {run.preset} at {run.precision}, seed {run.seed}: "
                f"{seen[run.key].path} and {run.path}; pass one of them (a run repeated on "
                "other hardware goes in --hardware-control)"
            )
        seen[run.key] = run
    for key, what in SHARED_IDENTITY:
        values = {run.identity.get(key) for run in runs if run.identity is not None}
        if len(values) > 1:
            where = ", ".join(
                f"{run.study}/{run.preset} {str(run.identity.get(key))[:12]}"
                for run in runs
                if run.identity is not None
            )
            raise UsageError(
                f"end accuracies measured on different {what} cannot be compared ({where})"
            )
    return runs


def check_until(runs: list[Run], until: int) -> None:
    if not runs:
        raise UsageError("no run of the presets asked for in the study folders")
    planned = max(run.planned for run in runs)
    if until > planned:
        raise UsageError(f"--until {until:,} is beyond every run's training ({planned:,} at most)")
    if not any(run.psnr for run in runs):
        raise UsageError(f"no run has a held-out evaluation at or before --until {until:,}")


def differs(a: Run, b: Run) -> str | None:
    """What a pair of runs of one preset differs in: precision, seed or both; ``hardware``
    for a hardware control and the run it repeats; None for any other pair with a control."""
    if a.control or b.control:
        same = (a.precision, a.seed) == (b.precision, b.seed)
        return "hardware" if same and a.control != b.control else None
    if a.seed == b.seed:
        return "precision"
    return "seed" if a.precision == b.precision else "both"


def on_two_sets(a: Run, b: Run) -> bool:
    """Both runs are measured at the end, on two different fooling sets."""
    return bool(a.end and b.end and a.fooling_set != b.fooling_set)


def end_difference(a: Run, b: Run) -> dict[str, Any] | None:
    """Accuracy after defending at the end, a minus b, and whether the 95% intervals overlap;
    None unless both are measured on one fooling set."""
    if a.end is None or b.end is None or a.fooling_set != b.fooling_set:
        return None
    low_a, high_a = a.end["accuracy_after_defense_interval"]
    low_b, high_b = b.end["accuracy_after_defense_interval"]
    return {
        "difference": a.end["accuracy_after_defense"] - b.end["accuracy_after_defense"],
        "intervals_overlap": low_a <= high_b and low_b <= high_a,
    }


def compare_pair(a: Run, b: Run) -> dict[str, Any]:
    common = sorted(set(a.psnr) & set(b.psnr))
    gaps = [abs(a.psnr[iteration] - b.psnr[iteration]) for iteration in common]
    return {
        "a": a.label,
        "b": b.label,
        "differs_in": differs(a, b),
        "common_evaluations": len(common),
        "up_to": common[-1] if common else None,
        "mean_abs_psnr_difference_db": fmean(gaps) if gaps else None,
        "max_abs_psnr_difference_db": max(gaps) if gaps else None,
        "end_accuracy": end_difference(a, b),
        "fooling_sets_differ": on_two_sets(a, b),
    }


def gap(pairs: list[tuple[Run, Run]], iterations: list[int]) -> dict[str, Any] | None:
    """Mean and largest |PSNR difference| of ``pairs`` over ``iterations``, and the mean
    |difference| of their end accuracies where both are measured."""
    if not pairs or not iterations:
        return None
    gaps = [abs(a.psnr[i] - b.psnr[i]) for a, b in pairs for i in iterations]
    ends = [end_difference(a, b) for a, b in pairs]
    measured = [abs(end["difference"]) for end in ends if end is not None]
    return {
        "pairs": [[a.label, b.label] for a, b in pairs],
        "mean_abs_psnr_difference_db": fmean(gaps),
        "max_abs_psnr_difference_db": max(gaps),
        "end_pairs_measured": len(measured),
        "mean_abs_end_accuracy_difference": fmean(measured) if measured else None,
    }


def compare_preset(runs: list[Run]) -> dict[str, Any]:
    """Every pair of a preset's runs, and the summary: the precision gap (same seed) against
    the seed gap (same precision), over the evaluations every run of those pairs logged."""
    pairs = [(a, b) for a, b in itertools.combinations(runs, 2) if differs(a, b) is not None]
    precision = [(a, b) for a, b in pairs if differs(a, b) == "precision"]
    seed = [(a, b) for a, b in pairs if differs(a, b) == "seed"]
    involved = {run.key: run for pair in precision + seed for run in pair}.values()
    shared = sorted(set.intersection(*(set(run.psnr) for run in involved))) if involved else []
    summary: dict[str, Any] = {
        "iterations": shared,
        "precision_gap_pairs": len(precision),
        "seed_gap_pairs": len(seed),
        "precision_gap": gap(precision, shared),
        "seed_gap": gap(seed, shared),
        "precision_gap_over_seed_gap": None,
    }
    if summary["precision_gap"] and summary["seed_gap"]:
        seed_db = summary["seed_gap"]["mean_abs_psnr_difference_db"]
        if seed_db > 0:
            precision_db = summary["precision_gap"]["mean_abs_psnr_difference_db"]
            summary["precision_gap_over_seed_gap"] = precision_db / seed_db
    hardware = [(a, b) for a, b in pairs if differs(a, b) == "hardware"]
    if hardware:
        runs_of = {run.key: run for pair in hardware for run in pair}.values()
        common = sorted(set.intersection(*(set(run.psnr) for run in runs_of)))
        common = [i for i in common if all(i in run.psnr for run in involved)]
        summary["hardware_gap"] = {
            "iterations": common,
            "hardware_gap": gap(hardware, common),
            "precision_gap": gap(precision, common),
            "seed_gap": gap(seed, common),
        }
    return {"pairs": [compare_pair(a, b) for a, b in pairs], "summary": summary}


def missing(
    runs: list[Run], presets: list[str], design: list[tuple[str, int]], until: int
) -> list[str]:
    """What the comparison still lacks: runs of the design, training up to ``until``, end
    points, and pairs at the same seed or at the same precision. Hardware controls are not
    part of the design: what they lack is not missing."""
    runs = [run for run in runs if not run.control]
    have = {run.key[:3]: run for run in runs}
    lacking = []
    for preset in presets:
        for precision, seed in design:
            if (preset, precision, seed) not in have:
                lacking.append(f"{preset} {precision} seed {seed}: no run")
        mine = [run for run in runs if run.preset == preset]
        for run in mine:
            name = f"{preset} {run.label}"
            if run.last_iteration < until:
                lacking.append(f"{name}: trained to {run.last_iteration:,} of {until:,}")
            if run.end is None:
                measured = (
                    "no point measured"
                    if run.last_measured is None
                    else f"measured to {run.last_measured:,}"
                )
                lacking.append(
                    f"{name}: accuracy after defending at {until:,} not measured ({measured})"
                )
        for a, b in itertools.combinations(mine, 2):
            if differs(a, b) == "precision" and on_two_sets(a, b):
                lacking.append(
                    f"{preset} {a.label} and {b.label}: end accuracies on different fooling "
                    f"sets ({str(a.fooling_set)[:12]}, {str(b.fooling_set)[:12]}): measure both "
                    "on one"
                )
        kinds = {differs(a, b) for a, b in itertools.combinations(mine, 2)}
        if "precision" not in kinds:
            lacking.append(f"{preset}: no pair of precisions at the same seed")
        if "seed" not in kinds:
            lacking.append(f"{preset}: no pair of seeds at the same precision")
    return lacking


def verdict(comparison: dict[str, Any], lacking: list[str]) -> dict[str, Any]:
    """How a preset's comparison reads under the rule of this page: bf16 trains the same model
    as fp32, as far as these runs can tell, when every run of the design reached ``--until``
    and is measured there, and (1) the mean |PSNR difference| between the precisions at one
    seed is no larger than between the seeds at one precision, and (2) for every pair of
    precisions at one seed the 95% intervals of the end accuracies overlap.

    ``state`` is ``incomplete``, ``within seed spread`` or ``beyond seed spread``; ``reasons``
    says what failed or is missing.
    """
    if lacking:
        return {"state": "incomplete", "reasons": lacking}
    summary = comparison["summary"]
    precision_db = summary["precision_gap"]["mean_abs_psnr_difference_db"]
    seed_db = summary["seed_gap"]["mean_abs_psnr_difference_db"]
    reasons = []
    if precision_db > seed_db:
        reasons.append(
            f"the precision gap ({precision_db:.2f} dB) is larger than the seed gap "
            f"({seed_db:.2f} dB)"
        )
    for pair in comparison["pairs"]:
        end = pair["end_accuracy"]
        if pair["differs_in"] == "precision" and not end["intervals_overlap"]:
            reasons.append(f"the end accuracies of {pair['a']} and {pair['b']} do not overlap")
    return {"state": "beyond seed spread" if reasons else "within seed spread", "reasons": reasons}


# --------------------------------------------------------------------------- outputs


def grid(until: int) -> list[int]:
    """The iterations the README's tables show: ``GRID_POINTS`` steps up to ``until``."""
    return sorted({until * step // GRID_POINTS for step in range(1, GRID_POINTS + 1)})


def _db(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def _hours(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 3600:.1f} h"


def _span(summary: dict[str, Any]) -> str:
    iterations = summary["iterations"]
    if not (summary["precision_gap_pairs"] or summary["seed_gap_pairs"]):
        return "no pair to compare"
    if not iterations:
        return "no shared evaluation"
    return f"{len(iterations)} evaluations, {iterations[0]:,} to {iterations[-1]:,}"


def _pairs(count: int) -> str:
    return f"{count} pair" + ("" if count == 1 else "s")


def _gap_text(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    return (
        f"{entry['mean_abs_psnr_difference_db']:.2f} "
        f"(max {entry['max_abs_psnr_difference_db']:.2f}; {_pairs(len(entry['pairs']))})"
    )


def chart(path: Path, results: dict[str, Any]) -> None:
    """Held-out PSNR against iteration, a panel per preset: colour = precision, style = seed."""
    shown = {run["preset"] for run in results["runs"]}
    names = [name for name in results["presets"] if name in shown]
    figure, axes_list = panels(len(names), width=5.5, height=4.2, purpose="the PSNR chart")
    seeds = sorted({run["seed"] for run in results["runs"]})
    for axes, name in zip(axes_list, names, strict=True):
        for run in results["runs"]:
            if run["preset"] != name or not run["psnr"]:
                continue
            control = run.get("hardware_control", False)
            label = f"{run['precision']} seed {run['seed']}"
            curve(
                axes,
                [int(iteration) for iteration in run["psnr"]],
                list(run["psnr"].values()),
                label=f"{label} ({run['kernels'] or 'other hardware'})" if control else label,
                color="tab:gray" if control else PRECISION_COLORS.get(run["precision"]),
            )
            axes.lines[-1].set_linestyle(SEED_STYLES[seeds.index(run["seed"]) % len(SEED_STYLES)])
        axes.set_title(name)
        axes.set_xlim(0, results["until"])
        axes.set_xlabel("training iteration")
        axes.set_ylabel("held-out PSNR (dB)")
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    figure.suptitle(f"ComDefend trained in fp32 and bf16 autocast, up to {results['until']:,}")
    save_png(figure, path)


def preset_section(name: str, results: dict[str, Any]) -> list[str]:
    until = results["until"]
    columns = results["grid"]
    runs = [run for run in results["runs"] if run["preset"] == name]
    lines = [f"## {name}", ""]
    if not runs:
        return lines + ["No run of this preset in the study folders.", ""]
    lines += [
        "| study | precision | seed | iterations trained | "
        + " | ".join(f"PSNR @ {iteration:,} (dB)" for iteration in columns)
        + f" | accuracy after defending @ {until:,} [95%] | restored | clean accuracy "
        "(defended) [95%] | training time |",
        "|---|---|---:|---:|" + "---:|" * len(columns) + "---:|---:|---:|---:|",
    ]
    for run in runs:
        end = run["end"]
        psnr = [_db(run["psnr"].get(str(iteration))) for iteration in columns]
        restored = "n/a" if end is None else f"{end['restored']}/{end['fooling_set_size']}"
        lines.append(
            f"| {run['study']} | {run['precision']} | {run['seed']} | "
            f"{run['last_iteration']:,} / {run['planned_iterations']:,} | "
            + " | ".join(psnr)
            + f" | {interval_text(end, 'accuracy_after_defense')} | {restored} | "
            f"{interval_text(end, 'clean_accuracy_defended')} | "
            f"{_hours(run['training_seconds'])} |"
        )
    comparison = results["comparisons"][name]
    summary = comparison["summary"]
    lines += [
        "",
        f"Mean |PSNR difference| in dB over the evaluations every compared run logged "
        f"({_span(summary)}): between the precisions at the same seed "
        f"{_gap_text(summary['precision_gap'])}; between the seeds at the same precision "
        f"{_gap_text(summary['seed_gap'])}.",
        "",
        *hardware_lines(summary.get("hardware_gap")),
    ]
    if comparison["pairs"]:
        lines += [
            "Every pair, over the evaluations both logged up to "
            f"{until:,} (end accuracy: a minus b, at {until:,}):",
            "",
            "| a | b | differ in | common evaluations (to) | mean abs PSNR difference (dB) "
            "| max (dB) | end accuracy difference (95% intervals overlap) |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for pair in comparison["pairs"]:
            end = pair["end_accuracy"]
            to = "" if pair["up_to"] is None else f" ({pair['up_to']:,})"
            end_text = (
                ("n/a (two fooling sets)" if pair.get("fooling_sets_differ") else "n/a")
                if end is None
                else f"{end['difference']:+.3f} ({'yes' if end['intervals_overlap'] else 'no'})"
            )
            lines.append(
                f"| {pair['a']} | {pair['b']} | {pair['differs_in']} | "
                f"{pair['common_evaluations']}{to} | "
                f"{_db(pair['mean_abs_psnr_difference_db'])} | "
                f"{_db(pair['max_abs_psnr_difference_db'])} | {end_text} |"
            )
        lines.append("")
    return lines


def hardware_lines(entry: dict[str, Any] | None) -> list[str]:
    """The hardware gap of a preset: a run repeated on other hardware against its original,
    beside the precision and seed gaps over the same evaluations."""
    if entry is None:
        return []
    iterations = entry["iterations"]
    if not iterations:
        return ["Hardware control: no evaluation shared with the other runs.", ""]
    return [
        f"Hardware control, over the {len(iterations)} evaluations from {iterations[0]:,} to "
        f"{iterations[-1]:,} that every run logged, mean |PSNR difference| in dB: the same run "
        f"repeated on other hardware {_gap_text(entry['hardware_gap'])}; the precisions at "
        f"the same seed {_gap_text(entry['precision_gap'])}; the seeds at the same precision "
        f"{_gap_text(entry['seed_gap'])}.",
        "",
    ]


def summary_rows(results: dict[str, Any]) -> list[str]:
    lines = [
        "| preset | evaluations compared | precision gap, same seed (dB) | seed gap, same "
        "precision (dB) | precision gap / seed gap | end accuracy: precision gap, seed gap "
        "| verdict |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name in results["presets"]:
        summary = results["comparisons"][name]["summary"]
        ratio = summary["precision_gap_over_seed_gap"]
        ends = [
            (entry or {}).get("mean_abs_end_accuracy_difference")
            for entry in (summary["precision_gap"], summary["seed_gap"])
        ]
        lines.append(
            f"| {name} | {_span(summary)} | "
            f"{_gap_text(summary['precision_gap'])} | {_gap_text(summary['seed_gap'])} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} | "
            + ", ".join("n/a" if value is None else f"{value:.3f}" for value in ends)
            + f" | {verdict_text(results['comparisons'][name]['verdict'])} |"
        )
    return lines


def verdict_text(entry: dict[str, Any]) -> str:
    if entry["state"] == "incomplete":
        return f"incomplete ({len(entry['reasons'])} missing)"
    if entry["reasons"]:
        return f"{entry['state']}: " + "; ".join(entry["reasons"])
    return entry["state"]


def readme(results: dict[str, Any]) -> str:
    until = results["until"]
    provenance = results["provenance"]
    studies = ", ".join(f"`{study}`" for study in results["studies"])
    sets = results["fooling_sets"]
    fooling = ""
    if len(sets) == 1:
        fooling = f" (fooling set `{next(iter(sets))[:12]}`)"
    elif sets:
        fooling = (
            " (fooling sets "
            + "; ".join(f"`{sha[:12]}`: {', '.join(where)}" for sha, where in sets.items())
            + "; end accuracies are compared within one set only)"
        )
    lines = [
        "# Training precision: bf16 autocast against fp32",
        "",
        "Does training ComDefend in bf16 autocast train the same model as fp32? Runs of "
        f"`comdefend residual-study` ({studies}) at each precision and seed, compared up to "
        f"iteration {until:,}: the held-out PSNR curve of every training log, and the "
        f"accuracy after defending at {until:,} from the studies' measured points"
        + fooling
        + ". A precision effect smaller than the seed-to-seed spread is within what another "
        "seed changes.",
        "",
        f"*Generated by `scripts/compare_precision.py` on {provenance['date']} from the runs' "
        "logs and points files (`results.json` beside this page): no number here is typed by "
        "hand.*",
        "",
        "## Summary",
        "",
        "Mean |PSNR difference| (largest in brackets) between runs that differ in precision "
        "only, and between runs that differ in seed only, over the evaluations all of them "
        "logged; end accuracy: mean |difference| in accuracy after defending at "
        f"{until:,} where both runs of a pair are measured.",
        "",
        *summary_rows(results),
        "",
        "The verdict reads each preset by one rule, fixed before the runs ended: bf16 trains "
        "the same model as fp32, as far as these runs can tell, when every run of the design "
        f"reached {until:,} and is measured there, the precision gap is no larger than the "
        "seed gap, and for every pair of precisions at one seed the 95% intervals of the "
        "accuracy after defending overlap. Two seeds per precision make it a coarse test: it "
        "can show a precision effect larger than the seed spread, not prove there is none.",
        "",
    ]
    for name in results["presets"]:
        lines += preset_section(name, results)
    lines += [
        "## Chart",
        "",
        f"Held-out PSNR up to {until:,}: colour = precision, line style = seed.",
        "",
        f"![held-out PSNR vs iteration]({CHART_FILE})",
        "",
        "## What is still missing",
        "",
        (
            "Still missing: " + "; ".join(results["missing"]) + "."
            if results["missing"]
            else f"Nothing: every run of the design reached {until:,} and is measured there."
        ),
        "",
    ]
    if results["notes"]:
        lines += ["Notes: " + "; ".join(results["notes"]) + ".", ""]
    lines += ["## How it ran", ""]
    if provenance["command"]:
        lines += ["The runs:", "", "```bash", provenance["command"], "```", ""]
    lines += [
        "This page:",
        "",
        "```bash",
        provenance["generated_by"],
        "```",
        "",
        f"- Hardware: {provenance['hardware'] or 'not given'}.",
        f"- Software: comdefend {provenance['comdefend']}, torch {provenance['torch']}, "
        f"Python {provenance['python']}.",
        "- Training time: what the logs recorded each time a training stopped (interrupted, "
        "paused or finished); a training still running counts up to its last stop.",
        "",
    ]
    return "\n".join(lines)


def compare(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    if args.until < 1:
        raise UsageError(f"--until must be a positive iteration, got {args.until}")
    presets = [preset.name for preset in parse_presets(args.presets)]
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    precisions = [precision.strip() for precision in args.precisions.split(",")]
    design = [(precision, seed) for precision in precisions for seed in seeds]
    notes: list[str] = []
    kernels = {}
    for item in args.kernels:
        study, sep, name = item.partition("=")
        if not sep or not study or not name:
            raise UsageError(f"--kernels takes STUDY=NAME (a study folder's name), got {item!r}")
        kernels[study] = name
    runs = collect_runs(args.studies, presets, args.until, notes, kernels, args.hardware_control)
    check_until(runs, args.until)
    order = [precision for precision, _ in design]
    runs.sort(
        key=lambda run: (
            presets.index(run.preset),
            order.index(run.precision) if run.precision in order else len(order),
            run.precision,
            run.seed,
            run.control,
        )
    )
    fooling: dict[str, list[str]] = {}
    for run in runs:
        if run.fooling_set is not None:
            fooling.setdefault(run.fooling_set, []).append(f"{run.study}/{run.preset}")
    comparisons = {}
    for name in presets:
        comparison = compare_preset([run for run in runs if run.preset == name])
        comparison["verdict"] = verdict(comparison, missing(runs, [name], design, args.until))
        comparisons[name] = comparison
    return {
        "kind": "training-precision-comparison",
        "until": args.until,
        "grid": grid(args.until),
        "presets": presets,
        "studies": [study.name for study in args.studies],
        "hardware_controls": [study.name for study in args.hardware_control],
        "design": [{"precision": precision, "seed": seed} for precision, seed in design],
        "fooling_sets": fooling,
        "runs": [run.to_dict() for run in runs],
        "comparisons": comparisons,
        "missing": missing(runs, presets, design, args.until),
        "notes": notes,
        "provenance": {
            "generated_by": shlex.join(["python", "scripts/compare_precision.py", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "comdefend": comdefend.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "command": args.command,
            "hardware": args.hardware,
        },
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path, help="residual-study --out folders")
    parser.add_argument("--presets", default="plain,residual-decoder-1")
    parser.add_argument("--until", type=int, default=2500, help="the last iteration compared")
    parser.add_argument("--out", type=Path, required=True, help="where the results go")
    parser.add_argument(
        "--precisions", default="fp32,bf16", help="the design's precisions (for what is missing)"
    )
    parser.add_argument("--seeds", default="0,1", help="the design's seeds (for what is missing)")
    parser.add_argument(
        "--hardware-control", type=Path, action="append", default=[],
        help="a study folder whose runs repeat runs of the studies on other hardware "
        "(compared with them only: the hardware gap)",
    )  # fmt: skip
    parser.add_argument(
        "--kernels", action="append", default=[], metavar="STUDY=NAME",
        help="the hardware a study's runs trained on, where their logs do not record it "
        "(e.g. 'residual-study-imagenet=cpu AVX512')",
    )  # fmt: skip
    parser.add_argument("--command", default=None, help="the commands that made the runs")
    parser.add_argument("--hardware", default=None, help="where they ran, in words")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        results = compare(args, argv)
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / RESULTS_FILE, json.dumps(results, indent=1) + "\n")
        chart(args.out / CHART_FILE, results)
        atomic_write_text(args.out / README_FILE, readme(results))
    except ComDefendError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(error.exit_code) from None
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    for note in results["notes"]:
        print(f"note: {note}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
