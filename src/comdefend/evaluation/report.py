"""Outputs of an evaluation run: ``results.json``, ``results.csv``, ``report.md``, ``report.html``.

Every file is written atomically. ``results.json``, ``results.csv``, ``report.md``,
``report.html`` and the image grid need nothing beyond the package's requirements; the plots
(accuracy and ROC curves, PNG, also embedded in the HTML as base64) need matplotlib, imported
lazily with the Agg backend (``pip install comdefend[report]``). Without it the plots are
skipped and the reports say so (:attr:`EvaluationResult.skipped`).

Every function reads the typed :class:`~comdefend.evaluation.results.EvaluationResult` (a
``results.json`` dict is accepted too and read with
:meth:`~comdefend.evaluation.results.EvaluationResult.from_dict`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from comdefend.checkpoint import atomic_write, atomic_write_text
from comdefend.defenses.detectors import MissingDependencyError
from comdefend.evaluation.results import CellResult, EvaluationResult, finite_json

#: A result, or ``results.json``'s content.
Results = EvaluationResult | Mapping[str, Any]

#: The CSV's columns: a cell's fields (:class:`CellResult`) without its attack settings (a
#: nested mapping) and its time, the note last.
CSV_FIELDS: tuple[str, ...] = (
    *(f.name for f in fields(CellResult) if f.name not in ("note", "attack_settings", "seconds")),
    "note",
)


def import_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a :class:`MissingDependencyError`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise MissingDependencyError(
            "evaluation reports need matplotlib: pip install comdefend[report]"
        ) from error
    return plt


#: Recorded in :attr:`EvaluationResult.skipped` when matplotlib is missing.
PLOTS_SKIPPED = (
    "plots skipped (accuracy.png{roc}): matplotlib is missing; pip install comdefend[report] "
    "and rerun to get them"
)


def plotting_available() -> bool:
    """Whether matplotlib can be imported (the ``report`` extra)."""
    try:
        import_pyplot()
    except MissingDependencyError:
        return False
    return True


def _percent(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "—"
    text = f"{100 * value:.1f}"
    if std:
        text += f" ± {100 * std:.1f}"
    return text


def _eps_text(eps: Any) -> str:
    return eps if isinstance(eps, str) else f"{eps:g}"


def as_result(results: Results) -> EvaluationResult:
    """``results`` as an :class:`EvaluationResult` (a ``results.json`` dict is read)."""
    if isinstance(results, EvaluationResult):
        return results
    return EvaluationResult.from_dict(dict(results))


def _table_rows(result: EvaluationResult, tm: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one threat model's table (robust accuracy %, defenses as columns)."""
    defenses = [d.spec for d in result.defenses]
    header = ["attack", "eps (/255)", *defenses]
    rows = [["clean", "—", *(_percent(c.accuracy, c.accuracy_std) for c in result.clean)]]
    by_key = {
        (c.attack, _eps_text(c.eps), c.defense): c for c in result.cells if c.threat_model == tm
    }
    order = list(dict.fromkeys((c.attack, _eps_text(c.eps)) for c in result.cells))
    for attack, eps in order:
        row = [attack, eps]
        for defense in defenses:
            cell = by_key.get((attack, eps, defense))
            if cell is None or cell.skipped:
                row.append("n/a")
            else:
                row.append(_percent(cell.robust_accuracy, cell.robust_accuracy_std))
        rows.append(row)
    worst = {(_eps_text(w.eps), w.defense): w for w in result.worst_case if w.threat_model == tm}
    for eps in dict.fromkeys(eps for _, eps in order):
        row = ["worst case", eps]
        for defense in defenses:
            w = worst.get((eps, defense))
            row.append(
                "n/a"
                if w is None
                else _percent(w.worst_case_robust_accuracy, w.worst_case_robust_accuracy_std)
            )
        rows.append(row)
    return header, rows


