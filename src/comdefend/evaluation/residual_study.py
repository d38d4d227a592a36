"""The residual study: accuracy after defending, per preset, along training.

Protocol (the residual-variant study, ``PAPER.md``):

1. Adversarial examples are made once with BIM (L-inf ``eps`` in units of 1/255 like
   ``comdefend evaluate``; the study's 0.03 is the default 7.65/255) against the *undefended*
   classifier, from the first ``n`` test images of ``dataset`` (the study: ImageNet,
   ``--dataset imagenet --classifier efficientnet-lite0`` here). Only the images that the
   classifier gets right *and* that the attack fools are kept: the "fooling set", cached in
   ``OUT``.
2. For every preset, ComDefend is trained with :func:`comdefend.training.train` on
   ``train_dataset`` (the study: CIFAR-10, also the default for ImageNet; run folder
   ``OUT/runs/<preset>``) with the ``residual-study`` recipe, no stabilizer and no early stop,
   keeping a snapshot of the weights every ``eval_every`` iterations and at the end.
3. Every snapshot is measured (:mod:`comdefend.evaluation.snapshots`):

   * ``accuracy_after_defense``: the fraction of the fooling set that
     ``classifier(model.purify(x_adv))`` classifies correctly, with its 95% Wilson interval;
   * ``clean_accuracy_defended``: the same for the clean versions of those images, every
     ``clean_every`` iterations and at the end;
   * ``heldout_psnr_db``: the reconstruction PSNR on the training dataset's first
     ``eval_images`` test images (the trainer's own measurement at that iteration).

Training and measuring are stages (``stage``): ``all`` trains a preset and then measures it,
preset after preset; ``train`` and ``measure`` split them over two processes (give each one
thread on a small CPU), ``measure`` with ``follow`` waiting for the snapshots as the training
writes them. Every stage resumes: training from its checkpoint, measuring from its points file,
where each point is saved as soon as it is measured (none is lost, none is measured twice).

Outputs in ``OUT`` (all written atomically):

* ``fooling_set.safetensors``: the cached fooling set, made so that every machine makes the
  same one (:data:`FOOLING_SET_METHOD`: BIM in float64, rounded to 8-bit levels), with the
  test-set indices and labels, and a checksum. Its identity (dataset, crop, ``n``,
  the sha256 of the attacked images themselves, the classifier's sha256, the attack) must match
  for it to be reused; the clean images are re-read from the dataset by index.
* ``points/<preset>.json``: the measured points
  (:class:`~comdefend.evaluation.snapshots.PointsFile`).
* ``results.json``: settings, classifier provenance, fooling-set statistics, and per preset its
  names, parameter counts, training state, every point, the best and the final point and the
  first collapse; ``points.csv``: every point as a row.
* ``accuracy_vs_iteration.png`` (the study's three panels, residual encoder / decoder / both,
  each with the plain model), ``accuracy_vs_psnr.png`` and ``clean_accuracy_vs_iteration.png``.
* ``table.md``: the final table.

Usage from Python::

    from comdefend.evaluation.residual_study import ResidualStudyConfig, run_residual_study
    results = run_residual_study(ResidualStudyConfig(classifier="c.safetensors", out="r/x"))
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from comdefend.attacks import BIM
from comdefend.attacks.base import check_real
from comdefend.checkpoint import (
    atomic_write,
    atomic_write_text,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from comdefend.data.datasets import DATASETS, ImageSet, load_dataset, tensors_sha256
from comdefend.errors import CheckpointError, UsageError
from comdefend.evaluation.snapshots import (
    PointsFile,
    SnapshotPoint,
    defended_correct,
    list_snapshots,
    measure_snapshots,
)
from comdefend.models.classifiers import Classifier, check_classifier_fits, load_classifier
from comdefend.models.presets import PRESETS, Preset, get_preset, preset_summary
from comdefend.training.logs import read_training_log
from comdefend.training.recipes import resolve_config
from comdefend.training.run import differing_settings, resolve_device
from comdefend.training.trainer import LEGACY_DEFAULTS, TrainConfig, train
from comdefend.validation import set_threads

ADVERSARIAL_KIND = "residual-study-fooling-set"
ADVERSARIAL_FILE = "fooling_set.safetensors"
#: Images per batch when the fooling set is made and its images are classified. Fixed, not
#: ``--inference-batch``: BIM steps along the sign of the gradient, which turns the rounding
#: differences between batch sizes into whole steps (batches of 16 and of 256 gave fooling sets
#: differing in 2.6% of their values on one CPU), and a speed setting must not change the test
#: set. 16 is what every study made so far used.
FOOLING_SET_BATCH = 16
#: How the fooling set is made, recorded in its cache: BIM in float64 (classifier and images),
#: every attacked image rounded to 8-bit levels inside the budget, and "correct" and "fooled"
#: decided in float64. BIM steps along the sign of the gradient, and in float32 the rounding of
#: one CPU's kernels flips a few signs that the next steps amplify: three CPUs (two of them with
#: AVX-512) made three different float32 sets of the same 100 ImageNet images, and on one CPU
#: its AVX-512 and its AVX2 kernels gave float32 sets differing in 58% of their 8-bit levels.
#: Made this way, EfficientNet-Lite0's set (32 images) and ResNet-20's (48 CIFAR-10 images)
#: came out identical with the AVX-512, the AVX2 and the plainest kernels, so a study's points
#: can be measured wherever its snapshots are. Not every classifier allows it: one that max-pools
#: flat regions (fashion-cnn on Fashion-MNIST's black backgrounds) breaks ties between equal
#: values by its kernels' order, and its set still depends on the machine. A cached set that
#: records no method was made the earlier way (float32 tensors as BIM returned them) and is
#: read as such.
FOOLING_SET_METHOD = "bim-float64-8bit"
#: The method of a cached set that records none.
LEGACY_FOOLING_SET_METHOD = "bim-float32"
#: BIM is deterministic: the fooling set is made, and recorded, with this seed whatever the
#: study's ``--seed``, so that studies at other seeds share one fooling set.
FOOLING_SET_ATTACK_SEED = 0
#: The study's BIM budget, 0.03 on [0, 1] images, in units of 1/255.
STUDY_EPS = 7.65
#: The chart's panels: preset-name prefix -> title (each also shows the plain model).
CHART_FAMILIES: tuple[tuple[str, str], ...] = (
    ("residual-encoder-", "residual encoder 1-3"),
    ("residual-decoder-", "residual decoder 1-3"),
    ("residual-both-", "residual encoder and decoder 1-3"),
)
RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy_vs_iteration.png"
PSNR_PLOT_FILE = "accuracy_vs_psnr.png"
CLEAN_PLOT_FILE = "clean_accuracy_vs_iteration.png"
POINTS_CSV = "points.csv"
POINTS_FOLDER = "points"
#: How the work is split: ``all`` (train then measure, preset after preset), ``train`` or
#: ``measure`` (two processes).
STAGES = ("all", "train", "measure")
TABLE_FILE = "table.md"
RUNS_FOLDER = "runs"
# Training settings that may differ between a finished run and the current request: those a
# resume may change (where the folder lies is not a setting: a moved or copied study resumes),
# but the iterations, which decide whether the finished run is extended, and the spacing of
# evaluations and snapshots, which the study measures (a run with others lacks its points).
_IGNORED_TRAIN_KEYS = TrainConfig.RESUMABLE_CHANGES - {"iterations", "eval_every", "snapshot_every"}


@dataclass
class ResidualStudyConfig:
    """Every setting of a residual study (saved in ``results.json``).

    Attributes:
        dataset: the classifier's dataset, whose test images are attacked (``imagenet``,
            ``cifar10``, ``cifar100``, ``fashion-mnist``).
        classifier: path of the classifier checkpoint (``comdefend train-classifier``).
        presets: ``"all"`` or comma-separated preset names / study aliases.
        out: experiment folder.
        iterations: training iterations of every preset.
        eval_every: snapshot and measuring interval (iterations; the study: 100); the last
            iteration is always measured.
        clean_every: defended clean accuracy is measured every this many iterations (and at
            the last); a multiple of ``eval_every``.
        batch_size: training batch size.
        lr: learning rate (``None``: the schedule's default).
        lr_schedule: learning-rate schedule (see ``comdefend.training.schedules``).
        attack_eps: BIM L-inf budget in units of 1/255, in (0, 255] (default 7.65 = 0.03).
        attack_steps: BIM iterations.
        n: the first ``n`` test images are attacked.
        seed: training seed (the fooling set does not depend on it: BIM is deterministic).
        data_dir: folder of ``dataset`` (else ``$COMDEFEND_DATA`` / defaults).
        train_dataset: what ComDefend trains on (``None``: ``dataset``; ``cifar10`` when
            ``dataset`` is ``imagenet``, as the study did).
        train_data_dir: folder of ``train_dataset`` (else ``$COMDEFEND_DATA`` / defaults).
        image_size: crop size of ``imagenet`` images (``None``: 224).
        eval_images: held-out images for the trainer's PSNR.
        inference_batch: images per forward pass when measuring accuracy (the fooling set
            is made in batches of :data:`FOOLING_SET_BATCH` whatever this is).
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: CPU threads for torch.
        precision: the training's arithmetic (``fp32``, ``bf16``, ...; see
            :class:`~comdefend.training.trainer.TrainConfig`); measuring is always fp32.
    """

    classifier: str
    out: str
    dataset: str = "cifar10"
    presets: str = "all"
    iterations: int = 7500
    eval_every: int = 100
    clean_every: int = 500
    batch_size: int = 20
    lr: float | None = None
    lr_schedule: str = "constant"
    attack_eps: float = STUDY_EPS
    attack_steps: int = 10
    n: int = 1000
    seed: int = 0
    data_dir: str | None = None
    train_dataset: str | None = None
    train_data_dir: str | None = None
    image_size: int | None = None
    eval_images: int = 500
    inference_batch: int = 250
    device: str = "auto"
    threads: int | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        self.dataset = DATASETS.get(self.dataset).name  # UsageError listing the valid ones
        if self.train_dataset is None:
            self.train_dataset = "cifar10" if self.dataset == "imagenet" else self.dataset
        train_spec = DATASETS.get(self.train_dataset)
        self.train_dataset = train_spec.name
        if "train" not in train_spec.splits:
            raise UsageError(f"--train-dataset {train_spec.name} has no training split")
        if train_spec.channels != DATASETS.get(self.dataset).channels:
            raise UsageError(
                f"--train-dataset {train_spec.name} has {train_spec.channels}-channel images but "
                f"{self.dataset} has {DATASETS.get(self.dataset).channels}"
            )
        if self.image_size is not None and self.image_size < 32:
            raise UsageError(f"--image-size must be >= 32, got {self.image_size}")
        parse_presets(self.presets)
        for name in ("iterations", "eval_every", "clean_every", "batch_size", "attack_steps", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
        if self.clean_every % self.eval_every:
            raise UsageError(
                f"--clean-every ({self.clean_every}) must be a multiple of --eval-every "
                f"({self.eval_every}): clean accuracy is measured on the same snapshots"
            )
        if self.inference_batch < 1:
            raise UsageError(f"inference batch must be >= 1, got {self.inference_batch}")
        if self.eval_images < 0:
            raise UsageError(f"--eval-images must be >= 0, got {self.eval_images}")
        if self.seed < 0:
            raise UsageError(f"--seed must be >= 0, got {self.seed}")
        try:
            self.attack_eps = check_real("eps", self.attack_eps, low=0.0, high=255.0, low_open=True)
        except UsageError as error:
            raise UsageError(
                f"--attack-eps is an L-inf budget in units of 1/255 and must be in (0, 255], "
                f"got {self.attack_eps!r} ({error})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        return asdict(self)

    def train_config(self, preset: Preset) -> TrainConfig:
        """The :class:`TrainConfig` of ``preset``'s run in ``OUT/runs/<preset>``: the
        ``residual-study`` recipe (:mod:`comdefend.training.recipes`) with this study's
        settings, a snapshot at every measured iteration, and no early stop on a dead run (the
        study reports its collapses to the last iteration)."""
        return resolve_config(
            "residual-study",
            dataset=self.train_dataset or self.dataset,
            out=str(Path(self.out) / RUNS_FOLDER / preset.name),
            preset=preset.name,
            iterations=self.iterations,
            batch_size=self.batch_size,
            lr=self.lr,
            lr_schedule=self.lr_schedule,
            seed=self.seed,
            data_dir=self.train_data_dir,
            eval_every=self.eval_every,
            eval_images=self.eval_images,
            checkpoint_every=self.eval_every,
            snapshot_every=self.eval_every,
            stop_when_dead=False,
            device=self.device,
            threads=self.threads,
            precision=self.precision,
        )


def parse_presets(spec: str | list[str] | tuple[str, ...]) -> list[Preset]:
    """``"all"`` or comma-separated names/aliases -> presets (in the given order, no repeats).

    Raises:
        UsageError: empty list or unknown name (the message lists the valid presets).

    Example:
        >>> [p.name for p in parse_presets("normal, 1_on_off,plain")]
        ['plain', 'residual-encoder-1']
    """
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise UsageError("--presets is empty; pass 'all' or comma-separated preset names")
    if names == ["all"]:
        return list(PRESETS.values())
    chosen: list[Preset] = []
    for name in names:
        preset = get_preset(name)  # UsageError listing the valid presets
        if preset not in chosen:
            chosen.append(preset)
    return chosen


# --------------------------------------------------------------------------- the fooling set


@dataclass
class AdversarialSet:
    """The fooling set: clean and adversarial images (float32 in [0, 1]) and true labels.

    ``indices`` are positions in the test split; ``stats`` counts attacked, correctly
    classified and fooled images.
    """

    clean: torch.Tensor
    adversarial: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    stats: dict[str, Any]
    method: str = FOOLING_SET_METHOD

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sha256(self) -> str:
        """A digest of the set's contents (adversarial and clean pixels, indices, labels)."""
        return tensors_sha256(
            {
                "adversarial": self.adversarial,
                "clean": self.clean,
                "indices": self.indices.to(torch.int64),
                "labels": self.labels.to(torch.int64),
            }
        )


