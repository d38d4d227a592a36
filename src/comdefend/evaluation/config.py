"""What one evaluation run does: :class:`EvaluationConfig` and its checks (no file is read)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from comdefend.attacks import ATTACKS
from comdefend.defenses import DETECTORS, THREAT_MODELS
from comdefend.errors import UsageError
from comdefend.evaluation.progress import PROGRESS_FILE
from comdefend.limits import check_int
from comdefend.models.precision import check_precision

#: How results of minimum-norm attacks (no L-inf budget) are labelled instead of an eps.
MIN_NORM = "min-norm"


def is_min_norm(attack: str) -> bool:
    """Whether the registered ``attack`` is a minimum-norm one (its ``norm`` is not ``linf``:
    DeepFool, C&W and any registered L2 attack): run once, reported under :data:`MIN_NORM`.

    Example:
        >>> is_min_norm("deepfool"), is_min_norm("pgd")
        (True, False)
    """
    return ATTACKS.get(attack).norm != "linf"


#: One line per threat model, for reports.
THREAT_MODEL_MEANINGS: dict[str, str] = {tm.name: tm.meaning for tm in THREAT_MODELS.values()}


@dataclass
class EvaluationConfig:
    """Everything one evaluation run needs; serialised verbatim into ``results.json``.

    Attributes:
        dataset: ``fashion-mnist``, ``cifar10``, ``cifar100`` or ``imagenet``.
        split: ``test`` (the test set) or ``sample`` (the 1,000 class-balanced test images
            embedded in the package; Fashion-MNIST and CIFAR-10).
        classifier: classifier checkpoint path or zoo name (e.g. ``resnet20-cifar10``), or
            ``package.module:factory``: a callable without required arguments that builds the
            user's ``nn.Module`` (:mod:`comdefend.evaluation.inputs`); for a model passed to
            :func:`comdefend.evaluation.evaluate`, the name of its class.
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
        image_size: the center crop of datasets cropped on loading (``imagenet``: default 224);
            ``None``: the dataset's own size.
        precision: numeric precision of every ComDefend defense's purification (``fp32``,
            ``tf32`` on CUDA, ``bf16``: :mod:`comdefend.models.precision`); ``None``: each
            defense's own (fp32 unless its spec says ``@precision=...``). Attacks, classifier
            and the other defenses always run in fp32.
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
    precision: str | None = None
    image_size: int | None = None


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
            bad batch size or EOT counts; an image size above its limit
            (:mod:`comdefend.limits`); the output folder exists without ``force``. Messages
            list the valid choices.
    """
    attacks = check_attacks(config.attacks)
    for name in config.attack_params:
        if name.lower() not in attacks:
            raise UsageError(f"parameters given for attack {name!r}, which is not evaluated")
    tms = check_threat_models(config.threat_models)
    _check_stop_when_fooled(config, tms)
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
    if not eps and any(not is_min_norm(a) for a in attacks):
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
    if config.image_size is not None:
        check_int("image size", config.image_size, 1, limit="image_size")
    if config.device not in ("cpu", "cuda", "auto") and not config.device.startswith("cuda:"):
        raise UsageError(f"unknown device {config.device!r}; valid: cpu, cuda, auto")
    _check_out_folder(config)
    precision = None if config.precision is None else check_precision(config.precision)
    return EvaluationConfig(
        **{
            **asdict(config),
            "attacks": list(dict.fromkeys(attacks)),
            "threat_models": [t for t in THREAT_MODELS if t in tms],
            "eps": sorted(set(eps)),
            "detectors": list(dict.fromkeys(detectors)),
            "defenses": list(dict.fromkeys(d.strip() for d in config.defenses)),
            "attack_params": {k.lower(): dict(v) for k, v in config.attack_params.items()},
            "precision": precision,
        }
    )


#: Threat models whose attacker sees the defense's own forward pass (``relaxed`` changes it,
#: ``oblivious`` leaves the defense out), so that an image that fools the attacker's model
#: fools the defended classifier too.
EXACT_FORWARD_THREAT_MODELS = ("bpda", "bpda+eot")


def _check_stop_when_fooled(config: EvaluationConfig, threat_models: list[str]) -> None:
    """Refuse ``stop_when_fooled`` where it would weaken an attack without saying so.

    It stops each image as soon as the attacker's model misclassifies it; under ``oblivious``
    (the undefended classifier) or ``relaxed`` (the defense's sigmoid view) that model is not
    the defended classifier, so the examples would stop short of fooling the defense.
    """
    stopping = sorted(
        name for name, params in config.attack_params.items() if params.get("stop_when_fooled")
    )
    defended = [d for d in config.defenses if d.strip().lower() != "none"]
    weakened = [t for t in threat_models if t not in EXACT_FORWARD_THREAT_MODELS]
    if stopping and defended and weakened:
        raise UsageError(
            f"{', '.join(stopping)}.stop_when_fooled stops on the attacker's model, which under "
            f"{' and '.join(weakened)} is not the defended classifier: use it with "
            f"--threat-model {','.join(EXACT_FORWARD_THREAT_MODELS)} only (run "
            f"{' and '.join(weakened)} separately, without it)"
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