def _classifier_line(result: EvaluationResult) -> str:
    info = result.classifier
    if info.kind == "checkpoint":
        return f"classifier: {result.settings.classifier}"
    what = "imported factory" if info.kind == "factory" else "module passed from Python"
    return (
        f"classifier: {info.reference} ({what}, {info.module}; sha256 of its state_dict "
        f"{(info.sha256 or '')[:16]}…)"
    )


def _settings_lines(result: EvaluationResult) -> list[str]:
    config = result.settings
    lines = [
        f"dataset: {config.dataset} "
        + (
            "embedded sample (class-balanced test images)"
            if config.split == "sample"
            else "test set"
        )
        + f", first {result.dataset.n} images",
        _classifier_line(result),
        f"defenses: {', '.join(config.defenses)}",
        f"attacks: {', '.join(config.attacks)}",
        f"eps: {', '.join(f'{e:g}' for e in config.eps)} (units of 1/255; L-inf); "
        "deepfool and cw are minimum-norm L2 attacks reported as 'min-norm'",
        f"threat models: {', '.join(config.threat_models)}",
        f"seed {config.seed}, batch size {config.batch_size}, EOT samples "
        f"{config.eot_samples}, evaluation draws of randomized defenses {config.eot_draws}",
    ]
    # Settings that are the same at every eps are listed once; those that vary with eps (the
    # default step size is a multiple of eps) are listed per eps.
    per_attack: dict[str, dict[str, dict[str, Any]]] = {}
    for cell in result.cells:
        if cell.attack_settings is not None:
            settings = {k: v for k, v in cell.attack_settings.items() if k != "eps"}
            per_attack.setdefault(cell.attack, {})[str(cell.eps)] = settings
    for name, by_eps in per_attack.items():
        keys = set().union(*(s.keys() for s in by_eps.values()))
        common = {
            k: v
            for k, v in next(iter(by_eps.values())).items()
            if all(s.get(k) == v for s in by_eps.values())
        }
        varying = sorted(keys - set(common))
        text = json.dumps(common, default=str)
        if varying:
            text += "; per eps: " + ", ".join(
                f"{eps}: "
                + ", ".join(
                    f"{k}={s.get(k):.6g}" if isinstance(s.get(k), float) else f"{k}={s.get(k)}"
                    for k in varying
                )
                for eps, s in by_eps.items()
            )
        lines.append(f"attack {name}: {text}")
    env = result.provenance.environment
    lines.append(f"comdefend {env.get('comdefend')}, torch {env.get('torch')}")
    if len(result.provenance.environments) > 1:  # a run resumed on other machines
        lines.append(f"computed on {machines(result.provenance.environments)}")
    for path, digest in result.provenance.checkpoints.items():
        lines.append(f"sha256 {digest[:16]}… {path}")
    return lines


def machines(environments: list[dict[str, Any]]) -> str:
    """The machines of a run in a few words (CPU or GPU, torch's kernels).

    Example:
        >>> machines([{"cpu": "AMD EPYC", "cpu_capability": "AVX2", "torch": "2.13.0"},
        ...           {"cpu": "Intel Xeon", "cpu_capability": "AVX512", "cuda_device": "H100"}])
        'AMD EPYC (AVX2); H100'
    """
    names = []
    for environment in environments:
        name = environment.get("cuda_device") or (
            f"{environment.get('cpu', 'a CPU')} ({environment.get('cpu_capability', '?')})"
        )
        if name not in names:
            names.append(name)
    return "; ".join(names)


def _notes(result: EvaluationResult, tm: str) -> list[str]:
    return sorted(
        {f"{c.defense}: {c.note}" for c in result.cells if c.threat_model == tm and c.note}
    )


