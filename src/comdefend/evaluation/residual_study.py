"""The residual study: accuracy after defending, per preset, along training.

Protocol (the residual-variant study, ``PAPER.md``):

1. Adversarial examples are made once with BIM (L-inf ``eps`` in units of 1/255 like
   ``comdefend evaluate``; the study's 0.03 is the default 7.65/255) against the *undefended*
   classifier, from the first ``n`` test images of ``dataset`` (the study: ImageNet,
   ``--dataset imagenet --classifier efficientnet-lite0`` here). Only the images that the
   classifier gets right *and* that the attack fools are kept: the "fooling set", cached in
   ``OUT`` and reused by ``--resume``.
2. For every preset, ComDefend is trained with :func:`comdefend.training.train` on
   ``train_dataset`` (the study: CIFAR-10, also the default for ImageNet; run folder
   ``OUT/runs/<preset>``). At every held-out evaluation (every ``eval_every`` iterations and at
   the end) the evaluation hook measures

   * ``accuracy_after_defense``: the fraction of the fooling set that
     ``classifier(model.purify(x_adv))`` classifies correctly, and
   * ``clean_accuracy_defended``: the same for the clean versions of those images.

   Both land in the run's ``log.jsonl`` records, next to the trainer's ``heldout_psnr_db``;
   the log is the source of truth when results are collected, so resumed runs keep the points
   measured before an interruption.

Outputs in ``OUT`` (all written atomically, refreshed after every preset):

* ``fooling_set.safetensors``: the cached fooling set. The adversarial images are stored as the
  exact float32 tensors the attack returned (not re-quantised to uint8, not regenerated: BIM on
  a GPU is not bit-reproducible), with their test-set indices and labels; the clean images are
  re-read from the dataset by index (they are uint8 there, hence exact). The metadata records
  the classifier's sha256 and the attack settings; ``--resume`` refuses a cache that does not
  match the current settings.
* ``results.json``: settings, classifier provenance, fooling-set size, and per preset its names,
  parameter counts, every evaluation point and the final values.
* ``accuracy_vs_iteration.png``: the study's three panels (residual encoder 1-3, residual
  decoder 1-3, both 1-3), each with the plain model's curve: accuracy after defending vs.
  training iteration.
* ``table.md``: the final table.

Usage from Python::

    from comdefend.evaluation.residual_study import ResidualStudyConfig, run_residual_study
    results = run_residual_study(ResidualStudyConfig(classifier="c.safetensors", out="r/x"))
"""

from __future__ import annotations

import json
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
    save_checkpoint,
)
from comdefend.data.datasets import DATASETS, ImageSet, load_dataset
from comdefend.errors import UsageError
from comdefend.models.classifiers import Classifier, check_classifier_fits, load_classifier
from comdefend.models.comdefend import ComDefend
from comdefend.models.presets import PRESETS, Preset, get_preset, preset_summary
from comdefend.training.run import resolve_device
from comdefend.training.trainer import EvaluationHook, TrainConfig, train
from comdefend.validation import set_threads

