"""The result of an evaluation run as typed records: :class:`EvaluationResult`.

One object holds every number of a run and where it came from: the settings
(:class:`~comdefend.evaluation.config.EvaluationConfig`), the provenance (classifier, checkpoint
hashes, environment), the clean accuracy of each defense, one :class:`CellResult` per
(attack, eps, defense, threat model), the worst case over attacks and the detectors. The report,
the command line, the demo and ``results.json`` all read it; ``results.json`` is
:meth:`EvaluationResult.to_dict` (format ``comdefend-evaluation/1``) and
:meth:`EvaluationResult.from_dict` reads it back, including files written before these types
existed.

Example:
    >>> result = EvaluationResult.load("reports/fm/results.json")  # doctest: +SKIP
    >>> result.cell("pgd", 8, "jpeg:75", "bpda").robust_accuracy  # doctest: +SKIP
    0.42
    >>> [c.robust_accuracy for c in result.select(defense="none")]  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from comdefend.errors import UsageError
from comdefend.evaluation.config import EvaluationConfig

#: ``results.json``'s ``format``.
RESULTS_FORMAT = "comdefend-evaluation/1"
#: ``results.json``'s ``eps_unit``: how to read every eps of a run.
EPS_UNIT = "1/255 (an eps of 8 is an L-inf budget of 8/255 on images in [0, 1])"


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None`` (strict JSON).

    Example:
        >>> finite_json({"a": [1.0, float("nan")], "b": float("inf")})
        {'a': [1.0, None], 'b': None}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def _eps_equal(a: float | str, b: float | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return float(a) == float(b)


@dataclass(frozen=True)
class ClassifierInfo:
    """Which classifier was evaluated (``results.json``'s ``classifier``).

    Attributes:
        reference: what was given: a checkpoint path or zoo name, ``package.module:factory``,
            or, for a module passed from Python, its class ``package.module.Class``
            (``path`` in ``results.json``).
        kind: ``checkpoint`` (a file or a zoo name), ``factory`` (imported and called) or
            ``module`` (an ``nn.Module`` passed from Python).
        sha256: what the numbers depend on: the checkpoint file's sha256, or for a factory or a
            module the sha256 of its ``state_dict`` tensors
            (:func:`comdefend.data.datasets.tensors_sha256`).
        module: the model's class, ``package.module.Class``.
        weights: the resolved checkpoint (:meth:`comdefend.zoo.WeightsRef.to_dict`), or ``None``.
        config: the checkpoint's classifier config, or ``None``.
        recorded_metrics: the metrics stored in the checkpoint.
    """

    reference: str
    kind: str = "checkpoint"
    sha256: str | None = None
    module: str | None = None
    weights: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    recorded_metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.reference,
            "kind": self.kind,
            "sha256": self.sha256,
            "module": self.module,
            "weights": self.weights,
            "config": self.config,
            "recorded_metrics": self.recorded_metrics,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ClassifierInfo:
        weights = data.get("weights")
        sha256 = data.get("sha256")
        if sha256 is None and isinstance(weights, dict):  # written before ``sha256`` was
            sha256 = weights.get("sha256")
        return ClassifierInfo(
            reference=str(data.get("path", "")),
            kind=str(data.get("kind", "checkpoint")),
            sha256=sha256,
            module=data.get("module"),
            weights=weights,
            config=data.get("config"),
            recorded_metrics=dict(data.get("recorded_metrics") or {}),
        )


@dataclass(frozen=True)
class Provenance:
    """Where the numbers come from.

    Attributes:
        classifier: the evaluated classifier and its sha256.
        checkpoints: sha256 of every model file or user module, by its reference.
        environment: versions and platform (``comdefend``, ``torch``, ``python``, ...) of the
            machine that finished the run.
        environments: every machine that computed a part of the numbers (a run resumed
            elsewhere has several: float kernels differ between CPU kinds and GPUs, so its
            numbers can differ slightly from those of one machine).
    """

    classifier: ClassifierInfo
    checkpoints: dict[str, str] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    environments: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class DatasetInfo:
    """The evaluated images: dataset ``name``, ``split``, count ``n`` and ``source`` (folder
    or embedded sample)."""

    name: str
    split: str
    n: int
    source: str


@dataclass(frozen=True)
class DefenseInfo:
    """One evaluated defense: its ``spec`` (the name its cells use), its ``name`` (the spec it
    would be rebuilt from, with every option) and its ``settings``."""

    spec: str
    name: str
    settings: dict[str, Any]


@dataclass(frozen=True)
class CleanResult:
    """A defense on the clean images: accuracy (mean over evaluation draws) and its standard
    deviation, the number of draws, PSNR of the purified images against the clean ones (``None``
    when they are identical), and whether the defense is randomized."""

    defense: str
    accuracy: float
    accuracy_std: float
    draws: int
    psnr_purified_db: float | None
    randomized: bool


@dataclass(frozen=True)
class CellResult:
    """One (attack, eps, defense, threat model) of a run.

    Attributes:
        attack: attack name.
        eps: the budget in units of 1/255, or ``"min-norm"`` (DeepFool, C&W).
        eps_value: the budget on images in [0, 1] (``eps / 255``), ``None`` for min-norm.
        defense: the defense's spec (:attr:`DefenseInfo.spec`).
        threat_model: the requested threat model.
        effective_threat_model: the one the adversarials were crafted under (``None``: skipped).
        status: ``ok``, ``reused`` (same as another cell, see ``note``) or ``skipped`` (the
            threat model does not apply; the numbers below are ``None``).
        note: why a cell is reused or skipped, or how it was computed.
        clean_accuracy, clean_accuracy_std: the defended classifier on the clean images.
        robust_accuracy, robust_accuracy_std: on the adversarial images (mean and standard
            deviation over evaluation draws of randomized defenses).
        attack_success_rate: fraction of the correctly classified clean images the attack flips.
        mean_l2, mean_linf: mean perturbation norms.
        psnr_purified_db: PSNR of the purified adversarial images against the clean ones.
        n: images; draws: evaluation draws.
        attacker_model: what the attacker differentiated (``classifier`` when oblivious).
        attack_settings: the attack's hyper-parameters.
        seconds: time spent on the cell.
    """

    attack: str
    eps: float | str
    eps_value: float | None
    defense: str
    threat_model: str
    effective_threat_model: str | None
    status: str
    note: str | None = None
    clean_accuracy: float | None = None
    clean_accuracy_std: float | None = None
    robust_accuracy: float | None = None
    robust_accuracy_std: float | None = None
    attack_success_rate: float | None = None
    mean_l2: float | None = None
    mean_linf: float | None = None
    psnr_purified_db: float | None = None
    n: int | None = None
    draws: int | None = None
    attacker_model: str | None = None
    attack_settings: dict[str, Any] | None = None
    seconds: float | None = None

    @property
    def skipped(self) -> bool:
        return self.status == "skipped"

    def to_dict(self) -> dict[str, Any]:
        """``results.json``'s form: a skipped cell has no numbers."""
        values = asdict(self)
        if self.skipped:
            for name in CELL_METRICS:
                values.pop(name)
        return values

    @staticmethod
    def from_dict(data: dict[str, Any]) -> CellResult:
        known = {f.name for f in fields(CellResult)}
        return CellResult(**{k: v for k, v in data.items() if k in known})


_CELL_FIELDS = tuple(f.name for f in fields(CellResult))
#: Numbers a computed cell has and a skipped one has not: every field after ``note``.
CELL_METRICS: tuple[str, ...] = _CELL_FIELDS[_CELL_FIELDS.index("note") + 1 :]


@dataclass(frozen=True)
class WorstCaseResult:
    """Per (defense, threat model, eps): an image counts as robust only if it resists every
    attack in ``attacks`` (skipped cells left out)."""

    defense: str
    threat_model: str
    eps: float | str
    attacks: list[str]
    worst_case_robust_accuracy: float
    worst_case_robust_accuracy_std: float
    n: int


def _from_dict(cls: Any, data: dict[str, Any]) -> Any:
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


#: ``results.json``'s keys in the order they are written.
_KEYS = (
    "format",
    "config",
    "eps_unit",
    "environment",
    "environments",
    "checkpoints",
    "classifier",
    "dataset",
    "defenses",
    "threat_models",
    "clean",
    "cells",
    "worst_case",
    "detectors",
    "elapsed_s",
    "resumed_groups",
    "processes",
    "work",
    "skipped",
    "files",
)


@dataclass(frozen=True)
class EvaluationResult:
    """Everything one evaluation run measured, and the settings and weights behind it.

    Attributes:
        settings: the run's settings (``config`` in ``results.json``).
        provenance: the classifier, the sha256 of every model, the environment.
        dataset: the evaluated images.
        defenses: the evaluated defenses, in order.
        threat_models: the evaluated threat models and what each means.
        clean: one :class:`CleanResult` per defense.
        cells: one :class:`CellResult` per (attack, eps, threat model, defense).
        worst_case: the worst case over attacks per (defense, threat model, eps).
        detectors: detector calibration (``info``) and one row per (attack, eps) (``results``);
            empty without detectors.
        elapsed_s: wall-clock seconds (a resumed run adds the interrupted run's).
        resumed_groups: (attack, eps) groups read back from an interrupted run.
        processes: processes that shared the images (torchrun).
        work: images purified by this run, and adversarial images left unchanged by the attack
            (their clean result reused), and saved batches of an unfinished group read back.
        skipped: what the report leaves out and why (missing optional packages).
        files: the files written into the report folder (empty without one).
        extra: keys of a ``results.json`` this version does not know, kept as read.

    Example:
        >>> result = evaluate(classifier=model, dataset="fashion-mnist", split="sample",
        ...                   attacks=["fgsm"], eps=[8], n=8)  # doctest: +SKIP
        >>> result.cell("fgsm", 8, "none").robust_accuracy  # doctest: +SKIP
        >>> result.save("results.json")  # doctest: +SKIP
        >>> EvaluationResult.load("results.json") == result  # doctest: +SKIP
        True
    """

    settings: EvaluationConfig
    provenance: Provenance
    dataset: DatasetInfo
    defenses: list[DefenseInfo]
    threat_models: dict[str, str]
    clean: list[CleanResult]
    cells: list[CellResult]
    worst_case: list[WorstCaseResult]
    detectors: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0
    resumed_groups: int = 0
    processes: int = 1
    work: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- reading ------------------------------------------------------------------------------
    @property
    def classifier(self) -> ClassifierInfo:
        return self.provenance.classifier

    def select(
        self,
        *,
        attack: str | None = None,
        eps: float | str | None = None,
        defense: str | None = None,
        threat_model: str | None = None,
        status: str | None = None,
    ) -> list[CellResult]:
        """The cells matching every given field, in run order."""
        return [
            cell
            for cell in self.cells
            if (attack is None or cell.attack == attack)
            and (eps is None or _eps_equal(cell.eps, eps))
            and (defense is None or cell.defense == defense)
            and (threat_model is None or cell.threat_model == threat_model)
            and (status is None or cell.status == status)
        ]

    def cell(
        self, attack: str, eps: float | str, defense: str, threat_model: str = "oblivious"
    ) -> CellResult:
        """The one cell of (``attack``, ``eps``, ``defense``, ``threat_model``).

        Raises:
            KeyError: the run has no such cell (the message lists what it has).
        """
        found = self.select(attack=attack, eps=eps, defense=defense, threat_model=threat_model)
        if not found:
            raise KeyError(
                f"no cell ({attack}, {eps}, {defense}, {threat_model}); attacks "
                f"{sorted({c.attack for c in self.cells})}, defenses "
                f"{[d.spec for d in self.defenses]}, threat models {list(self.threat_models)}"
            )
        return found[0]

    def clean_accuracy(self, defense: str) -> float:
        """The clean accuracy behind ``defense`` (``KeyError`` for an unknown one)."""
        for row in self.clean:
            if row.defense == defense:
                return row.accuracy
        raise KeyError(f"no defense {defense!r}; defenses {[d.spec for d in self.defenses]}")

    # -- serialising --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``results.json``'s content (plain JSON types; NaN and infinities as ``None``)."""
        values: dict[str, Any] = {
            "format": RESULTS_FORMAT,
            "config": asdict(self.settings),
            "eps_unit": EPS_UNIT,
            "environment": dict(self.provenance.environment),
            "environments": [dict(e) for e in self.provenance.environments],
            "checkpoints": dict(self.provenance.checkpoints),
            "classifier": self.provenance.classifier.to_dict(),
            "dataset": asdict(self.dataset),
            "defenses": [asdict(d) for d in self.defenses],
            "threat_models": dict(self.threat_models),
            "clean": [asdict(row) for row in self.clean],
            "cells": [cell.to_dict() for cell in self.cells],
            "worst_case": [asdict(row) for row in self.worst_case],
            "detectors": self.detectors,
            "elapsed_s": self.elapsed_s,
            "resumed_groups": self.resumed_groups,
            "processes": self.processes,
            "work": dict(self.work),
            "skipped": list(self.skipped),
            "files": list(self.files),
            **{k: v for k, v in self.extra.items() if k not in _KEYS},
        }
        # a JSON round trip: tuples become lists, as they are when read back
        return json.loads(json.dumps(finite_json(values), default=str, allow_nan=False))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> EvaluationResult:
        """Read ``results.json``'s content (also files written by earlier versions).

        Raises:
            UsageError: not an evaluation's results (the message says what is missing).
        """
        if not isinstance(data, dict):
            raise UsageError(f"evaluation results must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("config", "classifier", "dataset", "cells") if k not in data]
        if missing or data.get("format", RESULTS_FORMAT) != RESULTS_FORMAT:
            raise UsageError(
                f"not the results of `comdefend evaluate` (format {data.get('format')!r}, "
                f"missing {', '.join(missing) or 'nothing'})"
            )
        config = data["config"]
        known = {f.name for f in fields(EvaluationConfig)}
        settings = EvaluationConfig(**{k: v for k, v in config.items() if k in known})
        return EvaluationResult(
            settings=settings,
            provenance=Provenance(
                classifier=ClassifierInfo.from_dict(data["classifier"]),
                checkpoints=dict(data.get("checkpoints") or {}),
                environment=dict(data.get("environment") or {}),
                # results of earlier versions name only the machine that finished them
                environments=[
                    dict(e)
                    for e in data.get("environments")
                    or ([data["environment"]] if data.get("environment") else [])
                ],
            ),
            dataset=_from_dict(DatasetInfo, data["dataset"]),
            defenses=[_from_dict(DefenseInfo, d) for d in data.get("defenses", [])],
            threat_models=dict(data.get("threat_models") or {}),
            clean=[_from_dict(CleanResult, row) for row in data.get("clean", [])],
            cells=[CellResult.from_dict(cell) for cell in data["cells"]],
            worst_case=[_from_dict(WorstCaseResult, row) for row in data.get("worst_case", [])],
            detectors=dict(data.get("detectors") or {}),
            elapsed_s=float(data.get("elapsed_s", 0.0)),
            resumed_groups=int(data.get("resumed_groups", 0)),
            processes=int(data.get("processes", 1)),
            work=dict(data.get("work") or {}),
            skipped=list(data.get("skipped") or []),
            files=list(data.get("files") or []),
            extra={k: v for k, v in data.items() if k not in _KEYS},
        )

    def to_json(self) -> str:
        """:meth:`to_dict` as indented, strict JSON text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` (atomically); returns the path."""
        from comdefend.checkpoint import atomic_write_text

        return atomic_write_text(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike) -> EvaluationResult:
        """Read a ``results.json`` written by :meth:`save` or ``comdefend evaluate``."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot read evaluation results {path}: {error}") from None
        return EvaluationResult.from_dict(data)

    def with_files(self, files: list[str], skipped: list[str]) -> EvaluationResult:
        """A copy listing the report's ``files`` and what it ``skipped``."""
        return replace(self, files=list(files), skipped=list(skipped))

    def to_markdown(self) -> str:
        """The report's tables (:func:`comdefend.evaluation.report.render_markdown`)."""
        from comdefend.evaluation.report import render_markdown

        return render_markdown(self)


__all__ = [
    "EPS_UNIT",
    "CELL_METRICS",
    "RESULTS_FORMAT",
    "CellResult",
    "ClassifierInfo",
    "CleanResult",
    "DatasetInfo",
    "DefenseInfo",
    "EvaluationResult",
    "Provenance",
    "WorstCaseResult",
    "finite_json",
]
