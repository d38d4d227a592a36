"""Regenerate the results pages from the result files: ``docs/results/README.md`` and the
"results at a glance" table of the README. No number on either page is typed by hand.

    python scripts/results_page.py            # rewrite both
    python scripts/results_page.py --check    # exit 1 if either is out of date (CI, tests)

Every folder ``docs/results/<name>/`` holds one result set: an evaluation's ``results.json``
(``comdefend evaluate``), a residual study's (``comdefend residual-study``) or a training-precision
comparison's (``scripts/compare_precision.py``), and a
``provenance.json`` with the command, the hardware and the wall time. Accuracies are given in %
with 95% Wilson intervals over the images (randomized defenses evaluated over several draws:
mean and standard deviation over the draws instead), always with the image count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from comdefend.evaluation.report import machines
from comdefend.metrics import proportion_interval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
PAGE = RESULTS / "README.md"
README = REPO / "README.md"
COMPARISON_KIND = "training-precision-comparison"  # scripts/compare_precision.py
START, END = "<!-- results-at-a-glance:start -->", "<!-- results-at-a-glance:end -->"
#: the L-inf budget (in /255) that papers quote most for CIFAR-10 and ImageNet; the glance
#: tables show each evaluation's worst case at its budget nearest to it
GLANCE_EPS = 8.0


def load_sets(root: Path) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """``(name, results, provenance)`` of every result folder, by name."""
    sets = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        results_file = folder / "results.json"
        if not results_file.is_file():
            continue
        provenance_file = folder / "provenance.json"
        provenance = (
            json.loads(provenance_file.read_text(encoding="utf-8"))
            if provenance_file.is_file()
            else {}
        )
        sets.append((folder.name, json.loads(results_file.read_text(encoding="utf-8")), provenance))
    return sets


def accuracy(value: float, n: int, std: float = 0.0, draws: int = 1) -> str:
    """``"42.0 [41.0, 43.0]"`` (%, 95% Wilson interval), or mean +- std over draws.

    Example:
        >>> accuracy(0.5, 100)
        '50.0 [40.4, 59.6]'
        >>> accuracy(0.5, 100, std=0.01, draws=3)
        '50.0 ± 1.0 (3 draws)'
    """
    if draws > 1:
        return f"{100 * value:.1f} ± {100 * std:.1f} ({draws} draws)"
    low, high = proportion_interval(round(value * n), n)
    return f"{100 * value:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _eps(value: Any) -> str:
    return "min-norm" if isinstance(value, str) else f"{value:g}"


def _defense_specs(results: dict[str, Any]) -> list[str]:
    return [d["spec"] if isinstance(d, dict) else str(d) for d in results["defenses"]]


def evaluation_section(name: str, results: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    config = results["config"]
    defenses = _defense_specs(results)
    n = int(config["n"])
    clean = {row["defense"]: row for row in results["clean"]}
    lines = [
        f"## {name}",
        "",
        f"{config['dataset']} {config.get('split', 'test')} set, first {n:,} images; "
        f"classifier `{config['classifier']}`; threat models: "
        f"{', '.join(results['threat_models'])}. Accuracy in % with 95% intervals "
        f"({n:,} images each).",
        "",
    ]
    for threat_model in results["threat_models"]:
        cells = [c for c in results["cells"] if c["threat_model"] == threat_model]
        if not cells:
            continue
        lines += [
            f"### {name}: {threat_model}",
            "",
            "| attack | eps (/255) | " + " | ".join(f"`{d}`" for d in defenses) + " |",
            "|---|---|" + "---:|" * len(defenses),
            "| clean | — | "
            + " | ".join(
                accuracy(
                    clean[d]["accuracy"],
                    n,
                    clean[d].get("accuracy_std") or 0.0,
                    int(clean[d].get("draws", 1)),
                )  # fmt: skip
                if d in clean
                else "n/a"
                for d in defenses
            )
            + " |",
        ]
        keys = []
        for cell in cells:
            key = (cell["attack"], cell["eps"])
            if key not in keys:
                keys.append(key)
        for attack, eps in keys:
            row = {c["defense"]: c for c in cells if (c["attack"], c["eps"]) == (attack, eps)}
            values = []
            for defense in defenses:
                cell = row.get(defense)
                if cell is None or cell.get("robust_accuracy") is None:
                    values.append("n/a")
                    continue
                values.append(
                    accuracy(
                        cell["robust_accuracy"],
                        int(cell["n"]),
                        cell.get("robust_accuracy_std") or 0.0,
                        int(cell.get("draws", 1)),
                    )  # fmt: skip
                )
            lines.append(f"| {attack} | {_eps(eps)} | " + " | ".join(values) + " |")
        lines.append("")
    lines += _provenance_lines(results, provenance)
    return lines


def _provenance_lines(results: dict[str, Any], provenance: dict[str, Any]) -> list[str]:
    lines = []
    if provenance.get("command"):
        lines += ["```bash", provenance["command"].strip(), "```", ""]
    facts = []
    if provenance.get("hardware"):
        facts.append(f"hardware: {provenance['hardware']}")
    if provenance.get("wall_time"):
        facts.append(f"wall time: {provenance['wall_time']}")
    environment = results.get("environment") or {}
    if environment:
        facts.append(f"comdefend {environment.get('comdefend')}, torch {environment.get('torch')}")
    if len(results.get("environments") or []) > 1:  # a run resumed on other machines
        facts.append(f"computed on {machines(results['environments'])}")
    if provenance.get("date"):
        facts.append(f"run {provenance['date']}")
    if facts:
        lines += ["- " + "; ".join(facts) + ".", ""]
    return lines


def study_section(name: str, results: dict[str, Any]) -> list[str]:
    settings = results["settings"]
    adv = results["adversarial_set"]
    measured = {preset: len(entry["evaluations"]) for preset, entry in results["presets"].items()}
    state = ", ".join(f"{preset} {count} points" for preset, count in measured.items())
    status = "complete" if results.get("complete") else "in progress"
    return [
        f"## {name}",
        "",
        f"The residual study ({status}): ComDefend presets trained on "
        f"{settings['train_dataset']}, accuracy after defending on {settings['dataset']} "
        f"({results['classifier'].get('arch')}, fooling set of {adv['size']} images) every "
        f"{settings['eval_every']} of {settings['iterations']:,} training iterations: {state}. "
        f"Tables, charts and the answer: [{name}/README.md]({name}/README.md).",
        "",
    ]


def _gap(gap: dict[str, Any] | None) -> str:
    if gap is None:
        return "no pair yet"
    pairs = len(gap["pairs"])
    return f"{gap['mean_abs_psnr_difference_db']:.2f} dB ({pairs} pair{'s' if pairs != 1 else ''})"


def comparison_section(name: str, results: dict[str, Any]) -> list[str]:
    """A training-precision comparison (``scripts/compare_precision.py``): per preset, the held-out
    PSNR gap between precisions at one seed against the gap between seeds at one precision, and
    the verdict of the comparison's rule."""
    until = int(results["until"])
    lines = [
        f"## {name}",
        "",
        f"Training in bf16 autocast against fp32 (`comdefend residual-study` runs, up to "
        f"iteration {until:,}): mean |held-out PSNR difference| between the precisions at the "
        f"same seed, against the same between the seeds at the same precision.",
        "",
        "| preset | evaluations compared | precision gap | seed gap | verdict |",
        "|---|---:|---:|---:|---|",
    ]
    for preset, comparison in results["comparisons"].items():
        summary = comparison["summary"]
        iterations = summary["iterations"]
        compared = (
            f"{len(iterations)} ({iterations[0]:,} to {iterations[-1]:,})" if iterations else "0"
        )
        lines.append(
            f"| {preset} | {compared} | {_gap(summary['precision_gap'])} | "
            f"{_gap(summary['seed_gap'])} | {comparison['verdict']['state']} |"
        )
    missing = len(results["missing"])
    lines += [
        "",
        ("Complete." if not missing else f"In progress: {missing} items still missing.")
        + f" Tables, chart and what is missing: [{name}/README.md]({name}/README.md).",
        "",
    ]
    return lines


