"""Model cards: what a zoo entry is for, how it was made, and what it measured, with conditions.

Every entry of ``registry.json`` carries a ``card``:

- what it is for: ``intended_use`` (one or two sentences), ``image_size`` (the side of the
  images it was trained on) and, for purifiers, ``mode`` (``full``: whole images, or ``patch``:
  independent ``patch_size`` tiles), the purify mode its checkpoint defaults to;
- ``measurements``: clean and robust accuracies, each a :class:`Measurement` with every
  condition the number depends on (threat model, attack, budget in units of 1/255, steps,
  classifier, images) and the ``results.json`` it was read from.

Training provenance (command, hardware, iterations, training metrics, notes, license) stays in
the entry's own fields; :func:`card_dict` and :func:`render_card` put both together.

Numbers on a card are never typed: :func:`measurements_from_results` reads them from an
evaluation's ``results.json`` (``comdefend evaluate``; the plain JSON of
:class:`comdefend.evaluation.EvaluationResult`, any version) and ``comdefend zoo card`` stores
them. Where nothing was measured the card says so and gives the command that would measure it
(:func:`measure_command`).

Example:
    >>> from comdefend.zoo import get_entry
    >>> from comdefend.zoo.cards import headline, render_card
    >>> entry = get_entry("comdefend-fashion-mnist")
    >>> text = render_card(entry)  # what `comdefend zoo show comdefend-fashion-mnist` prints
    >>> entry.card.image_size, entry.card.mode
    (28, 'full')
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comdefend.errors import UsageError

if TYPE_CHECKING:
    from comdefend.zoo import PretrainedEntry

#: ``Measurement.metric`` values.
CLEAN = "clean_accuracy"
ROBUST = "robust_accuracy"
WORST_CASE = "worst_case_robust_accuracy"
METRICS = (CLEAN, ROBUST, WORST_CASE)

#: The budget a headline prefers (8/255, the one most papers quote on CIFAR-10).
HEADLINE_EPS = 8.0

#: Shown where a number does not exist.
NOT_MEASURED = "not measured yet"

#: Attack settings a card names in their own words (not in :meth:`Measurement.settings_text`).
_SHOWN_ELSEWHERE = frozenset({"name", "eps", "steps", "seed", "num_classes"})


@dataclass(frozen=True)
class Measurement:
    """One number measured by an evaluation, with every condition it depends on.

    Attributes:
        metric: ``clean_accuracy``, ``robust_accuracy`` (one attack) or
            ``worst_case_robust_accuracy`` (an image counts only if it resists every attack in
            ``attacks``).
        value: the accuracy in [0, 1] (mean over ``draws`` for a randomized defense).
        images: how many test images it was measured on.
        dataset: the evaluated dataset (``cifar10``, ``imagenet``, ...).
        split: its split (``test``, ``sample``).
        classifier: the classifier behind the defense (zoo name, else the reference given).
        classifier_sha256: that classifier's sha256 as the results record it.
        defense: the defense spec as the results name it (``none`` on a classifier's card).
        source: the ``results.json`` the number was read from.
        threat_model: ``oblivious``, ``bpda``, ``bpda+eot``, ``relaxed`` (``None`` when clean).
        attack: the attack (``None`` when clean; ``worst-case`` for the worst case).
        attacks: the attacks a worst case is taken over.
        eps: the L-inf budget in units of 1/255, or ``min-norm`` (DeepFool, C&W).
        steps: the attack's iterations, where it has any.
        attack_settings: every hyper-parameter of the attack, as recorded.
        purify_mode: ``full`` or ``patch``: how the purifier ran in this evaluation.
        std: standard deviation over ``draws`` (0 for a deterministic defense).
        draws: evaluation draws of a randomized defense (1 otherwise).
    """

    metric: str
    value: float
    images: int
    dataset: str
    split: str
    classifier: str
    classifier_sha256: str | None
    defense: str
    source: str
    threat_model: str | None = None
    attack: str | None = None
    attacks: tuple[str, ...] = ()
    eps: float | str | None = None
    steps: int | None = None
    attack_settings: dict[str, Any] = field(default_factory=dict)
    purify_mode: str | None = None
    std: float = 0.0
    draws: int = 1

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["attacks"] = list(self.attacks)
        return values

    @staticmethod
    def from_dict(data: dict[str, Any]) -> Measurement:
        known = {f.name for f in fields(Measurement)}
        values = {k: v for k, v in data.items() if k in known}
        values["attacks"] = tuple(values.get("attacks") or ())
        values["attack_settings"] = dict(values.get("attack_settings") or {})
        return Measurement(**values)

    @property
    def robust(self) -> bool:
        return self.metric != CLEAN

    def budget(self) -> str:
        """``8/255``, ``min-norm`` or ``""`` (clean)."""
        if self.eps is None:
            return ""
        if isinstance(self.eps, str):
            return self.eps
        return f"{self.eps:g}/255"

    def what(self) -> str:
        """The attack and its budget: ``pgd 8/255, 10 steps``, ``worst of fgsm, bim at
        8/255``, ``clean``."""
        if not self.robust:
            return "clean"
        if self.metric == WORST_CASE:
            return f"worst of {', '.join(self.attacks)} at {self.budget()}"
        steps = f", {self.steps} steps" if self.steps else ""
        return f"{self.attack} {self.budget()}{steps}"

    def settings_text(self) -> str:
        """The attack's other hyper-parameters: ``alpha=2/255, random_start=True``."""
        shown = []
        for key, value in self.attack_settings.items():
            if key in _SHOWN_ELSEWHERE or value is None:
                continue
            if key == "alpha" and isinstance(value, (int, float)):
                shown.append(f"alpha={value * 255:.4g}/255")
            elif isinstance(value, float):
                shown.append(f"{key}={value:.4g}")
            else:
                shown.append(f"{key}={value}")
        return ", ".join(shown)

    def condition(self) -> str:
        """Every condition in one line (without the source file)."""
        parts = [self.threat_model] if self.threat_model else []
        parts.append(self.what())
        mode = f" ({self.purify_mode} mode)" if self.purify_mode else ""
        parts.append("no defense" if self.defense == "none" else f"defense {self.defense}{mode}")
        parts.append(f"classifier {self.classifier}")
        parts.append(f"{self.dataset} {self.split}, {self.images:,} images")
        return ", ".join(parts)

    def percent(self, digits: int = 2) -> str:
        """``92.12%``, or ``92.12% ± 0.30 (3 draws)``."""
        text = f"{100 * self.value:.{digits}f}%"
        if self.draws > 1:
            text += f" ± {100 * self.std:.{digits}f} ({self.draws} draws)"
        return text


@dataclass(frozen=True)
class ModelCard:
    """What a zoo entry is for, and what it measured.

    Attributes:
        intended_use: what to use it for, in a sentence or two.
        image_size: the side of the (square) images it was trained on.
        mode: purifiers: the purify mode its checkpoint defaults to (``full`` or ``patch``);
            ``None`` for classifiers.
        patch_size: the tile side in ``patch`` mode.
        measurements: the numbers read from evaluations' ``results.json``.
    """

    intended_use: str = ""
    image_size: int | None = None
    mode: str | None = None
    patch_size: int | None = None
    measurements: tuple[Measurement, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "intended_use": self.intended_use,
            "image_size": self.image_size,
            "mode": self.mode,
            "patch_size": self.patch_size,
            "measurements": [m.to_dict() for m in self.measurements],
        }

    @staticmethod
    def from_dict(data: dict[str, Any] | None) -> ModelCard:
        data = data or {}
        return ModelCard(
            intended_use=str(data.get("intended_use") or ""),
            image_size=data.get("image_size"),
            mode=data.get("mode"),
            patch_size=data.get("patch_size"),
            measurements=tuple(Measurement.from_dict(m) for m in data.get("measurements") or ()),
        )


# -- reading an evaluation's results ---------------------------------------------------------


def read_results(results: str | os.PathLike | dict[str, Any] | Any) -> dict[str, Any]:
    """An evaluation's results as plain JSON: from a ``results.json`` path, a dict, or an
    object with ``to_dict()`` (:class:`comdefend.evaluation.EvaluationResult`).

    Raises:
        UsageError: unreadable, or not the results of ``comdefend evaluate``.
    """
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        if path.is_dir():
            path = path / "results.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"results file not found: {path}") from None
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read evaluation results {path}: {error}") from None
        where = str(path)
    elif isinstance(results, dict):
        data, where = results, "the results"
    elif hasattr(results, "to_dict"):
        data, where = results.to_dict(), type(results).__name__
    else:
        raise UsageError(f"evaluation results must be a path or a dict, got {type(results)}")
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        kind = data.get("kind") if isinstance(data, dict) else None
        hint = f" (a {kind} result)" if kind else ""
        raise UsageError(
            f"{where} is not the results of `comdefend evaluate`{hint}: it has no 'cells'"
        )
    fmt = data.get("format", "comdefend-evaluation/1")
    if not str(fmt).startswith("comdefend-evaluation/"):
        raise UsageError(f"{where} has format {fmt!r}, not comdefend-evaluation/N")
    return data


def _classifier(results: dict[str, Any]) -> tuple[str, str | None]:
    """(the classifier's name, its sha256) from either layout of ``results.json``."""
    info = results.get("classifier")
    config = results.get("config") or {}
    if not isinstance(info, dict):  # the oldest layout: only the config names it
        return str(info or config.get("classifier", "?")), None
    weights: dict[str, Any] = info["weights"] if isinstance(info.get("weights"), dict) else {}
    reference = str(info.get("path") or info.get("reference") or config.get("classifier", "?"))
    name = str(weights.get("zoo_name") or reference)
    sha256 = info.get("sha256") or weights.get("sha256")
    if sha256 is None:
        checkpoints = results.get("checkpoints") or {}
        sha256 = checkpoints.get(weights.get("path")) or checkpoints.get(reference)
    return name, sha256


def _dataset(results: dict[str, Any]) -> tuple[str, str, int | None]:
    info: dict[str, Any] = results["dataset"] if isinstance(results.get("dataset"), dict) else {}
    config = results.get("config") or {}
    name = info.get("name") or config.get("dataset") or "?"
    split = info.get("split") or config.get("split") or "test"
    n = info.get("n") if info.get("n") is not None else config.get("n")
    return str(name), str(split), None if n is None else int(n)


def defense_settings(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each evaluated defense's settings by its spec (``{}`` where the layout has none)."""
    found: dict[str, dict[str, Any]] = {}
    for item in results.get("defenses") or []:
        if isinstance(item, dict):
            found[str(item.get("spec") or item.get("name"))] = dict(item.get("settings") or {})
        else:  # a bare list of specs
            found[str(item)] = {}
    for cell in results.get("cells", []):
        found.setdefault(str(cell.get("defense")), {})
    return found


def _spec_names(spec: str, name: str) -> bool:
    """Whether a defense spec names zoo entry ``name`` (``comdefend:NAME[@...]``,
    ``comdefend:zoo:NAME[@...]``); used only when the results record no weights."""
    if not spec.startswith("comdefend:"):
        return False
    reference = spec[len("comdefend:") :].split("@")[0]
    return reference in (name, f"zoo:{name}")


def _is_entry(settings: dict[str, Any], spec: str, entry: PretrainedEntry) -> bool:
    weights = settings.get("weights")
    if isinstance(weights, dict) and weights.get("sha256"):
        return bool(weights["sha256"] == entry.sha256)
    return _spec_names(spec, entry.name)


def _weights_sha256(settings: dict[str, Any]) -> str | None:
    weights = settings.get("weights")
    return weights.get("sha256") if isinstance(weights, dict) else None


def _eps(value: Any) -> float | str | None:
    if value is None or isinstance(value, str):
        return value
    return float(value)


def _defense_measurements(
    results: dict[str, Any],
    defense: str,
    settings: dict[str, Any],
    source: str,
) -> list[Measurement]:
    classifier, classifier_sha256 = _classifier(results)
    dataset, split, n = _dataset(results)
    common: dict[str, Any] = {
        "dataset": dataset,
        "split": split,
        "classifier": classifier,
        "classifier_sha256": classifier_sha256,
        "defense": defense,
        "source": source,
        "purify_mode": settings.get("purify_mode"),
    }
    found: list[Measurement] = []
    for row in results.get("clean") or []:
        if row.get("defense") == defense and row.get("accuracy") is not None:
            images = row.get("n", n)
            if images is None:
                continue
            found.append(
                Measurement(
                    metric=CLEAN,
                    value=float(row["accuracy"]),
                    images=int(images),
                    std=float(row.get("accuracy_std") or 0.0),
                    draws=int(row.get("draws") or 1),
                    **common,
                )
            )
    for cell in results["cells"]:
        if cell.get("defense") != defense or cell.get("status") == "skipped":
            continue
        if cell.get("robust_accuracy") is None or cell.get("n") is None:
            continue
        attack_settings = dict(cell.get("attack_settings") or {})
        steps = attack_settings.get("steps")
        found.append(
            Measurement(
                metric=ROBUST,
                value=float(cell["robust_accuracy"]),
                images=int(cell["n"]),
                threat_model=cell.get("effective_threat_model") or cell.get("threat_model"),
                attack=str(cell.get("attack")),
                eps=_eps(cell.get("eps")),
                steps=None if steps is None else int(steps),
                attack_settings=attack_settings,
                std=float(cell.get("robust_accuracy_std") or 0.0),
                draws=int(cell.get("draws") or 1),
                **common,
            )
        )
    for row in results.get("worst_case") or []:
        if row.get("defense") != defense or row.get("worst_case_robust_accuracy") is None:
            continue
        found.append(
            Measurement(
                metric=WORST_CASE,
                value=float(row["worst_case_robust_accuracy"]),
                images=int(row.get("n", n or 0)),
                threat_model=row.get("threat_model"),
                attack="worst-case",
                attacks=tuple(row.get("attacks") or ()),
                eps=_eps(row.get("eps")),
                std=float(row.get("worst_case_robust_accuracy_std") or 0.0),
                **common,
            )
        )
    return found


def measurements_from_results(
    entry: PretrainedEntry,
    results: str | os.PathLike | dict[str, Any] | Any,
    *,
    defense: str | None = None,
    source: str | None = None,
) -> list[Measurement]:
    """The measurements of zoo ``entry`` in an evaluation's results.

    A purifier's are those of every defense that ran its weights (matched by sha256; by the
    spec ``comdefend:NAME`` where the results record no weights), or only of ``defense``. A
    classifier's are the undefended (``none``) rows of an evaluation of that classifier.
    Compositions (``bits:3+comdefend:...``) are not the entry's own numbers and are left out.

    Args:
        entry: the zoo entry.
        results: a ``results.json`` path, its parsed content, or an ``EvaluationResult``.
        defense: a purifier's defense spec as the results name it (default: every one that
            ran the entry's weights).
        source: what the measurements record as their source (default: the path as given).

    Returns:
        Clean, per-attack and worst-case measurements, in the results' order (empty when the
        results do not measure the entry).

    Raises:
        UsageError: unreadable results; ``defense`` not in them, or not this entry's weights;
            ``defense`` given for a classifier.

    Example:
        >>> from comdefend.zoo import get_entry
        >>> found = measurements_from_results(
        ...     get_entry("comdefend-fashion-mnist"),
        ...     "docs/results/fashion-test-10000/results.json")  # doctest: +SKIP
        >>> found[0].metric, found[0].images  # doctest: +SKIP
        ('clean_accuracy', 10000)
    """
    data = read_results(results)
    if source is None:
        source = str(results) if isinstance(results, (str, os.PathLike)) else "(in memory)"
    specs = defense_settings(data)
    if entry.kind == "classifier":
        if defense is not None:
            raise UsageError(
                f"--defense selects a purifier's defense; {entry.name} is a classifier, whose "
                "card takes the results' undefended ('none') rows"
            )
        _, sha256 = _classifier(data)
        if sha256 != entry.sha256 or "none" not in specs:
            return []
        return _defense_measurements(data, "none", specs["none"], source)
    if defense is not None:
        if defense not in specs:
            raise UsageError(
                f"defense {defense!r} is not in {source}; its defenses: {', '.join(specs)}"
            )
        digest = _weights_sha256(specs[defense])
        if digest is not None and digest != entry.sha256:
            raise UsageError(
                f"defense {defense!r} in {source} ran weights with sha256 {digest[:12]}..., "
                f"not {entry.name}'s ({entry.sha256[:12]}...)"
            )
        if digest is None and not _spec_names(defense, entry.name):
            raise UsageError(
                f"{source} records no weights for defense {defense!r}, and its spec does not "
                f"name {entry.name}"
            )
        chosen = [defense]
    else:
        chosen = [
            spec
            for spec, settings in specs.items()
            if settings.get("type") != "Compose"
            and "+" not in spec
            and _is_entry(settings, spec, entry)
        ]
    found: list[Measurement] = []
    for spec in chosen:
        found.extend(_defense_measurements(data, spec, specs[spec], source))
    return found


def source_name(path: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """How a card names a results file: relative to ``root`` (default: the current folder)
    when it lies below it, else absolute; always with ``/``."""
    resolved = Path(path).resolve()
    base = Path(root or Path.cwd()).resolve()
    try:
        return resolved.relative_to(base).as_posix()
    except ValueError:
        return resolved.as_posix()


def merge_measurements(
    old: Sequence[Measurement], new: Sequence[Measurement], source: str, defense: str | None
) -> list[Measurement]:
    """``old`` without what ``new`` replaces (the same source, and the same defense when one
    was chosen), then ``new``: attaching a results file twice changes nothing."""
    kept = [
        m for m in old if not (m.source == source and (defense is None or m.defense == defense))
    ]
    return kept + list(new)


# -- the headline and the card ---------------------------------------------------------------


def headline(
    measurements: Iterable[Measurement], dataset: str | None = None
) -> tuple[Measurement, Measurement | None] | None:
    """The robust accuracy a list quotes, and the clean accuracy of the same run and defense.

    Results on ``dataset`` (the model's own, when given) come first, then an adaptive threat
    model (anything but ``oblivious``), then the budget closest to 8/255, then the most
    images; within that run, defense and budget the lowest robust accuracy (the worst case
    over attacks where the run has one). ``None`` when nothing robust was measured.
    """
    robust = [m for m in measurements if m.robust and not isinstance(m.eps, str)]
    if not robust:
        return None

    def group(m: Measurement) -> tuple[Any, ...]:
        return (m.source, m.dataset, m.defense, m.classifier, m.threat_model, m.eps)

    def preference(m: Measurement) -> tuple[Any, ...]:
        eps = float(m.eps) if m.eps is not None and not isinstance(m.eps, str) else 0.0
        foreign = dataset is not None and m.dataset != dataset
        return (foreign, m.threat_model == "oblivious", abs(eps - HEADLINE_EPS), -m.images)

    best_group = group(min(robust, key=preference))
    members = [m for m in robust if group(m) == best_group]
    worst = min(members, key=lambda m: (m.value, m.metric != WORST_CASE))
    clean = next(
        (
            m
            for m in measurements
            if m.metric == CLEAN
            and (m.source, m.defense, m.classifier)
            == (worst.source, worst.defense, worst.classifier)
        ),
        None,
    )
    return worst, clean


def headline_text(entry: PretrainedEntry) -> str:
    """The compact column of ``comdefend zoo list``: ``58.9% (oblivious, worst of ... at 8/255,
    fashion-cnn, 10,000 images)`` or ``—``."""
    chosen = headline(entry.card.measurements, entry.dataset)
    if chosen is None:
        return "—"
    robust, _ = chosen
    return (
        f"{robust.percent(1)} ({robust.threat_model}, {robust.what()}, {robust.classifier}, "
        f"{robust.images:,} images)"
    )


def clean_text(entry: PretrainedEntry) -> str:
    """The clean accuracy beside the headline, or ``—``."""
    chosen = headline(entry.card.measurements, entry.dataset)
    if chosen is None or chosen[1] is None:
        clean = [m for m in entry.card.measurements if m.metric == CLEAN]
        return max(clean, key=lambda m: m.images).percent(1) if clean else "—"
    return chosen[1].percent(1)


def _default_classifier(entry: PretrainedEntry, classifiers: Sequence[PretrainedEntry]) -> str:
    for candidate in classifiers:
        if candidate.kind == "classifier" and candidate.dataset == entry.dataset:
            return candidate.name
    return "CLASSIFIER"


def measure_command(
    entry: PretrainedEntry,
    classifiers: Sequence[PretrainedEntry] = (),
    *,
    threat_models: str = "oblivious,bpda",
) -> str:
    """The commands that would measure ``entry`` and attach the numbers to its card.

    Args:
        entry: the zoo entry.
        classifiers: the zoo's entries, to pick a classifier of the entry's dataset for a
            purifier (else the placeholder ``CLASSIFIER``).
        threat_models: for a purifier (a classifier alone is attacked white-box, oblivious).
    """
    out = f"reports/card-{entry.name}"
    data_dir = " --data-dir DIR" if entry.dataset == "imagenet" else ""
    if entry.kind == "classifier":
        defenses = "--defense none"
        classifier = entry.name
        threat_models = "oblivious"
    else:
        defenses = f"--defense none --defense comdefend:{entry.name}"
        classifier = _default_classifier(entry, classifiers)
    return (
        f"comdefend evaluate --dataset {entry.dataset}{data_dir} --classifier {classifier} "
        f"{defenses} --attack fgsm,bim,pgd --eps 8 --threat-model {threat_models} "
        f"--images 500 --out {out} && comdefend zoo card {entry.name} --results "
        f"{out}/results.json"
    )


def _purpose(entry: PretrainedEntry) -> dict[str, Any]:
    card = entry.card
    return {
        "dataset": entry.dataset,
        "image_size": card.image_size,
        "mode": card.mode,
        "patch_size": card.patch_size,
        "intended_use": card.intended_use,
    }


def _provenance(entry: PretrainedEntry) -> dict[str, Any]:
    return {
        "architecture": entry.architecture,
        "command": entry.command,
        "hardware": entry.hardware,
        "iterations": entry.iterations,
        "training_metrics": dict(entry.metrics),
        "notes": entry.notes,
        "license": entry.license,
        "file": entry.file,
        "sha256": entry.sha256,
        "source": None if entry.source is None else entry.source.to_dict(),
        "extra": dict(entry.extra),
    }


def _adaptive_missing(entry: PretrainedEntry) -> bool:
    return entry.kind == "purifier" and not any(
        m.robust and m.threat_model not in (None, "oblivious") for m in entry.card.measurements
    )


def card_dict(entry: PretrainedEntry, zoo: Sequence[PretrainedEntry] = ()) -> dict[str, Any]:
    """The whole card as JSON (``comdefend zoo show NAME --json``).

    Keys: ``name``, ``kind``, ``purpose`` (dataset, image size, mode, intended use),
    ``provenance`` (command, hardware, iterations, training metrics, notes, license, file and
    sha256), ``measurements``, ``headline`` (``{"robust": ..., "clean": ...}`` or ``None``),
    ``not_measured`` (what is missing: ``robust``, ``adaptive``) and ``measure_command``.
    """
    chosen = headline(entry.card.measurements, entry.dataset)
    missing = []
    if chosen is None:
        missing.append("robust")
    if _adaptive_missing(entry):
        missing.append("adaptive")
    return {
        "name": entry.name,
        "kind": entry.kind,
        "purpose": _purpose(entry),
        "provenance": _provenance(entry),
        "measurements": [m.to_dict() for m in entry.card.measurements],
        "headline": None
        if chosen is None
        else {
            "robust": chosen[0].to_dict(),
            "clean": None if chosen[1] is None else chosen[1].to_dict(),
        },
        "not_measured": missing,
        "measure_command": measure_command(entry, zoo),
    }


def purpose_text(entry: PretrainedEntry) -> str:
    """``28x28 images, full mode`` (a purifier) or ``224x224 images`` (a classifier)."""
    card = entry.card
    size = f"{card.image_size}x{card.image_size} images" if card.image_size else "image size ?"
    if card.mode == "patch":
        return f"{size}, patch mode ({card.patch_size}x{card.patch_size} tiles)"
    if card.mode:
        return f"{size}, {card.mode} mode"
    return size


def _measurement_lines(measurements: Sequence[Measurement]) -> list[str]:
    lines: list[str] = []
    runs: dict[tuple[Any, ...], list[Measurement]] = {}
    for m in measurements:
        key = (m.source, m.defense, m.purify_mode, m.classifier, m.dataset, m.split)
        runs.setdefault(key, []).append(m)
    for (source, defense, mode, classifier, dataset, split), rows in runs.items():
        images = sorted({m.images for m in rows})
        count = ", ".join(f"{n:,}" for n in images)
        what = "no defense" if defense == "none" else f"defense {defense}"
        what += f" ({mode} mode)" if mode else ""
        lines.append(f"  from {source}")
        lines.append(f"    {dataset} {split}, {count} images, classifier {classifier}, {what}")
        width = max(len(m.threat_model or "") for m in rows)
        for m in rows:
            threat = (m.threat_model or "").ljust(width)
            count_note = f"  {m.images:,} images" if len(images) > 1 else ""
            details = f"  {m.settings_text()}" if m.settings_text() else ""
            lines.append(f"    {threat}  {m.what():<44} {m.percent():>8}{count_note}{details}")
    return lines


def render_card(entry: PretrainedEntry, zoo: Sequence[PretrainedEntry] = ()) -> str:
    """The card as text (``comdefend zoo show NAME``)."""
    card = entry.card
    title = "ComDefend purifier" if entry.kind == "purifier" else "classifier"
    lines = [f"{entry.name}: {title} ({entry.architecture}), {entry.dataset}", ""]
    lines.append("What it is for")
    lines.append(f"  dataset: {entry.dataset}; trained on {purpose_text(entry)}")
    if card.intended_use:
        lines.append(f"  use: {card.intended_use}")
    lines.append("")
    lines.append("Measured accuracy (eps in units of 1/255 on images in [0, 1])")
    chosen = headline(card.measurements, entry.dataset)
    if chosen is not None:
        robust, clean = chosen
        quoted = f"  headline: robust {robust.percent()} ({robust.condition()})"
        if clean is not None:
            quoted += f"; clean {clean.percent()}"
        lines.append(quoted)
        lines.append(f"    source: {robust.source}")
    if card.measurements:
        lines.extend(_measurement_lines(card.measurements))
    if chosen is None:
        lines.append(f"  robust accuracy: {NOT_MEASURED}")
    if _adaptive_missing(entry):
        lines.append(f"  adaptive (bpda): {NOT_MEASURED}")
    if chosen is None or _adaptive_missing(entry):
        lines.append(f"  to measure: {measure_command(entry, zoo)}")
    lines.append("")
    lines.append("Training provenance")
    lines.append(f"  command: {entry.command}")
    lines.append(f"  hardware: {entry.hardware}")
    lines.append(f"  iterations: {entry.iterations:,}")
    if entry.metrics:
        metrics = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.metrics.items()
        )
        lines.append(f"  training metrics: {metrics}")
    if entry.notes:
        lines.append(f"  notes: {entry.notes}")
    lines.append(f"  license: {entry.license}")
    lines.append(f"  file: {entry.file} (sha256 {entry.sha256})")
    if entry.source is not None:
        lines.append(f"  converted from: {entry.source.package} {entry.source.version}".rstrip())
    return "\n".join(lines)


__all__ = [
    "CLEAN",
    "METRICS",
    "NOT_MEASURED",
    "ROBUST",
    "WORST_CASE",
    "Measurement",
    "ModelCard",
    "card_dict",
    "clean_text",
    "defense_settings",
    "headline",
    "headline_text",
    "measure_command",
    "measurements_from_results",
    "merge_measurements",
    "purpose_text",
    "read_results",
    "render_card",
    "source_name",
]