def render_markdown(results: Results) -> str:
    """The paper-style tables: one per threat model, rows attack × eps, columns defenses."""
    result = as_result(results)
    out = ["# Adversarial robustness evaluation", "", "## Settings", ""]
    out += [f"- {line}" for line in _settings_lines(result)]
    out += ["", "Values: accuracy in % (± std over evaluation draws for randomized defenses).", ""]
    for tm, meaning in result.threat_models.items():
        header, rows = _table_rows(result, tm)
        out += [f"## Threat model: {tm}", "", f"{meaning}.", ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(row) + " |" for row in rows]
        notes = _notes(result, tm)
        if notes:
            out += ["", "Notes:", ""] + [f"- {note}" for note in notes]
        out.append("")
    detectors = result.detectors
    if detectors.get("results"):
        out += ["## Detectors (oblivious adversarials of the undefended classifier)", ""]
        names = [k for k in detectors["info"] if k != "skipped"]
        columns = " | ".join(f"{n} AUC | {n} TPR@5%FPR" for n in names)
        out.append(f"| attack | eps | {columns} |")
        out.append("|---|---|" + "---|---|" * len(names))
        for row in detectors["results"]:
            values = []
            for name in names:
                values += [f"{row[name]['roc_auc']:.3f}", _percent(row[name]["tpr_at_5fpr"])]
            out.append(f"| {row['attack']} | {_eps_text(row['eps'])} | {' | '.join(values)} |")
        out.append("")
    elif detectors.get("info", {}).get("skipped"):
        out += ["## Detectors", "", f"Skipped: {detectors['info']['skipped']}", ""]
    if result.skipped:
        out += ["## Not in this report", ""] + [f"- {line}" for line in result.skipped]
        out.append("")
    return "\n".join(out)