def glance_eps(budgets: list[float]) -> float:
    """The budget a glance table shows: the one nearest :data:`GLANCE_EPS`, the smaller on a tie.

    Example:
        >>> glance_eps([2.0, 8.0, 16.0]), glance_eps([4.0, 12.0]), glance_eps([25.0, 2.0])
        (8.0, 4.0, 2.0)
    """
    return min(budgets, key=lambda eps: (abs(eps - GLANCE_EPS), eps))


def _authors_weights(results: dict[str, Any], spec: str) -> bool:
    """Whether the defense ``spec`` ran the authors' released weights (``import-official``)."""
    for defense in results["defenses"]:
        if isinstance(defense, dict) and defense["spec"] == spec:
            return str(defense.get("settings", {}).get("source", "")).startswith("official:")
    return False


def _attacked_as(results: dict[str, Any], defense: str, threat_model: str) -> frozenset[str]:
    """The threat models ``defense``'s cells under ``threat_model`` were really attacked in
    (``bpda+eot`` on a deterministic defense is ``bpda``; any adaptive one on ``none`` is
    ``oblivious``)."""
    return frozenset(
        cell.get("effective_threat_model") or threat_model
        for cell in results["cells"]
        if cell["defense"] == defense and cell["threat_model"] == threat_model
    )


