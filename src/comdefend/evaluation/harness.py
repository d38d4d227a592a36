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

How a run is organised (each unit is a module of :mod:`comdefend.evaluation`):

* ``config``: :class:`EvaluationConfig` and its checks; ``planning``: the (attack, eps) groups
  and how each cell is computed, reused or skipped;
* ``crafting``: adversarial examples, seeded per batch; oblivious ones are crafted once per
  (attack, eps) and shared by every defense and the detectors;
* ``scoring``: ``classifier(defense(x))`` per image; clean images are purified once per defense,
  and adversarial images an attack left unchanged reuse their clean result;
* ``records``: the per-image results as typed records that merge across processes;
  ``worst_case``: the per-image conjunction over attacks; ``detection``: the detectors;
* ``progress``: the finished groups saved for ``--resume``; ``distributed``: torchrun;
* this module: loads the models and images and runs the plan; ``report`` writes the files.

The classifier is a checkpoint path or zoo name, or ``package.module:factory`` (the user's own
model); :func:`comdefend.evaluation.evaluate` also takes ``nn.Module`` classifiers and defenses
(:mod:`comdefend.evaluation.inputs`). The result is an
:class:`~comdefend.evaluation.results.EvaluationResult`.

Example:
    >>> config = EvaluationConfig(dataset="fashion-mnist", classifier="cls.safetensors",
    ...     defenses=["none", "jpeg:75"], attacks=["fgsm"], eps=[0, 8], n=100)  # doctest: +SKIP
    >>> result = evaluate(config)  # doctest: +SKIP
    >>> result.cell("fgsm", 8, "jpeg:75").robust_accuracy  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from comdefend.console import duration, logger
from comdefend.data.datasets import DATASETS, ImageSet
from comdefend.defenses import (
    ComDefendDefense,
    Defense,
    Identity,
    make_threat_model_defense,
    parse_defense,
)
from comdefend.errors import ComDefendError, UsageError
from comdefend.evaluation.config import (
    DETECTORS,
    MIN_NORM,
    THREAT_MODEL_MEANINGS,
    EvaluationConfig,
    check_attacks,
    check_threat_models,
    is_min_norm,
    validate_config,
)
from comdefend.evaluation.crafting import comdefend_parts, craft
from comdefend.evaluation.detection import (
    DETECTOR_FPR,
    DETECTOR_TRAIN_IMAGES,
    ROC_SKIPPED,
    Detectors,
    fit_detectors,
)
from comdefend.evaluation.distributed import ProcessGroup
from comdefend.evaluation.inputs import (
    PROBE_IMAGES,
    ResolvedClassifier,
    as_defense,
    check_defense_outputs,
    module_sha256,
    resolve_classifier,
)
from comdefend.evaluation.planning import PlannedCell, eps_plan, plan_cells
from comdefend.evaluation.progress import (
    CLEAN_KEY,
    PROGRESS_FILE,
    BatchProgress,
    EvaluationProgress,
    add_environments,
    fingerprint,
    fingerprint_sha256,
    group_key,
    kernel_change,
)
from comdefend.evaluation.records import CellRecord, CleanRecord, GroupRecord
from comdefend.evaluation.results import (
    CellResult,
    CleanResult,
    DatasetInfo,
    DefenseInfo,
    EvaluationResult,
    Provenance,
)
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
from comdefend.models.comdefend import ComDefend
from comdefend.models.precision import check_precision
from comdefend.zoo import WeightsRef

__all__ = [
    "DETECTORS",
    "DETECTOR_FPR",
    "DETECTOR_TRAIN_IMAGES",
    "MIN_NORM",
    "EvaluationResult",
    "is_min_norm",
    "PROGRESS_FILE",
    "THREAT_MODEL_MEANINGS",
    "EvaluationConfig",
    "check_attacks",
    "check_threat_models",
    "derive_seed",
    "evaluate",
    "validate_config",
]

GRID_IMAGES = 8


def _comdefend_parts(defense: nn.Module) -> list[ComDefendDefense]:
    return comdefend_parts(defense)


def _checkpoint_refs(defense: nn.Module) -> list[WeightsRef]:
    return [p.model.weights for p in _comdefend_parts(defense) if p.model.weights is not None]