ADVERSARIAL_KIND = "residual-study-fooling-set"
ADVERSARIAL_FILE = "fooling_set.safetensors"
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
TABLE_FILE = "table.md"
RUNS_FOLDER = "runs"
# Training settings that may differ between a finished run and the current request.
_IGNORED_TRAIN_KEYS = ("device", "threads", "checkpoint_every")


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
        eval_every: evaluation interval (iterations); the last iteration is always evaluated.
        batch_size: training batch size.
        lr: learning rate (``None``: the schedule's default).
        lr_schedule: learning-rate schedule (see ``comdefend.training.schedules``).
        attack_eps: BIM L-inf budget in units of 1/255, in (0, 255] (default 7.65 = 0.03).
        attack_steps: BIM iterations.
        n: the first ``n`` test images are attacked.
        seed: training seed (and the attack's, which is deterministic anyway).
        data_dir: folder of ``dataset`` (else ``$COMDEFEND_DATA`` / defaults).
        train_dataset: what ComDefend trains on (``None``: ``dataset``; ``cifar10`` when
            ``dataset`` is ``imagenet``, as the study did).
        train_data_dir: folder of ``train_dataset`` (else ``$COMDEFEND_DATA`` / defaults).
        image_size: crop size of ``imagenet`` images (``None``: 224).
        eval_images: held-out images for the trainer's PSNR.
        inference_batch: images per forward pass when attacking and measuring accuracy.
        device: ``auto``, ``cpu`` or ``cuda``.
        threads: CPU threads for torch.
    """

    classifier: str
    out: str
    dataset: str = "cifar10"
    presets: str = "all"
    iterations: int = 7500
    eval_every: int = 1000
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
        for name in ("iterations", "eval_every", "batch_size", "attack_steps", "n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
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
        """The :class:`TrainConfig` of ``preset``'s run in ``OUT/runs/<preset>``."""
        return TrainConfig(
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
            device=self.device,
            threads=self.threads,
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


# --------------------------------------------------------------------------- adversarial set


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

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def predict(
    classifier: torch.nn.Module, images: torch.Tensor, batch: int, device: torch.device
) -> torch.Tensor:
    """Top-1 predictions (CPU int64) of ``classifier`` on ``images``, ``batch`` at a time."""
    outputs = [classifier(chunk.to(device)).argmax(dim=1).cpu() for chunk in images.split(batch)]
    return torch.cat(outputs) if outputs else torch.zeros(0, dtype=torch.long)


def make_adversarial_set(
    classifier: Classifier, data: ImageSet, config: ResidualStudyConfig, device: torch.device
) -> tuple[AdversarialSet, dict[str, Any]]:
    """Attack the first ``n`` test images with BIM; keep those correct before and fooled after.

    Returns the set and the attack's settings.
    """
    attack = BIM(
        classifier, eps=config.attack_eps / 255, steps=config.attack_steps, seed=config.seed
    )
    head = data.head(config.n)
    clean = head.float_images()
    labels = head.labels
    correct = predict(classifier, clean, config.inference_batch, device) == labels
    kept = torch.nonzero(correct).flatten()
    adversarial = torch.zeros((0, *clean.shape[1:]), dtype=torch.float32)
    fooled = torch.zeros(0, dtype=torch.bool)
    if kept.numel():
        chunks = [
            attack(clean[index].to(device), labels[index].to(device)).cpu()
            for index in kept.split(config.inference_batch)
        ]
        adversarial = torch.cat(chunks)
        fooled = predict(classifier, adversarial, config.inference_batch, device) != labels[kept]
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


def adversarial_identity(
    config: ResidualStudyConfig, classifier_sha: str, attack: dict[str, Any]
) -> dict[str, Any]:
    """What a cached fooling set must have been made with to be reused: dataset, crop size,
    image count, classifier weights (sha256) and the attack's settings."""
    return {
        "dataset": config.dataset,
        "image_size": config.image_size,
        "n": config.n,
        "classifier_sha256": classifier_sha,
        "attack": attack,
    }


def save_adversarial_set(path: Path, adv: AdversarialSet, identity: dict[str, Any]) -> None:
    """Write the fooling set (exact float32 adversarial images, indices, labels) atomically."""
    tensors = {
        "adversarial": adv.adversarial,
        "indices": adv.indices.to(torch.int64),
        "labels": adv.labels.to(torch.int64),
    }
    save_checkpoint(path, tensors, {"kind": ADVERSARIAL_KIND, **identity, "stats": adv.stats})


def load_adversarial_set(path: Path, data: ImageSet, identity: dict[str, Any]) -> AdversarialSet:
    """Read a cached fooling set; :class:`UsageError` if it was made with other settings."""
    tensors, metadata = load_checkpoint(path, ADVERSARIAL_KIND)
    differing = sorted(key for key in identity if metadata.get(key) != identity[key])
    if differing:
        details = ", ".join(f"{k}: {metadata.get(k)!r} -> {identity[k]!r}" for k in differing)
        raise UsageError(
            f"{path} was made with other settings ({details}); use another --out or delete it"
        )
    indices = tensors["indices"].to(torch.int64)
    labels = tensors["labels"].to(torch.int64)
    if indices.numel() and not torch.equal(data.labels[indices], labels):
        raise UsageError(f"{path} does not match the labels of the {data.name} test split")
    return AdversarialSet(
        data.float_images(indices), tensors["adversarial"], labels, indices, metadata["stats"]
    )


# --------------------------------------------------------------------------- measurements


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
    exists (refused if made with other settings), else made and saved there.

    Raises :class:`UsageError` when the set is empty."""
    attack = BIM(
        classifier, eps=config.attack_eps / 255, steps=config.attack_steps, seed=config.seed
    ).settings()
    identity = adversarial_identity(config, classifier_sha, attack)
    if reuse and cache.exists():
        adv = load_adversarial_set(cache, data, identity)
    else:
        adv, _ = make_adversarial_set(classifier, data, config, device)
        save_adversarial_set(cache, adv, identity)
    if len(adv) == 0:
        raise UsageError(
            f"the fooling set is empty: of the first {config.n} test images, "
            f"{adv.stats['clean_correct']} are classified correctly and none is fooled by BIM "
            f"(eps {config.attack_eps:g}/255); raise --n or --attack-eps"
        )
    return adv, attack


def defended_accuracy(
    purifier: ComDefend,
    classifier: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
) -> float:
    """Fraction of ``images`` that ``classifier(purifier.purify(x))`` labels correctly."""
    device = next(purifier.parameters()).device
    correct = 0
    for chunk, truth in zip(images.split(batch), labels.split(batch), strict=True):
        purified = purifier.purify(chunk.to(device))
        correct += int((classifier(purified).argmax(dim=1).cpu() == truth).sum())
    return correct / max(int(labels.numel()), 1)


def make_evaluation_hook(
    classifier: torch.nn.Module, adv: AdversarialSet, batch: int
) -> EvaluationHook:
    """The ``on_evaluation`` hook for :func:`train`: accuracies after defending."""

    def hook(iteration: int, model: ComDefend) -> dict[str, Any]:  # noqa: ARG001
        return {
            "accuracy_after_defense": defended_accuracy(
                model, classifier, adv.adversarial, adv.labels, batch
            ),
            "clean_accuracy_defended": defended_accuracy(
                model, classifier, adv.clean, adv.labels, batch
            ),
            "fooling_set_size": len(adv),
        }

    return hook


def read_evaluations(run: Path) -> list[dict[str, Any]]:
    """Every evaluation point of a run, from its ``log.jsonl`` (last record per iteration)."""
    points: dict[int, dict[str, Any]] = {}
    log = run / "log.jsonl"
    if not log.exists():
        return []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "accuracy_after_defense" not in record:
            continue
        points[int(record["iteration"])] = {
            "iteration": int(record["iteration"]),
            "accuracy_after_defense": record["accuracy_after_defense"],
            "clean_accuracy_defended": record.get("clean_accuracy_defended"),
            "heldout_psnr_db": record.get("heldout_psnr_db"),
        }
    return [points[key] for key in sorted(points)]


# --------------------------------------------------------------------------- reports


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_table(path: Path, results: dict[str, Any]) -> None:
    """The final table (Markdown), one row per preset."""
    adv = results["adversarial_set"]
    lines = [
        f"# Residual study: accuracy after defending ({results['settings']['dataset']})",
        "",
        f"BIM L-inf eps {results['attack']['eps'] * 255:.4g}/255, "
        f"{results['attack']['steps']} steps, "
        f"against the undefended classifier; fooling set: {adv['size']} of "
        f"{adv['attacked_images']} test images (clean accuracy {adv['clean_accuracy']:.4f}).",
        "",
        "| preset | study name | iterations | accuracy after defending | clean accuracy "
        "(defended) | held-out PSNR (dB) | encoder params | decoder params |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in results["presets"].values():
        final = entry.get("final") or {}
        lines.append(
            f"| {entry['name']} | {entry['study_name']} | {_fmt(final.get('iteration'), 'd')} | "
            f"{_fmt(final.get('accuracy_after_defense'), '.4f')} | "
            f"{_fmt(final.get('clean_accuracy_defended'), '.4f')} | "
            f"{_fmt(final.get('heldout_psnr_db'), '.2f')} | "
            f"{entry['encoder_parameters']:,} | {entry['decoder_parameters']:,} |"
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


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


def write_plot(path: Path, results: dict[str, Any]) -> None:
    """The study's chart: one panel per residual family (encoder, decoder, both), each with
    the plain model's curve; accuracy after defending vs. training iteration (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = _family_panels(list(results["presets"].values()))
    figure = Figure(figsize=(5 * len(panels), 4.5))
    axes_list = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for axes, (title, entries) in zip(axes_list, panels, strict=True):
        for entry in entries:
            points = entry["evaluations"]
            if not points:
                continue
            axes.plot(
                [point["iteration"] for point in points],
                [point["accuracy_after_defense"] for point in points],
                marker="o",
                markersize=3,
                color="black" if entry["name"] == "plain" else None,
                linestyle="--" if entry["name"] == "plain" else "-",
                label=f"{entry['study_name']} ({entry['name']})",
            )
        axes.set_title(title)
        axes.set_xlabel("training iteration")
        axes.set_ylim(-0.02, 1.02)  # a margin keeps lines at exactly 0 or 1 visible
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    axes_list[0].set_ylabel("accuracy after defending")
    adv = results["adversarial_set"]
    settings = results["settings"]
    figure.suptitle(
        f"{settings['dataset']} ({results['classifier'].get('arch')}), ComDefend trained on "
        f"{settings.get('train_dataset')}\nBIM eps {results['attack']['eps'] * 255:.4g}/255, "
        f"{adv['size']} fooling examples"
    )
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))


def write_reports(out: Path, results: dict[str, Any]) -> None:
    """``results.json``, ``table.md`` and ``accuracy_vs_iteration.png``, each atomically."""
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    write_table(out / TABLE_FILE, results)
    write_plot(out / PLOT_FILE, results)


# --------------------------------------------------------------------------- the experiment


def load_checked_classifier(config: ResidualStudyConfig, device: torch.device) -> Classifier:
    """Load the classifier; :class:`UsageError` if it was not made for ``config.dataset``."""
    model = load_classifier(config.classifier, device)  # resolved once, kept as model.weights
    check_classifier_fits(model, config.dataset, label=config.classifier)
    return model


def _finished_run(run: Path, train_config: TrainConfig) -> bool:
    """True when ``run`` holds a completed run of exactly ``train_config``."""
    summary_path = run / "summary.json"
    if not summary_path.exists():
        return False
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    saved = summary.get("config", {})
    wanted = train_config.to_dict()
    differing = sorted(
        key
        for key in set(saved) | set(wanted)
        if key not in _IGNORED_TRAIN_KEYS and saved.get(key) != wanted.get(key)
    )
    if differing == ["iterations"] and int(summary.get("iterations", 0)) < wanted["iterations"]:
        return False  # a shorter finished run: resume extends it
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differing)
        raise UsageError(f"--resume: {run} was trained with other settings ({details})")
    return True