def glance_rows(
    sets: list[tuple[str, dict[str, Any], dict[str, Any]]],
    page_link: str = "",
    authors_only: bool = False,
) -> list[str]:
    """One row per evaluation: undefended and ComDefend clean accuracy and the worst case over
    the L-inf attacks at the budget nearest :data:`GLANCE_EPS` (the smaller one on a tie), per
    threat model; ``page_link`` leads to the results page (empty on the page itself).
    ``authors_only`` (the README's short table): of the ComDefend models, only the authors'
    released weights. A threat model that repeats an earlier one's attack on a defense
    (``bpda+eot`` on a deterministic one) gets no second row."""
    rows = [
        "| result set | images | classifier | threat model | defense | clean | worst case at "
        "eps (/255) |",
        "|---|---:|---|---|---|---:|---:|",
    ]
    for name, results, _ in sets:
        if "cells" not in results:
            continue
        n = int(results["config"]["n"])
        clean = {row["defense"]: row for row in results["clean"]}
        defenses = [d for d in _defense_specs(results) if d == "none" or d.startswith("comdefend")]
        if authors_only:
            defenses = [d for d in defenses if d == "none" or _authors_weights(results, d)]
        shown: set[tuple[str, frozenset[str]]] = set()  # a repeated attack gets no second row
        for threat_model in results["threat_models"]:
            worst = [
                w for w in results["worst_case"]
                if w["threat_model"] == threat_model and not isinstance(w["eps"], str)
            ]  # fmt: skip
            if not worst:
                continue
            eps = glance_eps([w["eps"] for w in worst])
            for defense in defenses:
                row = next((w for w in worst if w["defense"] == defense and w["eps"] == eps), None)
                attacked = (defense, _attacked_as(results, defense, threat_model))
                if row is None or defense not in clean or attacked in shown:
                    continue
                shown.add(attacked)
                rows.append(
                    f"| [{name}]({page_link}#{name}) | {n:,} | "
                    f"`{results['config']['classifier']}` | {threat_model} | `{defense}` | "
                    f"{accuracy(clean[defense]['accuracy'], n)} | "
                    f"{accuracy(row['worst_case_robust_accuracy'], int(row['n']))} at "
                    f"{_eps(eps)} |"
                )
    return rows


def page(sets: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    lines = [
        "# Results",
        "",
        "Every number on this page is read from the result files beside it "
        "(`docs/results/<name>/results.json`, with the command, hardware and time in "
        "`provenance.json`) by `scripts/results_page.py`. Accuracies are in %, with 95% Wilson "
        "intervals over the images; the worst case is the lowest robust accuracy over the L-inf "
        "attacks at a budget (in the table at a glance: the evaluated budget nearest "
        f"{GLANCE_EPS:g}/255).",
        "",
        "## At a glance",
        "",
        *glance_rows(sets),
        "",
    ]
    for name, results, provenance in sets:
        if results.get("kind") == "residual-study":
            lines += study_section(name, results)
        elif results.get("kind") == COMPARISON_KIND:
            lines += comparison_section(name, results)
        elif "cells" in results:
            lines += evaluation_section(name, results, provenance)
        else:
            raise SystemExit(
                f"error: docs/results/{name}/results.json: not a result this page knows"
            )
    return "\n".join(lines).rstrip() + "\n"


def readme_with_glance(readme: str, sets: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    """The README with the table between its markers replaced."""
    if START not in readme or END not in readme:
        raise SystemExit(f"error: README.md lacks the markers {START} ... {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    table = "\n".join(glance_rows(sets, page_link="docs/results/README.md", authors_only=True))
    body = (
        f"{START}\n{table}\n\nNo defense and the authors' released weights; every defense "
        "and model, with the commands that made them: "
        f"[docs/results/README.md](docs/results/README.md).\n{END}"
    )
    return head + body + tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is out of date")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args()
    sets = load_sets(args.results)
    wanted = {
        args.results / "README.md": page(sets),
        args.readme: readme_with_glance(args.readme.read_text(encoding="utf-8"), sets),
    }
    stale = [path for path, text in wanted.items()
             if not path.is_file() or path.read_text(encoding="utf-8") != text]  # fmt: skip
    if args.check:
        for path in stale:
            print(f"{path} is out of date: run python scripts/results_page.py", file=sys.stderr)
        raise SystemExit(1 if stale else 0)
    for path in stale:
        path.write_text(wanted[path], encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