def _resolve_device(name: str) -> torch.device:
    from comdefend.training.run import resolve_device

    return resolve_device(name)


def _apply_precision(
    model: ComDefend, precision: str | None, spec: str, device: torch.device
) -> None:
    """Set the run's ``--precision`` on one ComDefend (its spec may not ask for another)."""
    own = model.config.precision
    if precision is not None:
        if own not in ("fp32", precision):
            raise UsageError(
                f"defense {spec} asks for precision {own} but the run's precision is "
                f"{precision}: give one of them"
            )
        model.config.precision = check_precision(precision)
    check_precision(model.config.precision, device)  # tf32 needs CUDA


class _Evaluator:
    """The run's models and images (loaded by every process).

    ``classifier`` and ``defense_modules`` (by spec) are models passed from Python; the others
    are loaded from ``config``."""

    def __init__(
        self,
        config: EvaluationConfig,
        device: torch.device,
        classifier: nn.Module | None = None,
        defense_modules: Mapping[str, nn.Module] | None = None,
    ) -> None:
        from comdefend.data.datasets import load_dataset
        from comdefend.models.classifiers import check_classifier_fits

        self.config = config
        self.device = device
        modules = dict(defense_modules or {})
        unknown = sorted(set(modules) - set(config.defenses))
        if unknown:
            raise UsageError(f"defense modules {unknown} are not among the defenses")
        self.resolved: ResolvedClassifier = resolve_classifier(
            config.classifier, device, classifier
        )
        self.classifier = self.resolved.model
        if self.resolved.from_checkpoint:
            check_classifier_fits(self.classifier, config.dataset, label=config.classifier)
        self.classifier.requires_grad_(False)
        self.user_defenses = {
            spec: as_defense(modules[spec], spec).to(device).eval() for spec in modules
        }
        self.defenses: list[Defense] = [
            self.user_defenses[s] if s in self.user_defenses else parse_defense(s, self.device)
            for s in config.defenses
        ]
        if config.split not in ("test", "sample"):
            raise UsageError(f"unknown split {config.split!r}; valid: test, sample")
        # only the images the run uses are read (ImageNet decodes JPEGs one by one)
        needed = config.n + (config.detector_holdout if config.detectors else 0)
        test = load_dataset(
            config.dataset, config.split, config.data_dir, config.image_size, max_images=needed
        )
        for spec, defense in zip(config.defenses, self.defenses, strict=True):
            for part in _comdefend_parts(defense):
                part.model.requires_grad_(False)
                _apply_precision(part.model, config.precision, spec, device)
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
        self.dataset_classes = DATASETS.get(config.dataset).num_classes
        self.num_classes: int = self.resolved.num_classes or self.dataset_classes
        self._check_contracts()

    def _check_contracts(self) -> None:
        """The classifier (and each defense passed as a module) on the first images: NCHW
        float in [0, 1] in, finite logits with one column per class out."""
        from comdefend.models.classifiers import check_classifier_outputs

        probe = self.x[:PROBE_IMAGES].to(self.device)
        for spec, defense in self.user_defenses.items():
            check_defense_outputs(defense, probe, spec)
        check_classifier_outputs(
            self.classifier,
            probe,
            self.dataset_classes,
            label=self.config.classifier,
            dataset=self.config.dataset,
        )

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


def _detector_train_set(ev: _Evaluator) -> ImageSet | None:
    """The training images the detectors are fitted on (``None`` without detectors)."""
    from comdefend.data.datasets import load_dataset

    config = ev.config
    if not config.detectors:
        return None
    # the run's crop (ImageNet): the detectors see images of the size they will score
    return load_dataset(
        config.dataset,
        "train",
        config.data_dir,
        config.image_size,
        max_images=DETECTOR_TRAIN_IMAGES,
    )


def _data_identity(ev: _Evaluator, detector_train: ImageSet | None) -> dict[str, Any]:
    """The resume fingerprint's images: what they are (sha256 of pixels and labels), not
    where they lie (:meth:`ImageSet.identity`)."""
    identity = {"test": ev.test.identity()}  # the run's images and the detectors' holdout
    if detector_train is not None:
        identity["detector_train"] = detector_train.identity()
    return identity