def write_csv(path: str | os.PathLike, cells: list[CellResult] | list[dict[str, Any]]) -> Path:
    """One row per cell (:data:`CSV_FIELDS`)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in cells:
        cell = row.to_dict() if isinstance(row, CellResult) else row
        writer.writerow({k: ("" if cell.get(k) is None else cell.get(k)) for k in CSV_FIELDS})
    return atomic_write_text(path, buffer.getvalue())


def _save_figure(figure: Any, path: Path) -> Path:
    plt = import_pyplot()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)
    return path


def accuracy_figure(results: Results, path: Path) -> Path | None:
    """Worst-case robust accuracy vs eps per defense, one subplot per threat model."""
    result = as_result(results)
    rows = [w for w in result.worst_case if not isinstance(w.eps, str)]
    if not rows:
        return None
    plt = import_pyplot()
    tms = list(result.threat_models)
    figure, axes = plt.subplots(1, len(tms), figsize=(4.5 * len(tms), 3.6), squeeze=False)
    for ax, tm in zip(axes[0], tms, strict=True):
        for number, defense in enumerate(d.spec for d in result.defenses):
            points = sorted(
                (float(w.eps), 100 * w.worst_case_robust_accuracy)
                for w in rows
                if w.threat_model == tm and w.defense == defense
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=defense, color=f"C{number % 10}")
        ax.set_title(tm)
        ax.set_xlabel("eps (/255)")
        ax.set_ylabel("worst-case robust accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    return _save_figure(figure, path)


def roc_figure(results: Results, path: Path) -> Path | None:
    """Detector ROC curves, one subplot per detector, one curve per (attack, eps)."""
    detectors = as_result(results).detectors
    if not detectors.get("results"):
        return None
    plt = import_pyplot()
    names = [k for k in detectors["info"] if k != "skipped"]
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for row in detectors["results"]:
            data = row[name]
            label = f"{row['attack']} {_eps_text(row['eps'])} (AUC {data['roc_auc']:.2f})"
            ax.plot(data["roc_fpr"], data["roc_tpr"], label=label)
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":")
        ax.set_title(name)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.legend(fontsize=6)
    figure.tight_layout()
    return _save_figure(figure, path)


def grid_figure(grid: dict[str, Any], path: Path) -> Path | None:
    """Clean / adversarial / amplified difference / purified rows (see ``save_grid``)."""
    from comdefend.evaluation.grids import save_grid

    if not grid:
        return None
    rows: list[torch.Tensor] = [grid["clean"], grid["adversarial"], grid["difference"]]
    labels = ["clean", "adversarial", "diff x10"]
    for spec, images in grid.get("purified", {}).items():
        rows.append(images)
        labels.append(f"purified {spec}"[:18])
    return save_grid(path, rows, labels=labels)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _embedded(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(alt)} ({html.escape(path.name)})</figcaption></figure>"
    )


def tables_html(results: Results, level: int = 2) -> str:
    """One HTML table per threat model (robust accuracy %), with its meaning and notes."""
    result = as_result(results)
    parts = []
    for tm, meaning in result.threat_models.items():
        header, rows = _table_rows(result, tm)
        parts.append(
            f"<h{level}>Threat model: {html.escape(tm)}</h{level}><p>{html.escape(meaning)}.</p>"
        )
        parts.append(_html_table(header, rows))
        notes = _notes(result, tm)
        if notes:
            parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return "\n".join(parts)


def render_html(results: Results, figures: dict[str, Path]) -> str:
    """The Markdown report's tables as HTML, with the figures embedded as base64 PNG."""
    result = as_result(results)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<title>Adversarial robustness evaluation</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
        "padding:3px 8px;text-align:right}img{max-width:100%}</style></head><body>",
        "<h1>Adversarial robustness evaluation</h1><h2>Settings</h2><ul>",
        *(f"<li>{html.escape(line)}</li>" for line in _settings_lines(result)),
        "</ul><p>Values: accuracy in % (± std over evaluation draws for randomized defenses).</p>",
    ]
    parts.append(tables_html(result))
    detectors = result.detectors
    if detectors.get("results"):
        names = [k for k in detectors["info"] if k != "skipped"]
        header = ["attack", "eps"] + [f"{n} {m}" for n in names for m in ("AUC", "TPR@5%FPR")]
        rows = []
        for row in detectors["results"]:
            values = [row["attack"], _eps_text(row["eps"])]
            for name in names:
                values += [f"{row[name]['roc_auc']:.3f}", _percent(row[name]["tpr_at_5fpr"])]
            rows.append(values)
        parts += ["<h2>Detectors</h2>", _html_table(header, rows)]
    titles = {
        "accuracy": "Worst-case robust accuracy vs eps",
        "grid": "Clean / adversarial / amplified difference / purified",
        "roc": "Detector ROC curves",
    }
    if result.skipped:
        parts.append("<h2>Not in this report</h2><ul>")
        parts += [f"<li>{html.escape(line)}</li>" for line in result.skipped]
        parts.append("</ul>")
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_embedded(path, titles.get(name, name)) for name, path in figures.items()]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    results: Results, out: str | os.PathLike, grid: dict[str, Any] | None = None
) -> EvaluationResult:
    """Write every output of an evaluation run into ``out``; returns the result as written
    (its :attr:`~EvaluationResult.files` listing the files).

    Without matplotlib (the ``report`` extra) the plots are skipped and a line saying so (and how
    to get them) is added to :attr:`~EvaluationResult.skipped`; everything else is written.
    """
    result = as_result(results)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    skipped = [line for line in result.skipped if not line.startswith("plots ")]
    if plotting_available():
        for name, maker in (("accuracy", accuracy_figure), ("roc", roc_figure)):
            path = maker(result, folder / f"{name}.png")
            if path is not None:
                figures[name] = path
    else:
        has_roc = bool(result.detectors.get("results"))
        skipped.append(PLOTS_SKIPPED.format(roc=", roc.png" if has_roc else ""))
    grid_path = grid_figure(grid or {}, folder / "grid.png")
    if grid_path is not None:
        figures["grid"] = grid_path
    files = ["results.json", "results.csv", "report.md", "report.html"]
    files += [p.name for p in figures.values()]
    result = result.with_files(files, skipped)
    result.save(folder / "results.json")
    write_csv(folder / "results.csv", result.cells)
    atomic_write_text(folder / "report.md", render_markdown(result))
    atomic_write_text(folder / "report.html", render_html(result, figures))
    return result


__all__ = [
    "CSV_FIELDS",
    "PLOTS_SKIPPED",
    "accuracy_figure",
    "as_result",
    "finite_json",
    "grid_figure",
    "import_pyplot",
    "plotting_available",
    "render_html",
    "render_markdown",
    "roc_figure",
    "tables_html",
    "write_csv",
    "write_report",
]
