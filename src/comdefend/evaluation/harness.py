"""Adversarial-robustness evaluation of classifier + defense pipelines over a grid of cells.

A *cell* is one (attack, eps, defense, threat model). For every cell the harness crafts
adversarial examples against the attacker's model of the threat model and measures the real
pipeline ``classifier(defense(x_adv))``.

Budgets (``eps``) are given in units of 1/255 (pixel levels of an 8-bit image): ``eps = 8``
means an L-inf budget of 8/255 on images in [0, 1]. ``eps = 0`` is allowed and leaves the images
untouched. The L2 minimum-norm attacks (``deepfool``, ``cw``) take no budget here: they run once
per cell without one and are reported under the eps label ``"min-norm"``.

Threat models (see :mod:`comdefend.defenses.adaptive`):

``oblivious``
    Adversarial examples of the undefended classifier, computed once per (attack, eps) and
    shared by every defense, then purified by the defense.
``bpda``, ``bpda+eot``, ``relaxed``
    The attacker differentiates through
    :func:`~comdefend.defenses.make_threat_model_defense` ``(defense, tm, classifier)``; the
    result is evaluated on the real (hard) defense.

Decisions recorded in every cell (``status`` and ``note``):

* defense ``none``: every threat model equals ``oblivious``; the oblivious result is reused
  (``status = "reused"``).
* ``bpda+eot`` on a non-randomized defense: falls back to ``bpda`` exactly as the helper does
  (no EOT wrapper); the ``bpda`` result is reused (``status = "reused"``).
* ``relaxed`` on a defense without ComDefend: not applicable, ``status = "skipped"`` with the
  helper's reason; such cells are left out of the worst case.
* a differentiable defense (e.g. ``median``) under ``bpda``: the attacker gets exact gradients.

Randomized defenses (ComDefend with test-time noise) are evaluated ``eot_draws`` times with
different, fixed noise seeds; accuracies are averaged and their standard deviation over draws is
reported. The draw seeds depend only on (seed, defense, draw, batch), so clean and adversarial
evaluations see the same noise (common random numbers): ``eps = 0`` gives exactly the clean
accuracy.

Example:
    >>> config = EvaluationConfig(dataset="fashion-mnist", classifier="cls.safetensors",
    ...     defenses=["none", "jpeg:75"], attacks=["fgsm"], eps=[0, 8], n=100)  # doctest: +SKIP
    >>> results = evaluate(config)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comdefend.attacks import ATTACKS
from comdefend.defenses import (
    DETECTORS,
    THREAT_MODELS,
    ComDefendDefense,
    Defense,
    Identity,
    make_threat_model_defense,
    parse_defense,
)
from comdefend.errors import ComDefendError, UsageError
from comdefend.evaluation.crafting import comdefend_parts, craft
from comdefend.evaluation.detection import (
    DETECTOR_FPR,
    DETECTOR_TRAIN_IMAGES,
    ROC_SKIPPED,
    Detectors,
    fit_detectors,
)
from comdefend.evaluation.distributed import ProcessGroup
from comdefend.evaluation.progress import (
    PROGRESS_FILE,
    EvaluationProgress,
    fingerprint,
    group_key,
)
from comdefend.evaluation.records import CellRecord, CleanRecord, GroupRecord
from comdefend.evaluation.report import finite_json
from comdefend.evaluation.scoring import (
    Scorer,
    accuracy_stats,
    cell_metrics,
    finite_or_none,
    perturbation_norms,
)
from comdefend.evaluation.seeding import Batches, derive_seed
from comdefend.evaluation.worst_case import worst_case
from comdefend.metrics import psnr_from_mse
from comdefend.zoo import WeightsRef

__all__ = [
    "DETECTOR_FPR",
    "DETECTOR_TRAIN_IMAGES",
    "EvaluationConfig",
    "derive_seed",
    "evaluate",
    "validate_config",
]

#: Attacks without an L-inf budget: run once, reported under :data:`MIN_NORM`.
MIN_NORM_ATTACKS: tuple[str, ...] = ("deepfool", "cw")
MIN_NORM = "min-norm"
#: One line per threat model, for reports.
THREAT_MODEL_MEANINGS: dict[str, str] = {tm.name: tm.meaning for tm in THREAT_MODELS.values()}
GRID_IMAGES = 8


@dataclass
class EvaluationConfig:
    """Everything one evaluation run needs; serialised verbatim into ``results.json``.

    Attributes:
        dataset: ``fashion-mnist``, ``cifar10`` or ``cifar100``.
        split: ``test`` (the test set) or ``sample`` (the 1,000 class-balanced test images
            embedded in the package; Fashion-MNIST and CIFAR-10).
        classifier: classifier checkpoint path or zoo name (e.g. ``resnet20-cifar10``).
        defenses: defense specs (see :func:`comdefend.defenses.parse_defense`).
        attacks: attack names (see :data:`comdefend.attacks.ATTACKS`).
        eps: L-inf budgets in units of 1/255, each in [0, 255].
        threat_models: subset of :data:`comdefend.defenses.THREAT_MODELS`.
        n: number of test images (the first ``n``).
        seed: master seed of every random choice.
        batch_size: images per attack / forward call.
        data_dir: dataset folder (``None``: ``$COMDEFEND_DATA`` or the defaults).
        out: output folder for :func:`comdefend.evaluation.report.write_report` (optional).
        force: allow writing into an existing ``out`` folder (an interrupted run there is
            discarded).
        resume: continue the interrupted run in ``out`` (same settings): its finished
            (attack, eps) groups are read back (see :mod:`comdefend.evaluation.progress`).
        eot_samples: EOT draws of the attacker under ``bpda+eot``.
        eot_draws: evaluation draws of randomized defenses.
        detectors: subset of :data:`DETECTORS`.
        detector_holdout: clean test images after the first ``n`` used to calibrate the
            detectors' thresholds (at most; fewer if the test set ends).
        attack_params: extra hyper-parameters per attack, e.g. ``{"pgd": {"steps": 20}}``.
        device: ``cpu``, ``cuda`` or ``auto``.
        progress: show a tqdm bar.
    """

    dataset: str
    classifier: str
    split: str = "test"
    defenses: list[str] = field(default_factory=lambda: ["none"])
    attacks: list[str] = field(default_factory=lambda: ["fgsm", "pgd"])
    eps: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0, 16.0])
    threat_models: list[str] = field(default_factory=lambda: ["oblivious"])
    n: int = 1000
    seed: int = 0
    batch_size: int = 100
    data_dir: str | None = None
    out: str | None = None
    force: bool = False
    resume: bool = False
    eot_samples: int = 8
    eot_draws: int = 3
    detectors: list[str] = field(default_factory=list)
    detector_holdout: int = 1000
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    progress: bool = True


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_names(names: Sequence[str], valid: Sequence[str], what: str) -> list[str]:
    chosen = [name.strip().lower() for name in names]
    if not chosen:
        raise UsageError(f"give at least one {what}; valid: {', '.join(valid)}")
    for name in chosen:
        if name not in valid:
            raise UsageError(f"unknown {what} {name!r}; valid {what}s: {', '.join(valid)}")
    return chosen


def check_attacks(names: Sequence[str]) -> list[str]:
    """Normalised attack names; UsageError listing the valid ones for an unknown or empty list."""
    return _check_names(names, list(ATTACKS), "attack")


def check_threat_models(names: Sequence[str]) -> list[str]:
    """Normalised threat-model names; UsageError listing the valid ones otherwise."""
    return _check_names(names, list(THREAT_MODELS), "threat model")


def validate_config(config: EvaluationConfig) -> EvaluationConfig:
    """Check every cheap argument (no files read) and return a normalised copy.

    Raises:
        UsageError: unknown attack, threat model or detector; eps outside [0, 255]; n < 1;
            bad batch size or EOT counts; the output folder exists without ``force``. Messages
            list the valid choices.
    """
    attacks = check_attacks(config.attacks)
    for name in config.attack_params:
        if name.lower() not in attacks:
            raise UsageError(f"parameters given for attack {name!r}, which is not evaluated")
    tms = check_threat_models(config.threat_models)
    eps: list[float] = []
    for value in config.eps:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"eps must be numbers (units of 1/255), got {value!r}")
        number = float(value)
        if not math.isfinite(number) or not 0.0 <= number <= 255.0:
            raise UsageError(
                f"eps {value:g} is out of range: eps are in units of 1/255 and must lie in "
                "[0, 255] (e.g. 8 means 8/255)"
            )
        eps.append(number)
    if not eps and any(a not in MIN_NORM_ATTACKS for a in attacks):
        raise UsageError("give at least one eps for the L-inf attacks (units of 1/255)")
    detectors = [d.strip().lower() for d in config.detectors]
    for name in detectors:
        if name not in DETECTORS:
            raise UsageError(f"unknown detector {name!r}; valid: {', '.join(DETECTORS)}")
    if not config.defenses:
        raise UsageError("give at least one defense (e.g. none, jpeg:75, comdefend:PATH)")
    _int_at_least("n", config.n, 1)
    _int_at_least("batch size", config.batch_size, 1)
    _int_at_least("eot samples", config.eot_samples, 1)
    _int_at_least("eot draws", config.eot_draws, 1)
    _int_at_least("seed", config.seed, 0)
    _int_at_least("detector holdout", config.detector_holdout, 2)
    if config.device not in ("cpu", "cuda", "auto") and not config.device.startswith("cuda:"):
        raise UsageError(f"unknown device {config.device!r}; valid: cpu, cuda, auto")
    _check_out_folder(config)
    return EvaluationConfig(
        **{
            **asdict(config),
            "attacks": list(dict.fromkeys(attacks)),
            "threat_models": [t for t in THREAT_MODELS if t in tms],
            "eps": sorted(set(eps)),
            "detectors": list(dict.fromkeys(detectors)),
            "defenses": list(dict.fromkeys(d.strip() for d in config.defenses)),
            "attack_params": {k.lower(): dict(v) for k, v in config.attack_params.items()},
        }
    )


def _check_out_folder(config: EvaluationConfig) -> None:
    if config.resume and config.force:
        raise UsageError("--resume continues a run, --force starts it over: give one of them")
    if config.out is None:
        if config.resume:
            raise UsageError("--resume needs the report folder (--out) of the interrupted run")
        return
    folder = Path(config.out)
    interrupted = (folder / PROGRESS_FILE).is_file()
    if config.resume:
        if folder.exists() and not interrupted:
            finished = (folder / "results.json").is_file()
            raise UsageError(
                f"--resume: {folder} holds no interrupted evaluation"
                + (" (its evaluation finished; pass --force to run it again)" if finished else "")
            )
        return  # a folder that does not exist yet: nothing to resume, a fresh run
    if folder.exists() and not config.force:
        hint = (
            " (it holds an interrupted evaluation: pass --resume to continue it)"
            if interrupted
            else ""
        )
        raise UsageError(f"output folder {folder} exists; pass --force to overwrite it{hint}")


def _check_classifier_fits(classifier: nn.Module, path: str, dataset: str) -> None:
    from comdefend.models.classifiers import check_classifier_fits

    check_classifier_fits(classifier, dataset, label=path)


def _comdefend_parts(defense: nn.Module) -> list[ComDefendDefense]:
    return comdefend_parts(defense)


def _checkpoint_refs(defense: nn.Module) -> list[WeightsRef]:
    return [p.model.weights for p in _comdefend_parts(defense) if p.model.weights is not None]


def _resolve_device(name: str) -> torch.device:
    from comdefend.training.run import resolve_device

    return resolve_device(name)


class _Evaluator:
    """The run's models and images (loaded by every process)."""

    def __init__(self, config: EvaluationConfig, device: torch.device) -> None:
        from comdefend.data.datasets import load_dataset
        from comdefend.models.classifiers import load_classifier

        self.config = config
        self.device = device
        self.classifier = load_classifier(config.classifier, self.device).eval()
        _check_classifier_fits(self.classifier, config.classifier, config.dataset)
        self.classifier.requires_grad_(False)
        self.defenses: list[Defense] = [parse_defense(s, self.device) for s in config.defenses]
        if config.split not in ("test", "sample"):
            raise UsageError(f"unknown split {config.split!r}; valid: test, sample")
        test = load_dataset(config.dataset, config.split, config.data_dir)
        for spec, defense in zip(config.defenses, self.defenses, strict=True):
            for part in _comdefend_parts(defense):
                part.model.requires_grad_(False)
                if part.model.config.image_channels != test.channels:
                    raise UsageError(
                        f"defense {spec} takes {part.model.config.image_channels}-channel images "
                        f"but {config.dataset} has {test.channels}"
                    )
        self.test = test
        data = test.head(config.n)
        self.x = data.float_images()
        self.y = data.labels.long()
        self.n = len(data)
        self.data_source = data.source
        num_classes = getattr(getattr(self.classifier, "config", None), "num_classes", None)
        self.num_classes: int | None = num_classes

    def craft(
        self,
        attack: str,
        eps: float | None,
        model: nn.Module,
        key: tuple[Any, ...],
        batches: Batches,
        numbers: list[int],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return craft(
            attack,
            eps,
            model,
            key,
            x=self.x,
            y=self.y,
            batches=batches,
            numbers=numbers,
            seed=self.config.seed,
            params=self.config.attack_params.get(attack, {}),
            num_classes=self.num_classes,
            device=self.device,
        )


def _eps_plan(config: EvaluationConfig, attack: str) -> list[tuple[float | str, float | None]]:
    if attack in MIN_NORM_ATTACKS:
        return [(MIN_NORM, None)]
    return [(e, e / 255.0) for e in config.eps]


@dataclass(frozen=True)
class PlannedCell:
    """One (threat model, defense) cell of every (attack, eps) and how it is computed.

    Attributes:
        threat_model: the requested threat model.
        defense_index: position of the defense in the run's defenses; ``spec`` its name.
        effective: the threat model the adversarials are crafted under, or ``"skip"``.
        note: recorded in the cell (e.g. why a result is reused).
        reason: why the cell is skipped.
    """

    threat_model: str
    defense_index: int
    spec: str
    effective: str
    note: str | None
    reason: str | None


def _plan_cell(defense: Defense, tm: str) -> tuple[str, str | None, str | None]:
    """(effective threat model or ``"skip"``, note, reason for a skip)."""
    if isinstance(defense, Identity):
        if tm == "oblivious":
            return "oblivious", None, None
        return "oblivious", "no defense: every threat model equals oblivious (reused)", None
    if tm == "oblivious":
        return "oblivious", None, None
    if tm == "relaxed" and not _comdefend_parts(defense):
        try:
            make_threat_model_defense(defense, tm)
        except UsageError as error:
            return "skip", None, str(error)
    if tm == "bpda+eot" and not defense.randomized:
        return "bpda", "defense not randomized: bpda+eot falls back to bpda (reused)", None
    if bool(getattr(defense, "differentiable", False)) and tm == "bpda":
        return tm, "defense differentiable: the attacker uses exact gradients", None
    return tm, None, None


def plan_cells(config: EvaluationConfig, defenses: list[Defense]) -> list[PlannedCell]:
    """The cells of one (attack, eps), threat model by threat model, defense by defense."""
    plan = []
    for tm in config.threat_models:
        for index, (spec, defense) in enumerate(zip(config.defenses, defenses, strict=True)):
            effective, note, reason = _plan_cell(defense, tm)
            plan.append(PlannedCell(tm, index, spec, effective, note, reason))
    return plan


def _fit_detectors(ev: _Evaluator) -> Detectors:
    """Fit and calibrate the requested detectors (every process fits the same ones)."""
    from comdefend.data.datasets import load_dataset

    config = ev.config
    if not config.detectors:
        return Detectors()
    train = load_dataset(config.dataset, "train", config.data_dir)
    train_x = train.head(DETECTOR_TRAIN_IMAGES).float_images()
    holdout_n = min(config.detector_holdout, len(ev.test) - ev.n)
    holdout = None
    if holdout_n >= 2:
        holdout = ev.test.subset(torch.arange(ev.n, ev.n + holdout_n)).float_images()
    return fit_detectors(
        config.detectors, ev.classifier, train_x, holdout, config.batch_size, ev.device, ev.n
    )


@dataclass
class _Shard:
    """This process's images: batch numbers, positions and images."""

    batches: Batches
    numbers: list[int]
    positions: torch.Tensor
    x: torch.Tensor


def _craft_and_score_group(
    ev: _Evaluator,
    scorer: Scorer,
    detectors: Detectors,
    plan: list[PlannedCell],
    shard: _Shard,
    clean: CleanRecord,
    attack: str,
    eps_label: float | str,
    eps_value: float | None,
    want_grid: bool,
) -> GroupRecord:
    """One (attack, eps) on this process's images: every computed cell's per-image record.

    Oblivious adversarials are crafted once and shared by every defense (and the detectors);
    each (defense, effective threat model) is computed once."""
    config = ev.config
    oblivious: tuple[torch.Tensor, dict[str, Any]] | None = None
    detector_scores: dict[str, torch.Tensor] = {}
    if detectors.detectors:
        oblivious = ev.craft(
            attack, eps_value, ev.classifier, (attack, eps_label), shard.batches, shard.numbers
        )
        detector_scores = detectors.score(oblivious[0], ev.device)
    records: list[CellRecord] = []
    done: set[tuple[int, str]] = set()
    for cell in plan:
        key = (cell.defense_index, cell.effective)
        if cell.effective == "skip" or key in done:
            continue
        done.add(key)
        started = time.perf_counter()
        if cell.effective == "oblivious":
            if oblivious is None:
                oblivious = ev.craft(
                    attack,
                    eps_value,
                    ev.classifier,
                    (attack, eps_label),
                    shard.batches,
                    shard.numbers,
                )
            x_adv, settings = oblivious
            attacker = "classifier"
        else:
            defense = ev.defenses[cell.defense_index]
            model = make_threat_model_defense(
                defense, cell.effective, ev.classifier, eot_samples=config.eot_samples
            )
            assert model is not None
            model.eval()
            attacker = getattr(model, "name", type(model).__name__)
            x_adv, settings = ev.craft(
                attack,
                eps_value,
                model,
                (attack, eps_label, cell.spec, cell.effective),
                shard.batches,
                shard.numbers,
            )
            scorer.restore_seeds()
        scores = scorer.score(
            cell.defense_index, x_adv, shard.numbers, clean.defenses[cell.defense_index]
        )
        l2, linf = perturbation_norms(shard.x, x_adv)
        records.append(
            CellRecord(
                cell.defense_index,
                cell.effective,
                scores,
                l2,
                linf,
                attacker,
                settings,
                round(time.perf_counter() - started, 3),
            )
        )
    grid_indices = torch.zeros(0, dtype=torch.long)
    grid_adversarial = None
    if want_grid and oblivious is not None:
        near = shard.positions < GRID_IMAGES
        grid_indices, grid_adversarial = shard.positions[near], oblivious[0][near]
    return GroupRecord(
        attack,
        eps_label,
        records,
        shard.positions,
        detector_scores,
        grid_indices,
        grid_adversarial,
    )


def _group_results(
    plan: list[PlannedCell],
    record: GroupRecord,
    clean: CleanRecord,
    eps_value: float | None,
) -> tuple[list[dict[str, Any]], dict[tuple[int, str], torch.Tensor]]:
    """The cells (``results.json``) of one (attack, eps) from its merged record, and the
    per-image correctness of each computed cell by (defense index, threat model)."""
    cells: list[dict[str, Any]] = []
    correctness: dict[tuple[int, str], torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for planned in plan:
        cell: dict[str, Any] = {
            "attack": record.attack,
            "eps": record.eps,
            "eps_value": eps_value,
            "defense": planned.spec,
            "threat_model": planned.threat_model,
            "effective_threat_model": None if planned.effective == "skip" else planned.effective,
            "status": "ok",
            "note": planned.note,
        }
        if planned.effective == "skip":
            cell.update(status="skipped", note=planned.reason)
            cells.append(cell)
            continue
        key = (planned.defense_index, planned.effective)
        reused = key in seen
        seen.add(key)
        computed = record.cell(*key)
        assert computed is not None
        if reused and planned.threat_model != planned.effective:
            cell["status"] = "reused"
        cell.update(
            cell_metrics(
                clean.defenses[planned.defense_index], computed.scores, computed.l2, computed.linf
            )
        )
        cell["attacker_model"] = computed.attacker_model
        cell["attack_settings"] = computed.attack_settings
        # attack (shared oblivious adversarials: counted in their first cell) + defense
        cell["seconds"] = 0.0 if reused else computed.seconds
        correctness[(planned.defense_index, planned.threat_model)] = computed.scores.correct
        cells.append(cell)
    return cells, correctness


def _fill_grid(
    grid: dict[str, Any],
    record: GroupRecord,
    plan: list[PlannedCell],
    ev: _Evaluator,
    scorer: Scorer,
) -> None:
    """The report's picture: the first images, clean, adversarial and purified."""
    from comdefend.evaluation.grids import amplified_difference

    if record.grid_adversarial is None:
        return
    k = min(GRID_IMAGES, ev.n)
    x_adv = record.grid_adversarial
    grid.setdefault("clean", ev.x[:k])
    grid.setdefault("adversarial", x_adv)
    grid.setdefault("difference", amplified_difference(x_adv, ev.x[:k]))
    for planned in plan:
        defense = ev.defenses[planned.defense_index]
        if planned.effective == "oblivious" and not isinstance(defense, Identity):
            if planned.spec not in grid.get("purified", {}):
                purified = scorer.purified_sample(planned.defense_index, x_adv)
                grid.setdefault("purified", {})[planned.spec] = purified


def evaluate(config: EvaluationConfig) -> dict[str, Any]:
    """Run the evaluation grid; return the results (``results.json``'s content).

    If ``config.out`` is set, also write ``results.json``, ``results.csv``, ``report.md`` and
    (with the ``report`` extra) ``report.html`` and PNG figures there with
    :func:`comdefend.evaluation.report.write_report`.

    Under ``torchrun`` the images are shared among the processes
    (:mod:`comdefend.evaluation.distributed`); rank 0 writes the report and every process
    returns the same results.

    Raises:
        UsageError: see :func:`validate_config`; a classifier or ComDefend checkpoint that does
            not fit the dataset; an unknown defense spec.
        CheckpointError, DatasetNotFoundError: unreadable checkpoint, missing dataset.
    """
    config = validate_config(config)
    group = ProcessGroup.from_environment(_resolve_device(config.device))
    try:
        return _evaluate(config, group)
    finally:
        group.close()


def _evaluate(config: EvaluationConfig, group: ProcessGroup) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from comdefend.training.run import environment

    started = time.time()
    ev = _Evaluator(config, group.device)
    # before any expensive work: a resume with other settings is refused at once
    checkpoints = _checkpoint_hashes(config, ev)
    progress: EvaluationProgress | None = None
    failure: ComDefendError | None = None
    if group.is_main:
        try:
            progress = EvaluationProgress(
                config.out,
                fingerprint(asdict(config), checkpoints, ev.data_source),
                config.resume,
            )
        except ComDefendError as error:
            failure = error
    group.agree(failure)
    restored = json.loads(
        group.broadcast_bytes(json.dumps(progress.keys() if progress else []).encode())
    )
    detectors = _fit_detectors(ev)
    batches = Batches(ev.n, config.batch_size)
    numbers = group.shard(batches.count)
    positions = batches.indices(numbers)
    shard = _Shard(batches, numbers, positions, ev.x[positions])
    scorer = Scorer(
        ev.classifier,
        ev.defenses,
        config.defenses,
        ev.x,
        ev.y,
        batches,
        config.seed,
        config.eot_draws,
        ev.device,
    )

    own_clean = CleanRecord(
        [scorer.score(i, shard.x, numbers) for i in range(len(ev.defenses))],
        detectors.score(shard.x, ev.device),
    )
    clean_parts = [CleanRecord.from_bytes(b) for b in group.gather_bytes(own_clean.to_bytes())]
    all_clean = CleanRecord.merge(clean_parts)
    detectors.finish_info(all_clean.detector_scores)
    clean_rows = []
    for spec, defense, scores in zip(config.defenses, ev.defenses, all_clean.defenses, strict=True):
        accuracy, std = accuracy_stats(scores.correct)
        clean_rows.append(
            {
                "defense": spec,
                "accuracy": accuracy,
                "accuracy_std": std,
                "draws": int(scores.correct.shape[0]),
                "psnr_purified_db": finite_or_none(psnr_from_mse(float(scores.mse.mean()))),
                "randomized": bool(defense.randomized),
            }
        )

    plan = plan_cells(config, ev.defenses)
    groups = [
        (attack, eps_label, eps_value)
        for attack in config.attacks
        for eps_label, eps_value in _eps_plan(config, attack)
    ]
    cells: list[dict[str, Any]] = []
    correctness: dict[tuple[Any, ...], torch.Tensor] = {}
    detection: list[dict[str, Any]] = []
    grid_attack = config.attacks[0]
    grid_eps = _eps_plan(config, grid_attack)[-1][0]
    grid: dict[str, Any] = dict(progress.grid) if progress else {}
    bar = tqdm(
        total=len(groups) * len(plan),
        desc="evaluate",
        unit="cell",
        disable=not (config.progress and group.is_main),
    )
    for attack, eps_label, eps_value in groups:
        if group_key(attack, eps_label) in restored:
            finished = progress.finished(attack, eps_label) if progress else None
        else:
            want_grid = attack == grid_attack and eps_label == grid_eps
            own = _craft_and_score_group(
                ev,
                scorer,
                detectors,
                plan,
                shard,
                own_clean,
                attack,
                eps_label,
                eps_value,
                want_grid,
            )
            parts = [GroupRecord.from_bytes(b) for b in group.gather_bytes(own.to_bytes())]
            finished = None
            if group.is_main:
                record = GroupRecord.merge(parts)
                group_cells, group_correct = _group_results(plan, record, all_clean, eps_value)
                row = None
                if detectors.detectors:
                    row = detectors.row(
                        attack, eps_label, all_clean.detector_scores, record.detector_scores
                    )
                if want_grid:
                    _fill_grid(grid, record, plan, ev, scorer)
                finished = (group_cells, group_correct, row)
                assert progress is not None
                elapsed = progress.elapsed_s + time.time() - started
                progress.save_group(attack, eps_label, *finished, grid, elapsed)
        bar.update(len(plan))
        if finished is not None:
            group_cells, group_correct, detection_row = finished
            cells.extend(group_cells)
            for (index, tm), correct in group_correct.items():
                correctness[(attack, eps_label, index, tm)] = correct
            if detection_row is not None:
                detection.append(detection_row)
    bar.close()
    counts = [scorer.purified_images, scorer.reused_images]
    work = [json.loads(b) for b in group.gather_bytes(json.dumps(counts).encode())]

    results: dict[str, Any] = {}
    if group.is_main:
        assert progress is not None
        results = {
            "format": "comdefend-evaluation/1",
            "config": asdict(config),
            "eps_unit": "1/255 (an eps of 8 is an L-inf budget of 8/255 on images in [0, 1])",
            "environment": _environment(environment),
            "checkpoints": checkpoints,
            "classifier": _classifier_info(ev),
            "dataset": {
                "name": config.dataset,
                "split": config.split,
                "n": ev.n,
                "source": ev.data_source,
            },
            "defenses": [
                {"spec": s, "name": d.name, "settings": d.settings()}
                for s, d in zip(config.defenses, ev.defenses, strict=True)
            ],
            "threat_models": {tm: THREAT_MODEL_MEANINGS[tm] for tm in config.threat_models},
            "clean": clean_rows,
            "cells": cells,
            "worst_case": worst_case(config.defenses, cells, correctness),
            "detectors": (
                {"info": detectors.info, "results": detection} if config.detectors else {}
            ),
            "elapsed_s": round(progress.elapsed_s + time.time() - started, 3),
            "resumed_groups": progress.restored,
            "processes": group.world_size,
            "work": {  # this run's images (a resume counts only what it computed)
                "images_purified": sum(purified for purified, _ in work),
                "adversarial_images_unchanged_not_purified_again": sum(r for _, r in work),
            },
            "skipped": [ROC_SKIPPED] if detectors.roc_skipped else [],
        }
        if config.out is not None:
            from comdefend.evaluation.report import write_report

            write_report(results, config.out, grid=grid)
            progress.clear()
    # every process returns rank 0's results
    text = group.broadcast_bytes(json.dumps(finite_json(results)).encode())
    return results if group.is_main else json.loads(text)


def _environment(environment: Any) -> dict[str, Any]:
    info = dict(environment())
    info.pop("cpu_threads", None)  # varies between machines; not a setting of the run
    return info


def _checkpoint_hashes(config: EvaluationConfig, ev: _Evaluator) -> dict[str, str]:
    refs = [ev.classifier.weights] + [r for d in ev.defenses for r in _checkpoint_refs(d)]
    # keyed as before WeightsRef: a file as written, a zoo model by its path (resume fingerprints)
    return {
        (ref.source if ref.kind == "file" else str(ref.path)): ref.sha256
        for ref in refs
        if ref is not None
    }


def _classifier_info(ev: _Evaluator) -> dict[str, Any]:
    config = getattr(ev.classifier, "config", None)
    return {
        "path": ev.config.classifier,
        "weights": ev.classifier.weights.to_dict() if ev.classifier.weights else None,
        "config": config.to_dict() if config is not None else None,
        "recorded_metrics": (ev.classifier.checkpoint_metadata or {}).get("metrics", {}),
    }
