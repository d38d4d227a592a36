"""The offline demo (README's main command): the pretrained zoo against the paper's attacks.

For each dataset the demo loads the shipped classifier and purifiers, attacks the first ``n``
images of the embedded class-balanced test sample with the paper's attacks (FGSM, BIM, DeepFool,
C&W) at the paper's L-inf budgets, plus PGD, and evaluates

    none | JPEG | feature squeezing | ComDefend | residual ComDefend (CIFAR-10)

in the ``oblivious`` threat model (the paper's setting: adversarials of the undefended
classifier) and under ``bpda`` (the attacker differentiates through the defense, with the
non-differentiable steps replaced by the identity on the backward pass). Each dataset gets the
full evaluation report (``results.json``, ``report.md``, ``report.html``, figures) in its own
folder; ``index.html`` and ``summary.md`` at the top gather the tables.

Budgets are in units of 1/255. The iterative and minimum-norm attacks run with the reduced
budgets in :data:`DEMO_ATTACK_PARAMS`, on 25 images per dataset by default, so that the whole
demo fits in ten minutes on two CPU cores (measured: 306 s on the 2-core development machine).
"""

from __future__ import annotations

import html
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comdefend.checkpoint import atomic_write_text
from comdefend.console import logger
from comdefend.errors import UsageError
from comdefend.zoo import ZOO_PREFIX


@dataclass(frozen=True)
class DemoDataset:
    """What the demo evaluates on one dataset."""

    classifier: str
    eps: tuple[float, ...]
    defenses: tuple[str, ...]
    description: str = ""

    def zoo_names(self) -> list[str]:
        """The shipped models this dataset's demo loads: the classifier, then the purifiers."""
        references = [self.classifier] + [
            d.split(":", 1)[1] for d in self.defenses if d.startswith("comdefend:")
        ]
        return [r.removeprefix(ZOO_PREFIX) for r in references]


#: Per dataset: zoo classifier, the paper's L-inf budgets (units of 1/255) and the defenses.
#: Feature squeezing as a defense is Xu et al.'s bit-depth reduction followed by a 2x2 median
#: filter (5 bits on CIFAR-10 as in their paper; 3 bits on the grayscale Fashion-MNIST).
DEMO_DATASETS: dict[str, DemoDataset] = {
    "fashion-mnist": DemoDataset(
        classifier="zoo:fashion-cnn",
        eps=(8.0, 25.0),
        defenses=(
            "none",
            "jpeg:75",
            "bits:3+median:2",
            "comdefend:zoo:comdefend-fashion-mnist",
        ),
        description="Fashion-MNIST: fashion-cnn classifier, ComDefend with a 4-bit code",
    ),
    "cifar10": DemoDataset(
        classifier="zoo:resnet20-cifar10",
        eps=(2.0, 8.0, 16.0),
        defenses=(
            "none",
            "jpeg:75",
            "bits:5+median:2",
            "comdefend:zoo:comdefend-cifar10",
            "comdefend:zoo:comdefend-cifar10-1_on_off",
        ),
        description="CIFAR-10: ResNet-20 classifier, ComDefend (12-bit code) and its residual "
        "variant 1_on_off",
    ),
}
#: The paper's attacks, then PGD.
DEMO_ATTACKS: tuple[str, ...] = ("fgsm", "bim", "deepfool", "cw", "pgd")
DEMO_THREAT_MODELS: tuple[str, ...] = ("oblivious", "bpda")
#: Reduced attack budgets that keep the demo within minutes (recorded in every results.json).
#: Under bpda every attack step differentiates through ComDefend (about 5 GMAC per image), so
#: DeepFool looks at the 2 most likely wrong classes for at most 10 steps and C&W runs one
#: constant for 20 Adam steps (docs/notes/adaptive-attacks.md has the full-strength settings).
DEMO_ATTACK_PARAMS: dict[str, dict[str, Any]] = {
    "bim": {"steps": 10},
    "pgd": {"steps": 10},
    "deepfool": {"steps": 10, "num_classes": 3},
    "cw": {"steps": 20, "binary_search_steps": 1, "lr": 0.05},
}


@dataclass
class DemoConfig:
    """Settings of :func:`run_demo`; the defaults are README's main command."""

    out: str = "reports/demo"
    datasets: list[str] = field(default_factory=lambda: list(DEMO_DATASETS))
    n: int = 25
    attacks: list[str] = field(default_factory=lambda: list(DEMO_ATTACKS))
    threat_models: list[str] = field(default_factory=lambda: list(DEMO_THREAT_MODELS))
    seed: int = 0
    batch_size: int = 50
    device: str = "cpu"
    force: bool = False
    progress: bool = True


#: What a demo report folder holds (``--force`` deletes a folder only if it holds nothing else).
DEMO_REPORT_ENTRIES = frozenset({"summary.json", "summary.md", "index.html", *DEMO_DATASETS})


