"""Adding to the zoo: register a finished run's weights, attach measurements to a card.

:func:`register_weights` is ``comdefend zoo register``: it reads the run's ``summary.json``
(config, metrics, environment), refuses the final weights of a run that collapsed (or ships its
best evaluated ones and says so), copies the checkpoint to ``weights/NAME.safetensors`` beside
the registry, measures it on the embedded sample, and writes the entry with its sha256,
provenance and card into ``registry.json`` (format :data:`~comdefend.zoo.REGISTRY_FORMAT`).

:func:`attach_results` is ``comdefend zoo card``: it reads an evaluation's ``results.json`` and
stores the entry's clean and robust accuracies on its card (:mod:`comdefend.zoo.cards`).

Example:
    >>> register_weights("my-purifier", "runs/a", command="comdefend train ...",
    ...                  hardware="1 H100", registry="my-zoo/registry.json")  # doctest: +SKIP
    >>> attach_results(["my-purifier"], "reports/a/results.json",
    ...                registry="my-zoo/registry.json")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from comdefend.checkpoint import atomic_write_text, read_metadata, sha256_of
from comdefend.errors import CheckpointError, UsageError
from comdefend.zoo import (
    REGISTRY_FORMAT,
    PretrainedEntry,
    _entry_from_dict,
    read_registry_entries,
    registry_file,
)
from comdefend.zoo.cards import (
    Measurement,
    ModelCard,
    measurements_from_results,
    merge_measurements,
    read_results,
    source_name,
)

#: A zoo name: it becomes a file name and a ``comdefend:NAME`` spec.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

#: What ``--if-collapsed`` accepts.
IF_COLLAPSED = ("refuse", "best")


def check_name(name: str) -> str:
    """A valid new zoo name (letters, digits, ``.``, ``_``, ``-``; no ``zoo:`` prefix)."""
    if not _NAME.match(name):
        raise UsageError(
            f"zoo name {name!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-' (at most 100 characters)"
        )
    return name


def write_registry(entries: Sequence[dict[str, Any]], registry: str | os.PathLike | None) -> Path:
    """Write ``entries`` as a versioned registry (atomically); returns its path."""
    path = registry_file(registry)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": REGISTRY_FORMAT, "entries": list(entries)}
    return atomic_write_text(path, json.dumps(document, indent=2) + "\n")


def _put(entries: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """``entries`` with ``entry`` replacing the one of its name where it stands (so ``zoo
    list`` keeps its order), else appended."""
    names = [e["name"] for e in entries]
    if entry["name"] in names:
        entries[names.index(entry["name"])] = entry
    else:
        entries.append(entry)
    return entries


def _weights_and_run(weights: Path) -> tuple[Path, Path]:
    """(checkpoint file, run folder) of ``--weights``: a run folder means its final weights."""
    if weights.is_dir():
        return weights / "model.safetensors", weights
    if not weights.parent.is_dir():
        raise CheckpointError(f"--weights {weights}: no such file or folder")
    return weights, weights.parent  # a missing file is reported after the collapse check


def _collapse(summary: dict[str, Any]) -> str:
    best = summary.get("best") or {}
    final = (summary.get("heldout") or {}).get("psnr_db")
    final_text = f"{final:.2f} dB" if isinstance(final, (int, float)) else "?"
    best_text = (
        f"{best['psnr_db']:.2f} dB at iteration {best['iteration']}"
        if "psnr_db" in best and "iteration" in best
        else "?"
    )
    return f"collapsed (final held-out PSNR {final_text}, best {best_text})"


def _image_size(dataset: str, config: dict[str, Any]) -> int | None:
    from comdefend.data.datasets import DATASETS

    if config.get("image_size"):
        return int(config["image_size"])
    return DATASETS.get(dataset).image_size if dataset in DATASETS else None


def derive_purpose(entry: PretrainedEntry, path: Path | None = None) -> dict[str, Any]:
    """The card's ``image_size``, ``mode`` and ``patch_size`` as the entry's files say them:
    its ``input_size``, else its training config's ``image_size``, else its dataset's image
    size; a purifier's checkpoint's default purify mode (``path``: read this file instead).
    """
    metadata = read_metadata(path or entry.path) if (path or entry.path).is_file() else {}
    training = (metadata.get("training") or {}).get("config") or {}
    size = entry.input_size or _image_size(entry.dataset, training)
    purpose: dict[str, Any] = {"image_size": size, "mode": None, "patch_size": None}
    if entry.kind == "purifier":
        model_config = metadata.get("config") or {}
        purpose["mode"] = model_config.get("purify_mode", "full")
        if purpose["mode"] == "patch":
            purpose["patch_size"] = model_config.get("patch_size")
    return purpose


def _copy(source: Path, target: Path) -> None:
    """Copy atomically: a reader never sees half a checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    try:
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def register_weights(
    name: str,
    weights: str | os.PathLike,
    *,
    command: str,
    hardware: str,
    notes: str = "",
    license: str = "MIT",
    intended_use: str = "",
    if_collapsed: str = "refuse",
    replace: bool = False,
    registry: str | os.PathLike | None = None,
    measure: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Register a finished run's weights as zoo entry ``name``.

    Args:
        name: the new entry's name (``comdefend:NAME``, ``--classifier NAME``).
        weights: the checkpoint to ship: a run's ``model.safetensors`` (final weights),
            ``best.safetensors`` (its best held-out evaluation), or the run folder (= its final
            weights). Its ``summary.json`` must lie in the same folder.
        command: the exact command that trained it.
        hardware: what it was trained on.
        notes: free text kept in the entry.
        license: the weights' license.
        intended_use: what the model is for (its card's first line).
        if_collapsed: a run whose summary says it collapsed: ``refuse`` its final weights
            (default), or ship its ``best`` ones instead and say so in the notes.
        replace: replace an entry of the same name (refused otherwise).
        registry: the ``registry.json`` to write (default: the package's); the weights go to
            ``weights/`` beside it.
        measure: record the metric on the embedded sample (``sample_*``) where the dataset has
            one.
        echo: where the one-line notices go.

    Returns:
        The entry as written.

    Raises:
        UsageError: a bad name, an existing name without ``replace``, an unknown
            ``if_collapsed``, or a collapsed run's final weights.
        CheckpointError: no checkpoint or no ``summary.json`` there.
    """
    check_name(name)
    if if_collapsed not in IF_COLLAPSED:
        raise UsageError(f"--if-collapsed must be refuse or best, got {if_collapsed!r}")
    if not command.strip() or not hardware.strip():
        raise UsageError("--command and --hardware must say how and where the model was trained")
    path = registry_file(registry)
    entries = read_registry_entries(path)
    existing = next((e for e in entries if e["name"] == name), None)
    if existing is not None and not replace:
        raise UsageError(f"{name} is already in {path}; pass --replace to replace its entry")
    source, run = _weights_and_run(Path(weights))
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        if not source.is_file():
            raise CheckpointError(f"--weights {weights}: no such checkpoint")
        raise CheckpointError(
            f"{summary_path} not found: zoo register ships the weights of a finished "
            "`comdefend train` or `train-classifier` run"
        )
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise CheckpointError(f"{summary_path}: {error}") from None
    final = run / "model.safetensors"
    if summary.get("collapsed") and source.resolve() == final.resolve():
        what = _collapse(summary)
        if if_collapsed == "refuse":
            raise UsageError(
                f"{run} {what}; register its best weights with --if-collapsed best (or "
                f"--weights {run / 'best.safetensors'}), or retrain"
            )
        source = run / "best.safetensors"
        notes += f"; the run {what}: these are its best evaluated weights"
        echo(f"{name}: the run {what}, registering best.safetensors")
    if not source.is_file():
        raise CheckpointError(f"--weights: {source} not found")
    metadata = read_metadata(source)
    kind = metadata.get("kind")
    if kind not in ("purifier", "classifier"):
        raise CheckpointError(f"{source}: unexpected checkpoint kind {kind!r}")
    config = summary.get("config") or {}
    if "dataset" not in config:
        raise CheckpointError(f"{summary_path} names no dataset in its config")
    iterations = int(summary.get("iterations", 0))
    if kind == "purifier":
        architecture = str((metadata.get("config") or {}).get("preset", "?"))
        heldout = summary.get("heldout") or {}
        training = metadata.get("training") or {}
        if source.resolve() != final.resolve() and "metrics" in training:
            heldout, iterations = training["metrics"], int(training.get("iterations", iterations))
        metrics: dict[str, Any] = {f"heldout_{k}": v for k, v in heldout.items()}
        metrics["heldout_images"] = config.get("eval_images")
    else:
        architecture = str(config.get("arch", "?"))
        metrics = {k: v for k, v in summary.items() if "accuracy" in k}
    target = path.parent / "weights" / f"{name}.safetensors"
    digest = sha256_of(source)
    card: dict[str, Any] = {"intended_use": intended_use, "measurements": []}
    if existing is not None and existing.get("sha256") == digest:
        # the same weights again: measurements of them stay true
        card["measurements"] = (existing.get("card") or {}).get("measurements", [])
    entry: dict[str, Any] = {
        "name": name,
        "file": target.name,
        "sha256": digest,
        "kind": kind,
        "dataset": config["dataset"],
        "architecture": architecture,
        "command": command,
        "metrics": metrics,
        "hardware": hardware,
        "iterations": iterations,
        "license": license,
        "notes": notes,
        "extra": {"torch": (summary.get("env") or {}).get("torch"), "seed": config.get("seed")},
        "card": card,
    }
    probe = _entry_from_dict(entry, path.parent)  # it loads, or nothing is written
    card.update(derive_purpose(probe, source))
    card["image_size"] = card["image_size"] or _image_size(config["dataset"], config)
    entry["card"] = ModelCard.from_dict(card).to_dict()  # the card's own key order
    if measure:
        # What the file gives on the embedded sample, so tests can check it stays so.
        from comdefend.data.datasets import DATASETS

        spec = DATASETS.get(entry["dataset"]) if entry["dataset"] in DATASETS else None
        if spec is not None and "sample" in spec.splits:
            from comdefend.zoo import measure_on_sample

            entry["metrics"].update(measure_on_sample(probe, path=source))
        else:
            echo(f"{name}: {entry['dataset']} has no embedded sample; no sample_* metric")
    _copy(source, target)
    write_registry(_put(entries, entry), path)
    return entry


def attach_results(
    names: Sequence[str],
    results: str | os.PathLike,
    *,
    defense: str | None = None,
    registry: str | os.PathLike | None = None,
    every: bool = False,
    source: str | None = None,
) -> dict[str, list[Measurement]]:
    """Store an evaluation's measurements of zoo entries on their cards.

    Measurements already on a card from the same results file (and the same defense, when
    ``defense`` is given) are replaced: attaching a file twice changes nothing.

    Args:
        names: the entries (``every``: none, all entries the file measures).
        results: the evaluation's ``results.json`` (or its folder).
        defense: a purifier's defense spec in the results (default: every defense that ran
            the entry's weights).
        registry: the ``registry.json`` to update (default: the package's).
        every: attach to every entry the results measure.
        source: how the cards name the file (default: its path relative to the current
            folder, e.g. ``docs/results/NAME/results.json``).

    Returns:
        The attached measurements by entry name.

    Raises:
        UsageError: contradictory arguments, an unknown name, unreadable results, or results
            that measure none of the named entries.
    """
    if every and names:
        raise UsageError("give entry names or --all, not both")
    if not every and not names:
        raise UsageError("name the entries to attach measurements to, or pass --all")
    if defense is not None and (every or len(names) > 1):
        raise UsageError("--defense selects one purifier's defense: name exactly one entry")
    path = registry_file(registry)
    entries = read_registry_entries(path)
    by_name = {e["name"]: e for e in entries}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError(
            f"unknown zoo entry {unknown[0]!r} in {path}; valid: {', '.join(by_name) or 'none'}"
        )
    data = read_results(results)
    label = source or source_name(
        Path(results) / "results.json" if Path(results).is_dir() else results
    )
    attached: dict[str, list[Measurement]] = {}
    for name in names or list(by_name):
        entry = _entry_from_dict(by_name[name], path.parent)
        found = measurements_from_results(entry, data, defense=defense, source=label)
        if found:
            attached[name] = found
    if not attached:
        what = ", ".join(names) if names else "any entry of the registry"
        raise UsageError(
            f"{results} measures {what} nowhere: no defense ran the weights' sha256 (purifiers) "
            "and the classifier is not the entry's, or has no 'none' defense (classifiers)"
        )
    for name, found in attached.items():
        entry = _entry_from_dict(by_name[name], path.parent)
        merged = merge_measurements(entry.card.measurements, found, label, defense)
        raw = dict(by_name[name])
        raw["card"] = {**entry.card.to_dict(), "measurements": [m.to_dict() for m in merged]}
        _put(entries, raw)
    write_registry(entries, path)
    return attached


def migrate_registry(registry: str | os.PathLike | None = None) -> Path:
    """Rewrite a registry in the current format, every entry with its (possibly empty) card."""
    path = registry_file(registry)
    entries = []
    for raw in read_registry_entries(path):
        entry: PretrainedEntry = _entry_from_dict(raw, path.parent)
        entries.append({**raw, "card": entry.card.to_dict()})
    return write_registry(entries, path)


__all__ = [
    "IF_COLLAPSED",
    "attach_results",
    "check_name",
    "derive_purpose",
    "migrate_registry",
    "register_weights",
    "write_registry",
]