def images_sha256(data: ImageSet) -> str:
    """sha256 of a set's pixels and labels together (:func:`tensors_sha256`): what a cache
    made from them depends on (not the folder's name, which may hold other images tomorrow).

    Not :meth:`ImageSet.identity` (pixels and labels hashed apart): the studies already made
    record this one value in their fooling set and points files, and must keep resuming."""
    return tensors_sha256({"images": data.images, "labels": data.labels.to(torch.int64)})


def fooling_attack(classifier: Classifier, config: ResidualStudyConfig) -> BIM:
    """The BIM attack that makes the fooling set (the study's ``--attack-eps`` and
    ``--attack-steps``; seed :data:`FOOLING_SET_ATTACK_SEED` whatever ``--seed``)."""
    return BIM(
        classifier,
        eps=config.attack_eps / 255,
        steps=config.attack_steps,
        seed=FOOLING_SET_ATTACK_SEED,
    )


def make_adversarial_set(
    classifier: Classifier, data: ImageSet, config: ResidualStudyConfig, device: torch.device
) -> tuple[AdversarialSet, dict[str, Any]]:
    """Attack the first ``n`` test images with BIM; keep those correct before and fooled after.

    Returns the set and the attack's settings.
    """
    exact = copy.deepcopy(classifier).double()  # the caller's classifier stays float32
    attack = fooling_attack(exact, config)
    head = data.head(config.n)
    clean = head.float_images()
    labels = head.labels
    clean64 = clean.double()
    correct = defended_correct(None, exact, clean64, labels, FOOLING_SET_BATCH)
    kept = torch.nonzero(correct).flatten()
    adversarial = torch.zeros((0, *clean.shape[1:]), dtype=torch.float32)
    fooled = torch.zeros(0, dtype=torch.bool)
    if kept.numel():
        chunks = [
            attack(clean64[index].to(device), labels[index].to(device)).cpu()
            for index in kept.split(FOOLING_SET_BATCH)
        ]
        levels = to_levels(torch.cat(chunks), clean64[kept], config.attack_eps)
        images = levels / 255
        fooled = ~defended_correct(None, exact, images, labels[kept], FOOLING_SET_BATCH)
        adversarial = images.float()
    chosen = kept[fooled]
    stats = {
        "attacked_images": len(head),
        "clean_correct": int(kept.numel()),
        "clean_accuracy": int(kept.numel()) / len(head),
        "fooled": int(chosen.numel()),
        "attack_success_rate": int(chosen.numel()) / max(int(kept.numel()), 1),
        "size": int(chosen.numel()),
    }
    result = AdversarialSet(
        clean[chosen], adversarial[fooled].contiguous(), labels[chosen], chosen, stats
    )
    return result, attack.settings()


