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

import hashlib
import inspect
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from comdefend.attacks import ATTACKS, make_attack
from comdefend.defenses import (
    DETECTORS,
    THREAT_MODELS,
    ComDefendDefense,
    Defense,
    Identity,
    detection_metrics,
    make_threat_model_defense,
    parse_defense,
)
from comdefend.errors import UsageError
from comdefend.evaluation.progress import PROGRESS_FILE, EvaluationProgress, fingerprint
from comdefend.metrics import mse_per_image, psnr_from_mse, quantize_8bit
from comdefend.zoo import WeightsRef

#: Attacks without an L-inf budget: run once, reported under :data:`MIN_NORM`.
MIN_NORM_ATTACKS: tuple[str, ...] = ("deepfool", "cw")
MIN_NORM = "min-norm"
#: One line per threat model, for reports.
THREAT_MODEL_MEANINGS: dict[str, str] = {tm.name: tm.meaning for tm in THREAT_MODELS.values()}
DETECTOR_TRAIN_IMAGES = 2000
DETECTOR_FPR = 0.05
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


def derive_seed(seed: int, *key: object) -> int:
    """A seed in [0, 2**31) determined by ``seed`` and ``key`` (stable across runs)."""
    text = "|".join([str(seed), *map(str, key)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (2**31)


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
    return [m for m in defense.modules() if isinstance(m, ComDefendDefense)]


def _checkpoint_refs(defense: nn.Module) -> list[WeightsRef]:
    return [p.model.weights for p in _comdefend_parts(defense) if p.model.weights is not None]


def _resolve_device(name: str) -> torch.device:
    from comdefend.training.run import resolve_device

    return resolve_device(name)


def _jsonable(value: float) -> float | None:
    return value if math.isfinite(value) else None


class _Evaluator:
    """State of one run: models, data, seeds and caches (internal)."""

    def __init__(self, config: EvaluationConfig) -> None:
        from comdefend.data.datasets import load_dataset
        from comdefend.models.classifiers import load_classifier

        self.config = config
        self.device = _resolve_device(config.device)
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
        self.original_seeds = [[p.seed for p in _comdefend_parts(d)] for d in self.defenses]

    # -- helpers -----------------------------------------------------------------------------
    def draws(self, index: int) -> int:
        return self.config.eot_draws if self.defenses[index].randomized else 1

    def _batches(self) -> list[slice]:
        size = self.config.batch_size
        return [slice(i, min(i + size, self.n)) for i in range(0, self.n, size)]

    def _reseed_defense(self, index: int, draw: int, batch: int) -> None:
        key = ("defense", self.config.defenses[index], draw, batch)
        torch.manual_seed(derive_seed(self.config.seed, *key))
        for part_index, part in enumerate(_comdefend_parts(self.defenses[index])):
            if part.seed is not None:
                part.reseed(derive_seed(self.config.seed, *key, part_index))

    def restore_seeds(self) -> None:
        for defense, seeds in zip(self.defenses, self.original_seeds, strict=True):
            for part, seed in zip(_comdefend_parts(defense), seeds, strict=True):
                part.reseed(seed)

    @torch.no_grad()
    def defended(self, index: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Correctness ``(draws, n)`` of classifier(defense(images)) and the quantized MSE
        ``(draws, n)`` of the purified images against the clean ones."""
        defense = self.defenses[index]
        correct = torch.zeros(self.draws(index), self.n, dtype=torch.bool)
        mse = torch.zeros(self.draws(index), self.n, dtype=torch.float64)
        for draw in range(self.draws(index)):
            for b, part in enumerate(self._batches()):
                self._reseed_defense(index, draw, b)
                purified = defense(images[part].to(self.device))
                logits = self.classifier(purified)
                correct[draw, part] = (logits.argmax(1).cpu() == self.y[part]).cpu()
                clean = quantize_8bit(self.x[part].double())
                mse[draw, part] = mse_per_image(quantize_8bit(purified.cpu().double()), clean)
        self.restore_seeds()
        return correct, mse

    def purified_sample(self, index: int, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self._reseed_defense(index, 0, 0)
            out = self.defenses[index](images.to(self.device)).cpu()
        self.restore_seeds()
        return out

    def attack(
        self, name: str, eps: float | None, model: nn.Module, key: tuple[Any, ...]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adversarial versions of all images against ``model`` and the attack's settings."""
        kwargs = dict(self.config.attack_params.get(name, {}))
        accepted = inspect.signature(ATTACKS[name].__init__).parameters
        num_classes = getattr(getattr(self.classifier, "config", None), "num_classes", None)
        if "num_classes" in accepted and "num_classes" not in kwargs and num_classes:
            kwargs["num_classes"] = num_classes
        torch.manual_seed(derive_seed(self.config.seed, "attack", *key))
        attack = make_attack(name, model, eps, seed=self.config.seed, **kwargs)
        outputs = []
        for part in self._batches():
            x = self.x[part].to(self.device)
            y = self.y[part].to(self.device)
            outputs.append(attack(x, y).cpu())
        return torch.cat(outputs), attack.settings()


def _accuracy_stats(correct: torch.Tensor) -> tuple[float, float]:
    per_draw = correct.double().mean(dim=1)
    std = float(per_draw.std(unbiased=False)) if per_draw.numel() > 1 else 0.0
    return float(per_draw.mean()), std


def _success_rate(clean: torch.Tensor, adversarial: torch.Tensor) -> float | None:
    rates = []
    for c0, c1 in zip(clean, adversarial, strict=True):
        total = int(c0.sum())
        if total:
            rates.append(int((c0 & ~c1).sum()) / total)
    return sum(rates) / len(rates) if rates else None


def _cell_metrics(
    x: torch.Tensor,
    x_adv: torch.Tensor,
    clean_correct: torch.Tensor,
    correct: torch.Tensor,
    mse: torch.Tensor,
) -> dict[str, Any]:
    delta = (x_adv - x).flatten(1).double()
    robust, robust_std = _accuracy_stats(correct)
    clean, clean_std = _accuracy_stats(clean_correct)
    return {
        "clean_accuracy": clean,
        "clean_accuracy_std": clean_std,
        "robust_accuracy": robust,
        "robust_accuracy_std": robust_std,
        "attack_success_rate": _success_rate(clean_correct, correct),
        "mean_l2": float(delta.norm(dim=1).mean()),
        "mean_linf": float(delta.abs().amax(dim=1).mean()),
        "psnr_purified_db": _jsonable(psnr_from_mse(float(mse.mean()))),
        "n": int(x.shape[0]),
        "draws": int(correct.shape[0]),
    }


def _eps_plan(config: EvaluationConfig, attack: str) -> list[tuple[float | str, float | None]]:
    if attack in MIN_NORM_ATTACKS:
        return [(MIN_NORM, None)]
    return [(e, e / 255.0) for e in config.eps]


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


def _fit_detectors(ev: _Evaluator) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit and calibrate the requested detectors; returns (detectors, info)."""
    from comdefend.data.datasets import load_dataset

    config = ev.config
    detectors: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if not config.detectors:
        return detectors, info
    train = load_dataset(config.dataset, "train", config.data_dir)
    train_x = train.head(DETECTOR_TRAIN_IMAGES).float_images()
    holdout_n = min(config.detector_holdout, len(ev.test) - ev.n)
    if holdout_n < 2:
        info["skipped"] = (
            f"no held-out clean test images after the first {ev.n} to calibrate the detectors"
        )
        return detectors, info
    holdout = ev.test.subset(torch.arange(ev.n, ev.n + holdout_n)).float_images()
    for name in config.detectors:
        kind = DETECTORS.get(name)
        detector = kind.build(ev.classifier, train_x, config.batch_size)
        threshold = detector.calibrate(holdout.to(ev.device), DETECTOR_FPR)
        clean_scores = detector.score(ev.x.to(ev.device))
        detectors[name] = (detector, clean_scores)
        info[name] = {
            "settings": detector.settings(),
            "fit_images": int(train_x.shape[0]) if kind.fits_on_images else 0,
            "calibration_images": holdout_n,
            "threshold": threshold,
            "target_fpr": DETECTOR_FPR,
            "fpr_on_evaluated_clean": float((clean_scores > threshold).double().mean()),
        }
    return detectors, info


def evaluate(config: EvaluationConfig) -> dict[str, Any]:
    """Run the evaluation grid; return the results (``results.json``'s content).

    If ``config.out`` is set, also write ``results.json``, ``results.csv``, ``report.md`` and
    ``report.html`` (plus PNG figures) there with
    :func:`comdefend.evaluation.report.write_report`.

    Raises:
        UsageError: see :func:`validate_config`; a classifier or ComDefend checkpoint that does
            not fit the dataset; an unknown defense spec.
        CheckpointError, DatasetNotFoundError: unreadable checkpoint, missing dataset.
    """
    from tqdm.auto import tqdm

    from comdefend.training.run import environment

    config = validate_config(config)
    started = time.time()
    ev = _Evaluator(config)
    # before any expensive work: a resume with other settings is refused at once
    checkpoints = _checkpoint_hashes(config, ev)
    progress = EvaluationProgress(
        config.out, fingerprint(asdict(config), checkpoints, ev.data_source), config.resume
    )
    detectors, detector_info = _fit_detectors(ev)

    clean: list[tuple[torch.Tensor, torch.Tensor]] = [
        ev.defended(i, ev.x) for i in range(len(ev.defenses))
    ]
    clean_rows = []
    for spec, defense, (correct, mse) in zip(config.defenses, ev.defenses, clean, strict=True):
        accuracy, std = _accuracy_stats(correct)
        clean_rows.append(
            {
                "defense": spec,
                "accuracy": accuracy,
                "accuracy_std": std,
                "draws": int(correct.shape[0]),
                "psnr_purified_db": _jsonable(psnr_from_mse(float(mse.mean()))),
                "randomized": bool(defense.randomized),
            }
        )

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
    grid: dict[str, Any] = dict(progress.grid)
    per_group = len(config.threat_models) * len(ev.defenses)
    bar = tqdm(
        total=len(groups) * per_group, desc="evaluate", unit="cell", disable=not config.progress
    )
    for attack, eps_label, eps_value in groups:
        finished = progress.finished(attack, eps_label)
        if finished is None:
            want_grid = attack == grid_attack and eps_label == grid_eps
            finished = _evaluate_group(
                ev, detectors, attack, eps_label, eps_value, clean, grid if want_grid else None, bar
            )
            elapsed = progress.elapsed_s + time.time() - started
            progress.save_group(attack, eps_label, *finished, grid, elapsed)
        else:
            bar.update(per_group)
        group_cells, group_correct, detection_row = finished
        cells.extend(group_cells)
        for (index, tm), correct in group_correct.items():
            correctness[(attack, eps_label, index, tm)] = correct
        if detection_row is not None:
            detection.append(detection_row)
    bar.close()

    results: dict[str, Any] = {
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
        "worst_case": _worst_case(config, cells, correctness),
        "detectors": {"info": detector_info, "results": detection} if config.detectors else {},
        "elapsed_s": round(progress.elapsed_s + time.time() - started, 3),
        "resumed_groups": progress.restored,
    }
    if config.out is not None:
        from comdefend.evaluation.report import write_report

        results["files"] = write_report(results, config.out, grid=grid)
        progress.clear()
    return results


def _evaluate_group(
    ev: _Evaluator,
    detectors: dict[str, Any],
    attack: str,
    eps_label: float | str,
    eps_value: float | None,
    clean: list[tuple[torch.Tensor, torch.Tensor]],
    grid: dict[str, Any] | None,
    bar: Any,
) -> tuple[list[dict[str, Any]], dict[tuple[int, str], torch.Tensor], dict[str, Any] | None]:
    """Every (threat model, defense) cell of one (attack, eps): the cells, the per-image
    correctness of each computed cell by (defense index, threat model), the detection row.
    Fills ``grid`` (if given) with the first images of the oblivious adversarials."""
    from comdefend.evaluation.grids import amplified_difference

    config = ev.config
    memo: dict[tuple[Any, ...], tuple[dict[str, Any], torch.Tensor]] = {}
    oblivious: tuple[torch.Tensor, dict[str, Any]] | None = None
    detection_row = None
    if detectors:
        oblivious = ev.attack(attack, eps_value, ev.classifier, (attack, eps_label))
        detection_row = _detect(detectors, attack, eps_label, oblivious[0], ev)
    cells: list[dict[str, Any]] = []
    correctness: dict[tuple[int, str], torch.Tensor] = {}
    for tm in config.threat_models:
        for index, (spec, defense) in enumerate(zip(config.defenses, ev.defenses, strict=True)):
            effective, note, reason = _plan_cell(defense, tm)
            cell: dict[str, Any] = {
                "attack": attack,
                "eps": eps_label,
                "eps_value": eps_value,
                "defense": spec,
                "threat_model": tm,
                "effective_threat_model": None if effective == "skip" else effective,
                "status": "ok",
                "note": note,
            }
            if effective == "skip":
                cell.update(status="skipped", note=reason)
                cells.append(cell)
                bar.update(1)
                continue
            key = (index, effective)
            reused = key in memo
            if reused:
                metrics, correct = memo[key]
                cell["status"] = "reused" if tm != effective else "ok"
            else:
                cell_started = time.perf_counter()
                if effective == "oblivious":
                    if oblivious is None:
                        oblivious = ev.attack(attack, eps_value, ev.classifier, (attack, eps_label))
                    x_adv, settings = oblivious
                    attacker = "classifier"
                else:
                    model = make_threat_model_defense(
                        defense, effective, ev.classifier, eot_samples=config.eot_samples
                    )
                    assert model is not None
                    model.eval()
                    attacker = getattr(model, "name", type(model).__name__)
                    x_adv, settings = ev.attack(
                        attack, eps_value, model, (attack, eps_label, spec, effective)
                    )
                    ev.restore_seeds()
                correct, mse = ev.defended(index, x_adv)
                metrics = {
                    **_cell_metrics(ev.x, x_adv, clean[index][0], correct, mse),
                    "attacker_model": attacker,
                    "attack_settings": settings,
                    # attack (shared oblivious adversarials: counted in their first cell) + defense
                    "seconds": round(time.perf_counter() - cell_started, 3),
                }
                memo[key] = (metrics, correct)
                if grid is not None and effective == "oblivious":
                    k = min(GRID_IMAGES, ev.n)
                    grid.setdefault("clean", ev.x[:k])
                    grid.setdefault("adversarial", x_adv[:k])
                    grid.setdefault("difference", amplified_difference(x_adv[:k], ev.x[:k]))
                    if not isinstance(defense, Identity):
                        purified = ev.purified_sample(index, x_adv[:k])
                        grid.setdefault("purified", {})[spec] = purified
            cell.update(metrics)
            if reused:
                cell["seconds"] = 0.0  # computed in an earlier cell
            correctness[(index, tm)] = correct
            cells.append(cell)
            bar.update(1)
    return cells, correctness, detection_row


def _detect(
    detectors: dict[str, Any],
    attack: str,
    eps_label: float | str,
    x_adv: torch.Tensor,
    ev: _Evaluator,
) -> dict[str, Any]:
    row: dict[str, Any] = {"attack": attack, "eps": eps_label}
    for name, (detector, clean_scores) in detectors.items():
        scores = detector.score(x_adv.to(ev.device))
        metrics = detection_metrics(clean_scores, scores, DETECTOR_FPR)
        row[name] = {
            "roc_auc": metrics["roc_auc"],
            "tpr_at_5fpr": float((scores > detector.threshold).double().mean()),
            "roc_tpr_at_5fpr": metrics["tpr_at_fpr"],
            "roc_fpr": metrics["roc_fpr"],
            "roc_tpr": metrics["roc_tpr"],
        }
    return row


def _worst_case(
    config: EvaluationConfig,
    cells: list[dict[str, Any]],
    correctness: dict[tuple[Any, ...], torch.Tensor],
) -> list[dict[str, Any]]:
    """Per (defense, threat model, eps): an image is robust only if correct under every attack.

    L-inf eps and ``min-norm`` are separate groups; skipped cells are left out. Randomized
    defenses: the conjunction is taken per evaluation draw (same noise for every attack), then
    averaged over draws.
    """
    groups: dict[tuple[str, str, Any], list[tuple[str, torch.Tensor]]] = {}
    for cell in cells:
        key = (cell["attack"], cell["eps"], config.defenses.index(cell["defense"]))
        correct = correctness.get((*key, cell["threat_model"]))
        if correct is None:
            continue
        group = (cell["defense"], cell["threat_model"], cell["eps"])
        groups.setdefault(group, []).append((cell["attack"], correct))
    rows = []
    for (defense, tm, eps), members in groups.items():
        combined = members[0][1].clone()
        for _, correct in members[1:]:
            combined &= correct
        accuracy, std = _accuracy_stats(combined)
        rows.append(
            {
                "defense": defense,
                "threat_model": tm,
                "eps": eps,
                "attacks": [name for name, _ in members],
                "worst_case_robust_accuracy": accuracy,
                "worst_case_robust_accuracy_std": std,
                "n": int(combined.shape[1]),
            }
        )
    return rows


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