def _fit_detectors(ev: _Evaluator, train: ImageSet | None) -> Detectors:
    """Fit and calibrate the requested detectors (every process fits the same ones)."""
    config = ev.config
    if not config.detectors or train is None:
        return Detectors()
    train_x = train.float_images()
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


def _batch_progress(
    config: EvaluationConfig, group: ProcessGroup, progress: EvaluationProgress | None
) -> BatchProgress:
    """Every process's store of the finished batches of the group in progress.

    Rank 0 knows the run's fingerprint and how long it already ran (the progress file, or a
    later saved step); every process gets both. Without ``--resume`` the steps an earlier run
    left are removed before any process saves one. The machines of every process are recorded
    in the progress file, with a warning if earlier parts of the run had other kernels."""
    from comdefend.training.run import environment

    here = _environment(environment, group.device)
    machines = add_environments([], [json.loads(b) for b in group.gather_bytes(_json(here))])
    state = b""
    if group.is_main:
        assert progress is not None
        if config.resume and (warning := kernel_change(progress.environments, machines)):
            logger.warning(warning)
        progress.add_environments(machines)
        progress.begin()
        digest = fingerprint_sha256(progress.fingerprint)
        store = BatchProgress(config.out, digest, config.resume)
        if config.resume:
            progress.elapsed_s = max(progress.elapsed_s, store.elapsed_s())
        else:
            store.clear()
        state = _json({"digest": digest, "elapsed_s": progress.elapsed_s})
    shared = json.loads(group.broadcast_bytes(state))
    store = BatchProgress(config.out, shared["digest"], config.resume, here)
    store.base_elapsed_s = float(shared["elapsed_s"])
    return store


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _batches_per_step(scorer: Scorer, config: EvaluationConfig) -> int:
    """Attack batches computed (and saved) together: enough images for one purification call
    of the deterministic defenses (one batch on a CPU, except for small batches)."""
    return max(1, scorer.batch_size // config.batch_size)


def _group_step(
    ev: _Evaluator,
    scorer: Scorer,
    detectors: Detectors,
    plan: list[PlannedCell],
    clean: CleanRecord,
    group: tuple[str, float | str, float | None],
    want_grid: bool,
) -> Callable[[_Shard], GroupRecord]:
    """:func:`_craft_and_score_group` of one group, as a function of the images (``clean``:
    the clean scores of every image)."""
    attack, eps_label, eps_value = group
    return lambda part: _craft_and_score_group(
        ev,
        scorer,
        detectors,
        plan,
        part,
        clean.subset(part.positions),
        attack,
        eps_label,
        eps_value,
        want_grid,
    )


_Record = TypeVar("_Record", GroupRecord, CleanRecord)


def _in_steps(
    store: BatchProgress,
    compute: Callable[[_Shard], _Record],
    shard: _Shard,
    key: str,
    batches_per_step: int,
    elapsed_s: Callable[[], float],
    kind: type[_Record],
    status: Callable[[int, int, int], None] | None = None,
) -> _Record:
    """``compute`` over this process's images, ``batches_per_step`` batches at a time, each
    step saved in ``store`` (and taken from it on resume, whatever step size saved it): the
    record (a ``kind``) of the clean pass or of a group without losing more than one step to an
    interruption. Seeds are per batch, so the steps give the numbers of one call over the whole
    shard."""
    if not shard.numbers:
        return compute(shard)
    saved = store.starts(key)
    parts = []
    done = computed = 0
    while done < len(shard.numbers):
        remaining = shard.numbers[done:]
        found = store.load_from(key, remaining, kind) if remaining[0] in saved else None
        if found is not None:
            record, numbers = found
        else:
            # up to the next batch that begins a saved step: that one is read back
            numbers = remaining[:1] + list(
                itertools.takewhile(lambda n: n not in saved, remaining[1:batches_per_step])
            )
            where = torch.isin(shard.positions, shard.batches.indices(numbers))
            part = _Shard(shard.batches, numbers, shard.positions[where], shard.x[where])
            record = compute(part)
            store.save(key, numbers, record, elapsed_s())
            computed += len(numbers)
        parts.append(record)
        done += len(numbers)
        if status is not None:
            status(done, len(shard.numbers), computed)
    return kind.merge(parts)


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
) -> tuple[list[CellResult], dict[tuple[int, str], torch.Tensor]]:
    """The cells of one (attack, eps) from its merged record, and the per-image correctness of
    each computed cell by (defense index, threat model)."""
    cells: list[CellResult] = []
    correctness: dict[tuple[int, str], torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for planned in plan:
        identity: dict[str, Any] = {
            "attack": record.attack,
            "eps": record.eps,
            "eps_value": eps_value,
            "defense": planned.spec,
            "threat_model": planned.threat_model,
        }
        if planned.effective == "skip":
            cells.append(
                CellResult(
                    **identity,
                    effective_threat_model=None,
                    status="skipped",
                    note=planned.reason,
                )
            )
            continue
        key = (planned.defense_index, planned.effective)
        reused = key in seen
        seen.add(key)
        computed = record.cell(*key)
        assert computed is not None
        metrics = cell_metrics(
            clean.defenses[planned.defense_index], computed.scores, computed.l2, computed.linf
        )
        cells.append(
            CellResult(
                **identity,
                effective_threat_model=planned.effective,
                status="reused" if reused and planned.threat_model != planned.effective else "ok",
                note=planned.note,
                **metrics,
                attacker_model=computed.attacker_model,
                attack_settings=computed.attack_settings,
                # attack (shared oblivious adversarials: counted in their first cell) + defense
                seconds=0.0 if reused else computed.seconds,
            )
        )
        correctness[(planned.defense_index, planned.threat_model)] = computed.scores.correct
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


def evaluate(
    config: EvaluationConfig,
    *,
    classifier: nn.Module | None = None,
    defense_modules: Mapping[str, nn.Module] | None = None,
) -> EvaluationResult:
    """Run the evaluation grid that ``config`` describes.

    If ``config.out`` is set, also write ``results.json`` (:meth:`EvaluationResult.to_dict`),
    ``results.csv``, ``report.md`` and (with the ``report`` extra) ``report.html`` and PNG
    figures there with :func:`comdefend.evaluation.report.write_report`.

    Under ``torchrun`` the images are shared among the processes
    (:mod:`comdefend.evaluation.distributed`); rank 0 writes the report and every process
    returns the same result.

    Args:
        config: the run's settings; ``config.classifier`` is a checkpoint path, a zoo name or
            ``package.module:factory``.
        classifier: a model passed from Python instead (``config.classifier`` then names it).
        defense_modules: defenses passed from Python, by their name in ``config.defenses``.

    Returns:
        The typed result; :func:`comdefend.evaluation.evaluate` is the keyword front end.

    Raises:
        UsageError: see :func:`validate_config`; a classifier or ComDefend checkpoint that does
            not fit the dataset; a classifier that breaks the input contract
            (:func:`~comdefend.models.classifiers.check_classifier_outputs`); a factory that
            cannot be imported or called; an unknown defense spec.
        CheckpointError, DatasetNotFoundError: unreadable checkpoint, missing dataset.
    """
    config = validate_config(config)
    group = ProcessGroup.from_environment(_resolve_device(config.device))
    try:
        return _evaluate(config, group, classifier, defense_modules)
    finally:
        group.close()


def _evaluate(
    config: EvaluationConfig,
    group: ProcessGroup,
    classifier: nn.Module | None = None,
    defense_modules: Mapping[str, nn.Module] | None = None,
) -> EvaluationResult:
    from comdefend.console import progress_bar
    from comdefend.training.run import environment

    started = time.time()
    ev = _Evaluator(config, group.device, classifier, defense_modules)
    # before any expensive work: a resume with other settings is refused at once
    detector_train = _detector_train_set(ev)
    progress: EvaluationProgress | None = None
    failure: ComDefendError | None = None
    if group.is_main:
        try:
            data = _data_identity(ev, detector_train) if config.out is not None else None
            progress = EvaluationProgress(
                config.out,
                fingerprint(
                    asdict(config),
                    _fingerprint_checkpoints(ev),
                    data,
                    classifier=ev.resolved.info.sha256,
                ),
                config.resume,
            )
        except ComDefendError as error:
            failure = error
    group.agree(failure)
    batch_progress = _batch_progress(config, group, progress)

    def elapsed_s() -> float:  # the run's time so far, summed over its resumes
        return batch_progress.base_elapsed_s + time.time() - started

    restored = json.loads(
        group.broadcast_bytes(json.dumps(progress.keys() if progress else []).encode())
    )
    detectors = _fit_detectors(ev, detector_train)
    batches = Batches(ev.n, config.batch_size)
    numbers = group.shard(batches.count)
    if group.is_main and (note := _uneven_split_note(ev.n, config.batch_size, group.world_size)):
        logger.warning(note)
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

    saved_clean = progress.clean if progress is not None else None
    if saved_clean is not None and any(d.indices.numel() != ev.n for d in saved_clean.defenses):
        saved_clean = None  # not this run's images (the fingerprint makes this unlikely)
    restored_clean = group.broadcast_bytes(saved_clean.to_bytes() if saved_clean else b"")
    if restored_clean:  # a resume: the clean images are not purified again
        all_clean = CleanRecord.from_bytes(restored_clean)
        own_clean = all_clean.subset(positions)
    else:
        own_clean = _in_steps(
            batch_progress,
            lambda part: CleanRecord(
                [scorer.score(i, part.x, part.numbers) for i in range(len(ev.defenses))],
                detectors.score(part.x, ev.device),
            ),
            shard,
            CLEAN_KEY,
            _batches_per_step(scorer, config),
            elapsed_s,
            CleanRecord,
            _step_status("clean images", group.is_main and not config.progress, bool(config.out)),
        )
        clean_parts = group.gather_bytes(own_clean.to_bytes())
        all_clean = CleanRecord.merge([CleanRecord.from_bytes(b) for b in clean_parts])
        if progress is not None:
            elapsed = elapsed_s()
            progress.save_clean(all_clean, elapsed)
            batch_progress.clear(CLEAN_KEY)
            if not config.progress:
                logger.info(f"saved the clean images' scores: {_spent(elapsed)} so far")
    detectors.finish_info(all_clean.detector_scores)
    clean_rows = []
    for spec, defense, scores in zip(config.defenses, ev.defenses, all_clean.defenses, strict=True):
        accuracy, std = accuracy_stats(scores.correct)
        clean_rows.append(
            CleanResult(
                defense=spec,
                accuracy=accuracy,
                accuracy_std=std,
                draws=int(scores.correct.shape[0]),
                psnr_purified_db=finite_or_none(psnr_from_mse(float(scores.mse.mean()))),
                randomized=bool(defense.randomized),
            )
        )

    plan = plan_cells(config, ev.defenses)
    groups = [
        (attack, eps_label, eps_value)
        for attack in config.attacks
        for eps_label, eps_value in eps_plan(config, attack)
    ]
    cells: list[CellResult] = []
    correctness: dict[tuple[Any, ...], torch.Tensor] = {}
    detection: list[dict[str, Any]] = []
    grid_attack = config.attacks[0]
    grid_eps = eps_plan(config, grid_attack)[-1][0]
    grid: dict[str, Any] = dict(progress.grid) if progress else {}
    bar = progress_bar(
        total=len(groups) * len(plan),
        desc="evaluate",
        unit="cell",
        enabled=config.progress and group.is_main,
    )
    for number, (attack, eps_label, eps_value) in enumerate(groups, start=1):
        finished: tuple[list[CellResult], dict[tuple[int, str], torch.Tensor], Any] | None
        if group_key(attack, eps_label) in restored:
            saved = progress.finished(attack, eps_label) if progress else None
            finished = None
            if saved is not None:
                saved_cells, saved_correct, saved_row = saved
                finished = (
                    [CellResult.from_dict(c) for c in saved_cells],
                    saved_correct,
                    saved_row,
                )
        else:
            want_grid = attack == grid_attack and eps_label == grid_eps
            own = _in_steps(
                batch_progress,
                _group_step(
                    ev,
                    scorer,
                    detectors,
                    plan,
                    all_clean,
                    (attack, eps_label, eps_value),
                    want_grid,
                ),
                shard,
                group_key(attack, eps_label),
                _batches_per_step(scorer, config),
                elapsed_s,
                GroupRecord,
                _step_status(
                    f"{attack} {_budget(eps_label)} (group {number} of {len(groups)})",
                    group.is_main and not config.progress,
                    config.out is not None,
                ),
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
                elapsed = elapsed_s()
                progress.save_group(
                    attack,
                    eps_label,
                    [cell.to_dict() for cell in group_cells],
                    group_correct,
                    row,
                    grid,
                    elapsed,
                )
                batch_progress.clear(group_key(attack, eps_label))
                if not config.progress:  # a line per saved group where no bar shows progress
                    logger.info(_saved_line(attack, eps_label, number, len(groups), elapsed))
        bar.update(len(plan))
        if finished is not None:
            group_cells, group_correct, detection_row = finished
            cells.extend(group_cells)
            for (index, tm), correct in group_correct.items():
                correctness[(attack, eps_label, index, tm)] = correct
            if detection_row is not None:
                detection.append(detection_row)
    bar.close()
    counts = [
        scorer.purified_images,
        scorer.reused_images,
        batch_progress.restored_batches,
        batch_progress.environments,
    ]
    work = [json.loads(b) for b in group.gather_bytes(json.dumps(counts).encode())]
    batch_progress.clear()  # every group is in the progress file (each process's own folder)

    text, result = b"", None
    if group.is_main:
        assert progress is not None
        result = EvaluationResult(
            settings=config,
            provenance=Provenance(
                classifier=ev.resolved.info,
                checkpoints=_checkpoint_hashes(config, ev),
                environment=_environment(environment, group.device),
                environments=add_environments(
                    progress.environments, [e for c in work for e in c[3]]
                ),
            ),
            dataset=DatasetInfo(config.dataset, config.split, ev.n, ev.data_source),
            defenses=[
                DefenseInfo(s, d.name, d.settings())
                for s, d in zip(config.defenses, ev.defenses, strict=True)
            ],
            threat_models={tm: THREAT_MODEL_MEANINGS[tm] for tm in config.threat_models},
            clean=clean_rows,
            cells=cells,
            worst_case=worst_case(config.defenses, cells, correctness),
            detectors={"info": detectors.info, "results": detection} if config.detectors else {},
            elapsed_s=round(elapsed_s(), 3),
            resumed_groups=progress.restored,
            processes=group.world_size,
            work={  # this run's images (a resume counts only what it computed)
                "images_purified": sum(c[0] for c in work),
                "adversarial_images_unchanged_not_purified_again": sum(c[1] for c in work),
                "saved_batches_read_back": sum(c[2] for c in work),
            },
            skipped=[ROC_SKIPPED] if detectors.roc_skipped else [],
        )
        # what results.json holds is what every caller gets (JSON types, no NaN)
        result = EvaluationResult.from_dict(result.to_dict())
        if config.out is not None:
            from comdefend.evaluation.report import write_report

            result = write_report(result, config.out, grid=grid)
            progress.clear()
        text = json.dumps(result.to_dict()).encode()
    # every process returns rank 0's result
    text = group.broadcast_bytes(text)
    return result if result is not None else EvaluationResult.from_dict(json.loads(text))


def _uneven_split_note(images: int, batch_size: int, processes: int) -> str | None:
    """A note when the batches do not split evenly over the processes (the busiest one then
    sets the pace: 5 batches over 2 processes leave one idle a third of the time), with a batch
    size that splits evenly; ``None`` when the split is even or cannot be bettered.

    Example:
        >>> print(_uneven_split_note(500, 100, 2))  # doctest: +NORMALIZE_WHITESPACE
        note: 5 batches of 100 images over 2 processes: one process evaluates 3 batches,
        another 2; --batch-size 84 makes 6 batches, 3 for each process
        >>> _uneven_split_note(500, 50, 2) is None, _uneven_split_note(10_000, 100, 3) is None
        (True, True)
    """
    count = -(-images // batch_size)
    most, least = -(-count // processes), count // processes
    if processes < 2 or count % processes == 0 or (most - least) * 10 < most:
        return None  # even, or within 10% of even
    rounds = most  # as many rounds as now, every process busy in each
    size = -(-images // (rounds * processes))
    if -(-images // size) != rounds * processes:
        return None
    return (
        f"note: {count} batches of {batch_size} images over {processes} processes: one process "
        f"evaluates {most} batches, another {least}; --batch-size {size} makes "
        f"{rounds * processes} batches, {rounds} for each process"
    )


#: Seconds between two status lines of the group in progress (runs without a progress bar).
STATUS_EVERY_S = 600.0


def _step_status(label: str, enabled: bool, saved: bool = True) -> Callable[[int, int, int], None]:
    """A callback ``(batches done, batches, batches computed here)`` that logs where this
    process is in the clean pass or a group (``label``), at most every ``STATUS_EVERY_S``
    seconds, with the time the rest should take at the pace of the batches computed so far
    (batches read back from a resume cost nothing and do not count): the log of a background
    run shows that a group of hours is moving, and when it should end. Example of a line:
    ``cw at 8/255 (group 9 of 9): 20 of 50 batches of this process, about 1 h 5 min left
    (saved; --resume continues)``
    """
    kept = " (saved; --resume continues)" if saved else ""
    start = last = time.monotonic()

    def status(done: int, batches: int, computed: int) -> None:
        nonlocal last
        now = time.monotonic()
        if enabled and done < batches and now - last >= STATUS_EVERY_S:
            last = now
            left = ""
            if computed > 0:
                rest = (now - start) / computed * (batches - done)
                left = f", about {duration(rest)} left" if rest >= 60 else ", under 1 min left"
            logger.info(f"{label}: {done} of {batches} batches of this process{left}{kept}")

    return status


def _budget(eps_label: Any) -> str:
    return "(minimum norm)" if isinstance(eps_label, str) else f"at {eps_label:g}/255"


def _spent(elapsed_s: float) -> str:
    return f"{duration(elapsed_s)} of evaluation"


def _saved_line(attack: str, eps_label: Any, number: int, total: int, elapsed_s: float) -> str:
    """The status line of a saved group, e.g. for a run in the background with a log file.

    Example:
        >>> _saved_line("pgd", 8.0, 3, 12, 4000.0)
        'saved pgd at 8/255: group 3 of 12, 1 h 7 min of evaluation so far (--resume continues)'
    """
    return (
        f"saved {attack} {_budget(eps_label)}: group {number} of {total}, {_spent(elapsed_s)} "
        "so far (--resume continues)"
    )


def _environment(environment: Any, device: torch.device) -> dict[str, Any]:
    """A process's machine as its run records it: the GPU only if it computes.

    Example:
        >>> machine = {"cpu_capability": "AVX2", "cpu_threads": 8, "cuda_device": "H100"}
        >>> _environment(lambda: machine, torch.device("cpu"))
        {'cpu_capability': 'AVX2'}
    """
    info = dict(environment())
    info.pop("cpu_threads", None)  # varies between machines; not a setting of the run
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    else:
        info.pop("cuda_device", None)
    return info


def _user_defense_hashes(ev: _Evaluator) -> dict[str, str]:
    """sha256 of the weights of every defense passed as a module that has any, by name."""
    return {
        spec: module_sha256(defense)
        for spec, defense in ev.user_defenses.items()
        if any(True for _ in defense.state_dict())
    }


def _reference(ref: WeightsRef) -> str:
    """How results and the resume fingerprint name a model file: as written, or ``zoo:NAME``
    for a shipped model (not by the path of the package that holds it)."""
    return ref.source if ref.kind == "file" else f"zoo:{ref.zoo_name}"


def _defense_checkpoints(ev: _Evaluator) -> dict[str, str]:
    return {_reference(r): r.sha256 for d in ev.defenses for r in _checkpoint_refs(d)}


def _checkpoint_hashes(config: EvaluationConfig, ev: _Evaluator) -> dict[str, str]:
    """results.json's ``checkpoints``: the sha256 of every model, by its reference (a file as
    written, a shipped model as ``zoo:NAME``; a factory or module by its name)."""
    info, weights = ev.resolved.info, ev.resolved.weights
    hashes: dict[str, str] = {}
    if weights is not None:
        hashes[_reference(weights)] = weights.sha256
    elif info.sha256 is not None:
        hashes[config.classifier] = info.sha256
    return {**hashes, **_defense_checkpoints(ev), **_user_defense_hashes(ev)}


def _fingerprint_checkpoints(ev: _Evaluator) -> dict[str, str]:
    """The resume fingerprint's models besides the classifier (whose sha256 is its own part:
    a moved classifier file resumes, a changed model does not)."""
    return {**_defense_checkpoints(ev), **_user_defense_hashes(ev)}