def to_levels(adversarial: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Adversarial images rounded to 8-bit levels (float64 0-255), each pixel kept within
    ``eps`` (in units of 1/255) of its clean 8-bit value and within [0, 255].

    Example:
        >>> clean = torch.tensor([0.0, 100.0, 255.0]) / 255
        >>> to_levels(clean + torch.tensor([3.4, -7.6, 0.2]) / 255, clean, 7.65).tolist()
        [3.0, 93.0, 255.0]
        >>> to_levels(clean + torch.tensor([9.0, 7.8, -9.0]) / 255, clean, 7.65).tolist()
        [7.0, 107.0, 248.0]
    """
    base = torch.round(clean.double() * 255)
    budget = math.floor(eps + 1e-9)
    levels = torch.round(adversarial.double() * 255)
    return torch.minimum(torch.maximum(levels, base - budget), base + budget).clamp(0, 255)


def adversarial_identity(
    config: ResidualStudyConfig, classifier_sha: str, attack: dict[str, Any], images_sha: str
) -> dict[str, Any]:
    """What a cached fooling set must have been made with to be reused: dataset, crop size,
    image count, the attacked images themselves (sha256), classifier weights (sha256) and the
    attack's settings."""
    return {
        "dataset": config.dataset,
        "image_size": config.image_size,
        "n": config.n,
        "images_sha256": images_sha,
        "classifier_sha256": classifier_sha,
        "attack": attack,
        "method": FOOLING_SET_METHOD,
    }


def _stored_tensors(adv: AdversarialSet) -> dict[str, torch.Tensor]:
    return {
        "adversarial": adv.adversarial,
        "indices": adv.indices.to(torch.int64),
        "labels": adv.labels.to(torch.int64),
    }


def save_adversarial_set(path: Path, adv: AdversarialSet, identity: dict[str, Any]) -> None:
    """Write the fooling set (exact float32 adversarial images, indices, labels) atomically,
    with a checksum of its tensors."""
    tensors = _stored_tensors(adv)
    metadata = {
        "kind": ADVERSARIAL_KIND,
        **identity,
        "stats": adv.stats,
        "tensors_sha256": tensors_sha256(tensors),
    }
    save_checkpoint(path, tensors, metadata)


def load_adversarial_set(path: Path, data: ImageSet, identity: dict[str, Any]) -> AdversarialSet:
    """Read a cached fooling set.

    Raises:
        UsageError: made with other settings or other images, or altered since it was written
            (checksum, NaN, values outside [0, 1], indices outside the test images).
    """
    damaged = f"delete {path} to make the fooling set again"
    try:
        tensors, metadata = load_checkpoint(path, ADVERSARIAL_KIND)
    except CheckpointError as error:
        raise UsageError(f"{error}; {damaged}") from None
    if "method" not in metadata:  # made before the method was recorded: float32, as returned
        identity = {key: value for key, value in identity.items() if key != "method"}
    differing = sorted(key for key in identity if metadata.get(key) != identity[key])
    if differing:
        details = ", ".join(
            f"{k}: {_short(metadata.get(k))} -> {_short(identity[k])}" for k in differing
        )
        raise UsageError(
            f"{path} was made with other settings or images ({details}); use another --out "
            "or delete it"
        )
    expected = {"adversarial", "indices", "labels"}
    if set(tensors) != expected or metadata.get("tensors_sha256") != tensors_sha256(tensors):
        raise UsageError(f"{path} does not match its checksum (the file was altered); {damaged}")
    adversarial = tensors["adversarial"]
    indices = tensors["indices"].to(torch.int64)
    labels = tensors["labels"].to(torch.int64)
    if not bool(torch.isfinite(adversarial).all()) or (
        adversarial.numel() and (adversarial.min() < 0 or adversarial.max() > 1)
    ):
        raise UsageError(f"{path} holds values that are not images in [0, 1]; {damaged}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= len(data)):
        raise UsageError(
            f"{path} refers to images outside the first {len(data)} test images; {damaged}"
        )
    if not (len(indices) == len(labels) == len(adversarial)) or (
        indices.numel() and not torch.equal(data.labels[indices], labels)
    ):
        raise UsageError(f"{path} does not match the labels of the {data.name} test split")
    return AdversarialSet(
        data.float_images(indices),
        adversarial,
        labels,
        indices,
        metadata["stats"],
        str(metadata.get("method", LEGACY_FOOLING_SET_METHOD)),
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "...'"


@torch.no_grad()
def fooling_set(
    classifier: Classifier,
    data: ImageSet,
    config: ResidualStudyConfig,
    classifier_sha: str,
    device: torch.device,
    cache: Path,
    reuse: bool,
) -> tuple[AdversarialSet, dict[str, Any]]:
    """The study's fooling set and BIM's settings: read from ``cache`` when ``reuse`` and it
    exists (refused if made with other settings or images), else made and saved there.

    Raises :class:`UsageError` when the set is empty."""
    attack = fooling_attack(classifier, config).settings()
    identity = adversarial_identity(
        config, classifier_sha, attack, images_sha256(data.head(config.n))
    )
    if reuse and cache.exists():
        adv = load_adversarial_set(cache, data, identity)
    else:
        adv, _ = make_adversarial_set(classifier, data, config, device)
        if len(adv):  # an empty set is not kept: the error below asks for other settings
            save_adversarial_set(cache, adv, identity)
    if len(adv) == 0:
        raise UsageError(
            f"the fooling set is empty: of the first {config.n} test images, "
            f"{adv.stats['clean_correct']} are classified correctly and none is fooled by BIM "
            f"(eps {config.attack_eps:g}/255); raise --n or --attack-eps"
        )
    return adv, attack


# --------------------------------------------------------------------------- the stages


def load_checked_classifier(config: ResidualStudyConfig, device: torch.device) -> Classifier:
    """Load the classifier; :class:`UsageError` if it was not made for ``config.dataset``."""
    model = load_classifier(config.classifier, device)  # resolved once, kept as model.weights
    check_classifier_fits(model, config.dataset, label=config.classifier)
    return model.requires_grad_(False)


def _finished_run(run: Path, train_config: TrainConfig) -> bool:
    """True when ``run`` holds a completed run of exactly ``train_config``."""
    summary_path = run / "summary.json"
    if not summary_path.exists():
        return False
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    wanted = train_config.to_dict()
    # the engine's rule of --resume (LEGACY_DEFAULTS: what older runs do not record)
    differing = differing_settings(
        summary.get("config", {}), wanted, _IGNORED_TRAIN_KEYS, LEGACY_DEFAULTS
    )
    shorter = int(summary.get("iterations", 0)) < wanted["iterations"]
    if list(differing) == ["iterations"] and shorter:
        return False  # a shorter finished run: resume extends it
    if differing:
        details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in differing.items())
        raise UsageError(f"--resume: {run} was trained with other settings ({details})")
    return True


def _existing_study(out: Path) -> bool:
    return any((out / name).exists() for name in (RESULTS_FILE, ADVERSARIAL_FILE, RUNS_FOLDER))


def train_preset(
    config: ResidualStudyConfig,
    preset: Preset,
    resume: bool,
    progress: bool,
    pause_at: int | None = None,
) -> str:
    """Train (or continue) one preset's run; ``"trained"``, ``"resumed"``, ``"reused"`` or
    ``"paused at N"`` (``pause_at``: stop after that iteration, resumable)."""
    train_config = config.train_config(preset)
    run = Path(train_config.out)
    if not resume and (run / "log.jsonl").exists():
        raise UsageError(
            f"{run} already holds a run; pass --resume to continue the study, "
            "or choose another --out"
        )
    if resume and _finished_run(run, train_config):
        return "reused"
    continue_run = resume and (run / "checkpoint.safetensors").exists()
    summary = train(train_config, resume=continue_run, progress=progress, pause_at=pause_at)
    if summary.get("paused"):
        return f"paused at {summary['iteration']:,}"
    return "resumed" if continue_run else "trained"


def train_presets(
    config: ResidualStudyConfig,
    resume: bool = False,
    progress: bool = True,
    pause_at: int | None = None,
) -> dict[str, str]:
    """Train (or continue) every preset's run of the study, with its snapshots; measure
    nothing. Returns ``{preset: "trained" | "resumed" | "reused" | "paused at N"}``.

    This is ``comdefend residual-study --stage train``: another process can measure the
    snapshots meanwhile (``--stage measure --follow``). ``pause_at`` trains each preset only up
    to that iteration in this call (breadth-first: every preset to 1,600, then every preset
    further with a later ``resume``).
    """
    check_pause_at(pause_at)
    set_threads(config.threads)
    return {
        preset.name: train_preset(config, preset, resume, progress, pause_at)
        for preset in parse_presets(config.presets)
    }


def check_measure_at(
    config: ResidualStudyConfig, measure_at: Collection[int] | None, stage: str, follow: bool
) -> None:
    """Refuse a ``measure_at`` that measures nothing or cannot be honoured."""
    if measure_at is None:
        return
    if stage != "measure" or follow:
        raise UsageError("--measure-at goes with --stage measure, without --follow")
    if not measure_at:
        raise UsageError("--measure-at needs at least one iteration")
    for iteration in sorted(measure_at):
        if (
            iteration <= 0
            or iteration > config.iterations
            or not (iteration % config.eval_every == 0 or iteration == config.iterations)
        ):
            raise UsageError(
                f"--measure-at {iteration}: the study keeps snapshots every --eval-every "
                f"({config.eval_every}) iterations and at the last ({config.iterations})"
            )


def check_pause_at(pause_at: int | None) -> None:
    """Refuse a ``pause_at`` below 1 (:class:`UsageError`)."""
    if pause_at is not None and pause_at < 1:
        raise UsageError(f"--pause-at must be an iteration >= 1, got {pause_at}")


class StudyMeasurer:
    """Measures the study's snapshots: the classifier, the fooling set and the held-out images,
    loaded once; one points file per preset (``OUT/points/<preset>.json``)."""

    def __init__(self, config: ResidualStudyConfig, reuse_fooling_set: bool = True) -> None:
        self.config = config
        self.out = Path(config.out)
        self.device = resolve_device(config.device)
        self.classifier = load_checked_classifier(config, self.device)
        assert self.classifier.weights is not None  # set by load_classifier
        self.classifier_sha = self.classifier.weights.sha256
        # Only the attacked images are loaded: on an ImageNet folder the others are not decoded.
        test = load_dataset(
            config.dataset, "test", config.data_dir, image_size=config.image_size,
            max_images=config.n,
        )  # fmt: skip
        self.out.mkdir(parents=True, exist_ok=True)
        self.adv, self.attack = fooling_set(
            self.classifier, test, config, self.classifier_sha, self.device,
            self.out / ADVERSARIAL_FILE, reuse=reuse_fooling_set,
        )  # fmt: skip
        self._points: dict[str, PointsFile] = {}
        self.heldout: torch.Tensor | None = None
        heldout_sha = None
        if config.eval_images > 0:
            train_test = load_dataset(
                config.train_dataset or config.dataset, "test", config.train_data_dir
            ).head(config.eval_images)
            self.heldout = train_test.float_images()
            heldout_sha = images_sha256(train_test)
        self.identity = {
            "fooling_set_sha256": self.adv.sha256(),
            "classifier_sha256": self.classifier_sha,
            "clean_every": config.clean_every,
            "eval_images": config.eval_images,
            "heldout_images_sha256": heldout_sha,
            "image_size": config.image_size,
        }

    def points(self, preset: Preset) -> PointsFile:
        """The preset's points file, read once (this measurer is the one process adding to
        it; every point it adds is written through the same object)."""
        if preset.name not in self._points:
            path = self.out / POINTS_FOLDER / f"{preset.name}.json"
            self._points[preset.name] = PointsFile(path, self.identity)
        return self._points[preset.name]

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` is one the study measures (every ``eval_every`` and the last)."""
        return iteration % self.config.eval_every == 0 or iteration == self.config.iterations

    def measure(
        self,
        preset: Preset,
        on_point: Callable[[SnapshotPoint], None] | None = None,
        only: Collection[int] | None = None,
    ) -> list[SnapshotPoint]:
        """Measure ``preset``'s snapshots that have no point yet (of ``only``'s iterations,
        when given); returns the new points."""
        config = self.config
        run = Path(config.train_config(preset).out)
        due = [
            iteration
            for iteration, _ in list_snapshots(run)
            if self.due(iteration) and (only is None or iteration in only)
        ]
        return measure_snapshots(
            run,
            self.points(preset),
            self.classifier,
            self.adv.adversarial,
            self.adv.labels,
            clean=self.adv.clean,
            clean_due=lambda it: it % config.clean_every == 0 or it == config.iterations,
            heldout=self.heldout,
            iterations=due,
            batch=config.inference_batch,
            on_point=on_point,
        )

    def complete(self, preset: Preset) -> bool:
        """The preset's run is finished and every iteration it should have is measured."""
        config = self.config
        run = Path(config.train_config(preset).out)
        if not (run / "summary.json").exists():
            return False
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        if int(summary.get("iterations", 0)) < config.iterations:
            return False
        wanted = set(range(config.eval_every, config.iterations + 1, config.eval_every))
        wanted.add(config.iterations)
        return wanted <= set(self.points(preset).points)


def _echo_point(preset: Preset, progress: bool) -> Callable[[SnapshotPoint], None]:
    def echo(point: SnapshotPoint) -> None:
        if progress:
            row = point.summary()
            clean = row["clean_accuracy_defended"]
            psnr = row["heldout_psnr_db"]
            print(
                f"{preset.name} @ {point.iteration}: accuracy after defending "
                f"{row['accuracy_after_defense']:.3f} ({row['restored']}/"
                f"{row['fooling_set_size']})"
                + ("" if clean is None else f", clean {clean:.3f}")
                + ("" if psnr is None else f", PSNR {psnr:.2f} dB")
                + f" [{point.seconds:.0f} s]",
                flush=True,
            )

    return echo


def run_residual_study(
    config: ResidualStudyConfig,
    resume: bool = False,
    progress: bool = True,
    stage: str = "all",
    follow: bool = False,
    poll_seconds: float = 10.0,
    pause_at: int | None = None,
    measure_at: Collection[int] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the residual study; returns what is written to ``results.json``.

    Args:
        config: the study's settings.
        resume: continue the study in ``config.out``: finished presets are kept, an interrupted
            one continues from its checkpoint, the cached fooling set and the measured points are
            reused. Without it, an ``out`` folder that holds a study is refused (``stage``
            ``measure`` always reuses what is there: it only adds points).
        progress: progress bars and one line per measured point.
        stage: ``all`` (train, then measure, preset after preset), ``train`` (no measuring; the
            returned dict then holds ``{"trained": {preset: status}}``) or ``measure`` (the
            snapshots that are there).
        follow: with ``stage="measure"``, keep waiting for new snapshots (every
            ``poll_seconds``) until every preset's run is finished and measured.
        pause_at: with ``stage`` ``all`` or ``train``, train each preset only up to this
            iteration in this call (its checkpoint kept; ``resume`` continues it later).
        measure_at: with ``stage="measure"`` and no ``follow``, measure only the snapshots of
            these iterations (each a multiple of ``eval_every`` or the last; the others are
            left for a later call): a quick first look at a long run, or a few points of a
            comparison run.

    Raises:
        UsageError: bad settings, classifier/dataset mismatch, an existing experiment without
            ``resume``, a cache, run or points file made with other settings, an altered file,
            or an empty fooling set.
    """
    if stage not in STAGES:
        raise UsageError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if follow and stage != "measure":
        raise UsageError("--follow goes with --stage measure")
    if pause_at is not None and stage == "measure":
        raise UsageError("--pause-at goes with --stage all or train (measuring trains nothing)")
    check_pause_at(pause_at)
    check_measure_at(config, measure_at, stage, follow)
    presets = parse_presets(config.presets)
    out = Path(config.out)
    if stage != "measure" and not resume and _existing_study(out):
        raise UsageError(
            f"{out} already holds a residual study; pass --resume to continue it, "
            "or choose another --out"
        )
    set_threads(config.threads)  # None: torch's default; 0 or less is refused, not ignored
    if stage == "train":
        return {
            "trained": train_presets(config, resume=resume, progress=progress, pause_at=pause_at)
        }

    measurer = StudyMeasurer(config, reuse_fooling_set=resume or stage == "measure")
    statuses: dict[str, str] = {}
    shown = study_presets(config, presets)
    for preset in presets:
        if stage == "all":
            statuses[preset.name] = train_preset(config, preset, resume, progress, pause_at)
        measurer.measure(preset, _echo_point(preset, progress), only=measure_at)
        write_reports(out, collect_results(config, measurer, shown, statuses))
    while follow and not all(measurer.complete(preset) for preset in presets):
        time.sleep(poll_seconds)
        new = [measurer.measure(preset, _echo_point(preset, progress)) for preset in presets]
        if any(new):
            write_reports(out, collect_results(config, measurer, shown, statuses))
    results = collect_results(config, measurer, shown, statuses)
    write_reports(out, results)
    return results


def study_presets(config: ResidualStudyConfig, asked: list[Preset]) -> list[Preset]:
    """The presets a study's results show: those asked for, and every other preset the folder
    holds points or a run of (a resume with fewer ``--presets`` keeps the others), in the
    presets' order."""
    out = Path(config.out)
    held = {path.stem for path in (out / POINTS_FOLDER).glob("*.json")}
    held |= {path.name for path in (out / RUNS_FOLDER).glob("*") if path.is_dir()}
    return [preset for preset in PRESETS.values() if preset in asked or preset.name in held]


# --------------------------------------------------------------------------- results


def _run_state(config: ResidualStudyConfig, preset: Preset) -> dict[str, Any]:
    """Where a preset's training stands, from its folder."""
    run = Path(config.train_config(preset).out)
    state: dict[str, Any] = {"run": str(run), "iterations_done": 0, "finished": False}
    summary = run / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text(encoding="utf-8"))
        state["iterations_done"] = int(data.get("iterations", 0))
        state["finished"] = state["iterations_done"] >= config.iterations
        state["training_seconds_last_session"] = None
    elif (run / "checkpoint.safetensors").exists():  # where a resume continues from
        state["iterations_done"] = int(read_metadata(run / "checkpoint.safetensors")["iteration"])
    if (run / "log.jsonl").exists():
        log = read_training_log(run, running=True)  # the trainer may be writing it now
        state["collapse_flagged_at"] = log.flagged[0] if log.flagged else None
    return state


def collect_results(
    config: ResidualStudyConfig,
    measurer: StudyMeasurer,
    presets: list[Preset],
    statuses: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``results.json``'s contents from the points files and the run folders."""
    image_channels = DATASETS[config.dataset].channels
    classifier = measurer.classifier
    assert classifier.weights is not None
    results: dict[str, Any] = {
        "kind": "residual-study",
        "settings": config.to_dict(),
        "classifier": {
            "path": str(config.classifier),
            "sha256": measurer.classifier_sha,
            "weights": classifier.weights.to_dict(),
            "arch": classifier.config.arch if classifier.config else None,
            "dataset": config.dataset,
        },
        "attack": measurer.attack,
        "adversarial_set": {
            "file": ADVERSARIAL_FILE,
            **measurer.adv.stats,
            "method": measurer.adv.method,
            "sha256": measurer.identity["fooling_set_sha256"],
        },
        "presets": {},
    }
    complete = True
    for preset in presets:  # every preset shown: the study is complete when all are
        points = [point.summary() for point in measurer.points(preset).sorted_points()]
        summary = preset_summary(preset, image_channels)
        final = points[-1] if points and points[-1]["iteration"] == config.iterations else None
        best = max(points, key=lambda p: p["accuracy_after_defense"]) if points else None
        psnr = {p["iteration"]: p["heldout_psnr_db"] for p in points}
        state = _run_state(config, preset)
        complete = complete and measurer.complete(preset)
        results["presets"][preset.name] = {
            "name": preset.name,
            "study_name": preset.study_name,
            "aliases": list(preset.names),
            "description": preset.description,
            "encoder_parameters": summary["encoder_parameters"],
            "decoder_parameters": summary["decoder_parameters"],
            "code_channels": summary["code_channels"],
            "status": (statuses or {}).get(preset.name),
            "training": state,
            "evaluations": points,
            "best": best,
            "final": final,
            "first_psnr_collapse": _first_collapse(psnr),
        }
    results["complete"] = complete
    return results


def _first_collapse(psnr: dict[int, float | None]) -> int | None:
    from comdefend.training.logs import first_collapse

    return first_collapse({k: v for k, v in psnr.items() if v is not None})


# --------------------------------------------------------------------------- reports


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def interval_text(point: dict[str, Any] | None, key: str, digits: int = 3) -> str:
    """A point's proportion with its 95% interval (``key_interval``), as tables show it.

    Example:
        >>> point = {"accuracy": 0.25, "accuracy_interval": [0.1234, 0.4567]}
        >>> interval_text(point, "accuracy"), interval_text(point, "accuracy", digits=2)
        ('0.250 [0.123, 0.457]', '0.250 [0.12, 0.46]')
        >>> interval_text(None, "accuracy")
        'n/a'
    """
    if not point or point.get(key) is None:
        return "n/a"
    low, high = point[f"{key}_interval"]
    return f"{point[key]:.3f} [{low:.{digits}f}, {high:.{digits}f}]"


def write_table(path: Path, results: dict[str, Any]) -> None:
    """The final table (Markdown), one row per preset, with 95% intervals."""
    adv = results["adversarial_set"]
    lines = [
        f"# Residual study: accuracy after defending ({results['settings']['dataset']})",
        "",
        f"BIM L-inf eps {results['attack']['eps'] * 255:.4g}/255, "
        f"{results['attack']['steps']} steps, "
        f"against the undefended classifier; fooling set: {adv['size']} of "
        f"{adv['attacked_images']} test images (clean accuracy {adv['clean_accuracy']:.4f}). "
        "Accuracies with 95% Wilson intervals.",
        "",
        "| preset | study name | trained | measured points | accuracy after defending, last "
        "point | best (iteration) | clean accuracy (defended), last | held-out PSNR (dB), last "
        "| encoder params | decoder params |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["presets"].values():
        points = entry["evaluations"]
        last = points[-1] if points else None
        clean = next(
            (p for p in reversed(points) if p["clean_accuracy_defended"] is not None), None
        )
        best = entry.get("best")
        best_text = (
            "n/a" if not best else f"{best['accuracy_after_defense']:.3f} ({best['iteration']:,})"
        )
        lines.append(
            f"| {entry['name']} | {entry['study_name']} | "
            f"{entry['training']['iterations_done']:,} | {len(points)} "
            f"(to {_fmt(last and last['iteration'], ',')}) | "
            f"{interval_text(last, 'accuracy_after_defense')} | {best_text} | "
            f"{interval_text(clean, 'clean_accuracy_defended')} | "
            f"{_fmt(last and last['heldout_psnr_db'], '.2f')} | "
            f"{entry['encoder_parameters']:,} | {entry['decoder_parameters']:,} |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


CSV_COLUMNS = (
    "preset", "study_name", "iteration", "accuracy_after_defense", "interval_low",
    "interval_high", "restored", "fooling_set_size", "clean_accuracy_defended",
    "clean_interval_low", "clean_interval_high", "heldout_psnr_db", "snapshot_sha256",
)  # fmt: skip


def write_points_csv(path: Path, results: dict[str, Any]) -> None:
    """Every measured point as one CSV row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in results["presets"].values():
        for point in entry["evaluations"]:
            low, high = point["accuracy_after_defense_interval"]
            clean_low, clean_high = point["clean_accuracy_defended_interval"] or (None, None)
            writer.writerow(
                [
                    entry["name"],
                    entry["study_name"],
                    point["iteration"],
                    point["accuracy_after_defense"],
                    low,
                    high,
                    point["restored"],
                    point["fooling_set_size"],
                    point["clean_accuracy_defended"],
                    clean_low,
                    clean_high,
                    point["heldout_psnr_db"],
                    point["snapshot_sha256"],
                ]  # fmt: skip
            )
    atomic_write_text(path, buffer.getvalue())


def _family_panels(
    presets: list[dict[str, Any]],
) -> list[tuple[str, list[dict[str, Any]]]]:
    """The chart's panels: (title, presets) per residual family, each led by plain."""
    plain = [entry for entry in presets if entry["name"] == "plain"]
    panels = []
    for prefix, title in CHART_FAMILIES:
        members = [entry for entry in presets if entry["name"].startswith(prefix)]
        if members:
            panels.append((title, plain + members))
    if not panels:  # only plain (or presets outside the families): one panel of everything
        panels.append(("presets", presets))
    return panels


def _study_figure(
    path: Path,
    results: dict[str, Any],
    x_key: str,
    y_key: str,
    x_label: str,
    y_label: str,
    with_interval: bool,
) -> None:
    """One figure in the study's layout: a panel per residual family, each with plain."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = _family_panels(list(results["presets"].values()))
    figure = Figure(figsize=(5 * len(panels), 4.5))
    axes_list = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for axes, (title, entries) in zip(axes_list, panels, strict=True):
        for entry in entries:
            points = [
                p for p in entry["evaluations"]
                if p.get(x_key) is not None and p.get(y_key) is not None
            ]  # fmt: skip
            if not points:
                continue
            plain = entry["name"] == "plain"
            xs = [point[x_key] for point in points]
            (line,) = axes.plot(
                xs,
                [point[y_key] for point in points],
                marker="o",
                markersize=2.5,
                linewidth=1.2,
                color="black" if plain else None,
                linestyle="--" if plain else "-",
                label=f"{entry['study_name']} ({entry['name']})",
            )
            intervals = [point.get(f"{y_key}_interval") for point in points]
            if with_interval and all(intervals):
                axes.fill_between(
                    xs,
                    [low for low, _ in intervals],
                    [high for _, high in intervals],
                    color=line.get_color(),
                    alpha=0.12,
                    linewidth=0,
                )
        axes.set_title(title)
        axes.set_xlabel(x_label)
        axes.set_ylim(-0.02, 1.02)  # a margin keeps lines at exactly 0 or 1 visible
        if x_key == "iteration":
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    axes_list[0].set_ylabel(y_label)
    adv = results["adversarial_set"]
    settings = results["settings"]
    band = " (bands: 95% intervals)" if with_interval else ""
    figure.suptitle(
        f"{settings['dataset']} ({results['classifier'].get('arch')}), ComDefend trained on "
        f"{settings.get('train_dataset')}\nBIM eps {results['attack']['eps'] * 255:.4g}/255, "
        f"{adv['size']} fooling examples{band}"
    )
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def write_plot(path: Path, results: dict[str, Any]) -> None:
    """The study's chart: one panel per residual family (encoder, decoder, both), each with
    the plain model's curve; accuracy after defending vs. training iteration (Agg)."""
    _study_figure(
        path, results, "iteration", "accuracy_after_defense", "training iteration",
        "accuracy after defending", with_interval=True,
    )  # fmt: skip


def write_reports(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``points.csv``, ``table.md`` and the three charts, each atomically."""
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    write_points_csv(out / POINTS_CSV, results)
    write_table(out / TABLE_FILE, results)
    write_plot(out / PLOT_FILE, results)
    _study_figure(
        out / PSNR_PLOT_FILE, results, "heldout_psnr_db", "accuracy_after_defense",
        f"held-out PSNR on {results['settings'].get('train_dataset')} (dB)",
        "accuracy after defending", with_interval=False,
    )  # fmt: skip
    _study_figure(
        out / CLEAN_PLOT_FILE, results, "iteration", "clean_accuracy_defended",
        "training iteration", "clean accuracy (defended)", with_interval=True,
    )  # fmt: skip