def run_residual_study(
    config: ResidualStudyConfig, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the residual study; returns what is written to ``results.json``.

    With ``resume``, finished presets are skipped (their results are read from their logs), an
    interrupted preset continues from its checkpoint, and the cached fooling set is reused.
    Without it, an ``out`` folder that already holds an experiment is refused.

    Raises:
        UsageError: bad settings, classifier/dataset mismatch, an existing experiment without
            ``resume``, a cache or run made with other settings, or an empty fooling set.
    """
    presets = parse_presets(config.presets)
    out = Path(config.out)
    if not resume and (
        (out / RESULTS_FILE).exists()
        or (out / ADVERSARIAL_FILE).exists()
        or (out / RUNS_FOLDER).exists()
    ):
        raise UsageError(
            f"{out} already holds a residual study; pass --resume to continue it, "
            "or choose another --out"
        )
    set_threads(config.threads)  # None: torch's default; 0 or less is refused, not ignored
    device = resolve_device(config.device)
    classifier = load_checked_classifier(config, device)
    assert classifier.weights is not None  # set by load_classifier
    classifier_sha = classifier.weights.sha256
    # Only the attacked images are loaded: on an ImageNet folder the others are never decoded.
    test = load_dataset(
        config.dataset, "test", config.data_dir, image_size=config.image_size, max_images=config.n
    )

    cache = out / ADVERSARIAL_FILE
    adv, attack_settings = fooling_set(
        classifier, test, config, classifier_sha, device, cache, reuse=resume
    )

    image_channels = DATASETS[config.dataset].channels
    results: dict[str, Any] = {
        "kind": "residual-study",
        "complete": False,
        "settings": config.to_dict(),
        "classifier": {
            "path": str(config.classifier),
            "sha256": classifier_sha,
            "weights": classifier.weights.to_dict(),
            "arch": classifier.config.arch if classifier.config else None,
            "dataset": config.dataset,
        },
        "attack": attack_settings,
        "adversarial_set": {"file": str(cache), **adv.stats},
        "presets": {},
    }
    hook = make_evaluation_hook(classifier, adv, config.inference_batch)
    for preset in presets:
        train_config = config.train_config(preset)
        run = Path(train_config.out)
        if resume and _finished_run(run, train_config):
            status = "reused"
        else:
            continue_run = resume and (run / "checkpoint.safetensors").exists()
            train(train_config, resume=continue_run, progress=progress, on_evaluation=hook)
            status = "resumed" if continue_run else "trained"
        summary = preset_summary(preset, image_channels)
        evaluations = read_evaluations(run)
        results["presets"][preset.name] = {
            "name": preset.name,
            "study_name": preset.study_name,
            "aliases": list(preset.names),
            "description": preset.description,
            "encoder_parameters": summary["encoder_parameters"],
            "decoder_parameters": summary["decoder_parameters"],
            "code_channels": summary["code_channels"],
            "run": str(run),
            "status": status,
            "evaluations": evaluations,
            "final": evaluations[-1] if evaluations else None,
        }
        write_reports(out, results)
    results["complete"] = True
    write_reports(out, results)
    return results