def _check(config: DemoConfig) -> list[str]:
    datasets = [d.strip().lower() for d in config.datasets if d.strip()]
    if not datasets:
        raise UsageError(f"give at least one dataset; valid: {', '.join(DEMO_DATASETS)}")
    for name in datasets:
        if name not in DEMO_DATASETS:
            raise UsageError(f"the demo has no dataset {name!r}; valid: {', '.join(DEMO_DATASETS)}")
    if isinstance(config.n, bool) or not isinstance(config.n, int) or not 1 <= config.n <= 1000:
        raise UsageError(f"--images must be an integer in 1..1000 (the sample), got {config.n}")
    from comdefend.evaluation.harness import check_attacks, check_threat_models

    check_attacks(config.attacks)
    check_threat_models(config.threat_models)
    folder = Path(config.out)
    if folder.exists() and any(folder.iterdir()):
        if not config.force:
            raise UsageError(f"{folder} already holds a demo report; pass --force to redo it")
        # --force deletes the folder: only when everything in it is a demo report's.
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in DEMO_REPORT_ENTRIES)
        if foreign:
            raise UsageError(
                f"{folder} holds files that are not a demo report ({', '.join(foreign[:3])}); "
                "--force only replaces an earlier demo report: choose another --out"
            )
    return list(dict.fromkeys(datasets))


def _missing_weights(spec: DemoDataset) -> list[str]:
    from comdefend.zoo import list_pretrained

    shipped = set(list_pretrained())
    return [n for n in spec.zoo_names() if n not in shipped]


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns a summary (also written to ``OUT/summary.json``).

    Raises:
        UsageError: unknown dataset, bad image count, existing output folder without ``force``,
            or a zoo model missing from this install.
    """
    from comdefend.evaluation.harness import EvaluationConfig, evaluate
    from comdefend.evaluation.report import render_markdown, tables_html

    datasets = _check(config)
    for name in datasets:
        missing = _missing_weights(DEMO_DATASETS[name])
        if missing:
            raise UsageError(
                f"the demo needs the pretrained model(s) {', '.join(missing)}, which this "
                "install does not ship (see `comdefend zoo list`)"
            )
    folder = Path(config.out)
    if folder.exists() and config.force:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sections: list[dict[str, Any]] = []
    for name in datasets:
        spec = DEMO_DATASETS[name]
        params = {a: dict(DEMO_ATTACK_PARAMS[a]) for a in config.attacks if a in DEMO_ATTACK_PARAMS}
        evaluation = EvaluationConfig(
            dataset=name,
            split="sample",
            classifier=spec.classifier,
            defenses=list(spec.defenses),
            attacks=list(config.attacks),
            eps=list(spec.eps),
            threat_models=list(config.threat_models),
            n=config.n,
            seed=config.seed,
            batch_size=config.batch_size,
            out=str(folder / name),
            force=True,
            attack_params=params,
            device=config.device,
            progress=config.progress,
        )
        if config.progress:
            logger.info(f"\n== {spec.description}; {config.n} sample images ==")
        result = evaluate(evaluation)
        summary_part = result.to_dict()  # summary.json: the rows as results.json has them
        sections.append(
            {
                "dataset": name,
                "description": spec.description,
                "folder": name,
                "markdown": render_markdown(result),
                "tables_html": tables_html(result, level=3),
                "elapsed_s": result.elapsed_s,
                "clean": summary_part["clean"],
                "worst_case": summary_part["worst_case"],
            }
        )
    summary = {
        "format": "comdefend-demo/1",
        "config": {
            **config.__dict__,
            "datasets": datasets,
            "attack_params": DEMO_ATTACK_PARAMS,
        },
        "datasets": [{k: v for k, v in s.items() if k != "markdown"} for s in sections],
        "elapsed_s": round(time.time() - started, 1),
    }
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(folder / "summary.md", _summary_markdown(sections, summary))
    atomic_write_text(folder / "index.html", _index_html(sections, summary))
    summary["index"] = str(folder / "index.html")
    summary["markdown"] = [s["markdown"] for s in sections]
    return summary


def _summary_markdown(sections: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    lines = ["# comdefend demo", ""]
    lines.append(
        f"Took {summary['elapsed_s']:.0f} s. Accuracy in % on the first "
        f"{summary['config']['n']} images of the embedded sample. Full reports: "
        + ", ".join(f"[{s['dataset']}]({s['folder']}/report.html)" for s in sections)
        + "."
    )
    for section in sections:
        lines += ["", f"# {section['description']}", ""]
        body = section["markdown"].split("\n", 1)[1]  # drop the per-report title
        lines.append(body.replace("\n## ", "\n### "))
    return "\n".join(lines) + "\n"


def _index_html(sections: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    body = []
    for s in sections:
        link = f"{html.escape(s['folder'])}/report.html"
        body.append(
            f"<h2>{html.escape(s['description'])}</h2><p>{s['elapsed_s']:.0f} s; "
            f'full report with settings, figures and image grids: <a href="{link}">{link}</a>'
            f"</p>{s['tables_html']}"
        )
    config = html.escape(json.dumps(summary["config"], indent=2, default=str))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>comdefend demo</title>"
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:3px 8px;text-align:right}</style></head>"
        f"<body><h1>comdefend demo</h1><p>Accuracy in % on the first {summary['config']['n']} "
        f"images of each embedded test sample; took {summary['elapsed_s']:.0f} s.</p>"
        + "\n".join(body)
        + f"<h2>Settings</h2><pre>{config}</pre></body></html>\n"
    )


__all__ = ["DEMO_ATTACKS", "DEMO_DATASETS", "DemoConfig", "run_demo"]
