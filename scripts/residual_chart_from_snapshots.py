"""The residual study's chart, measured on snapshots of trainings instead of new runs.

    python scripts/residual_chart_from_snapshots.py runs/snapshots --classifier resnet20-cifar10 \
        --data-dir ../shared/data/cifar10 --out reports/residual-study-zoo
    python scripts/residual_chart_from_snapshots.py runs/snapshots --dataset imagenet \
        --classifier efficientnet-lite0 --data-dir ../shared/data/imagenet-sample \
        --train-data-dir ../shared/data/cifar10 --n 50 --out reports/residual-study-imagenet

``comdefend residual-study`` trains every preset itself and measures "accuracy after defending"
at each evaluation. On a machine that can only afford the trainings it already runs, the same
measurement can be made afterwards on copies of their training checkpoints: SNAPSHOTS holds
files named ``<run>-<iteration>.safetensors`` (training-state checkpoints, as ``comdefend train``
writes them). The fooling set (BIM against the undefended classifier, kept where the classifier
was right and the attack fooled it), the measurements and the outputs (``results.json``,
``table.md``, ``accuracy_vs_iteration.png``) are those of the residual study. As in the study,
ComDefend may have trained on another dataset than the one attacked (``--train-dataset``:
CIFAR-10 for ImageNet); the held-out PSNR is that of the training dataset's test images. The
fooling set is cached in OUT and every measured point in ``OUT/points.json``, so a rerun with
more snapshots measures only the new ones.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from comdefend.checkpoint import load_checkpoint
from comdefend.data.datasets import load_dataset
from comdefend.errors import UsageError
from comdefend.evaluation.residual_study import (
    ADVERSARIAL_FILE,
    ResidualStudyConfig,
    defended_accuracy,
    fooling_set,
    write_reports,
)
from comdefend.models.classifiers import load_classifier
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import get_preset, preset_summary
from comdefend.training.trainer import evaluate_reconstruction, image_channels_for
from comdefend.validation import set_threads
from comdefend.zoo import resolve_weights

NAME = re.compile(r"^(?P<run>.+)-(?P<iteration>\d+)\.safetensors$")


def load_snapshot(path: Path, channels: int) -> tuple[ComDefend | None, dict]:
    """The snapshot's model (None if it was trained on another dataset) and its settings."""
    tensors, metadata = load_checkpoint(path, "training-state")
    train_config = metadata["train_config"]
    if image_channels_for(train_config["dataset"]) != channels:
        return None, train_config
    model = ComDefend(ComDefendConfig(image_channels=channels, preset=train_config["preset"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval(), train_config


def heldout_psnr(model: ComDefend, data, train_config: dict) -> float:
    """The held-out PSNR the trainer reports (its first ``eval_images`` test images), measured
    on the snapshot itself, so the column never depends on which run's log sits where."""
    images = data.head(int(train_config.get("eval_images", 500))).float_images()
    return evaluate_reconstruction(model, images)["psnr_db"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("snapshots", type=Path)
    parser.add_argument("--classifier", required=True, help="checkpoint path or zoo name")
    parser.add_argument("--dataset", default="cifar10", help="the dataset attacked")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-dataset", default=None, help="default: as the residual study")
    parser.add_argument("--train-data-dir", default=None)
    parser.add_argument("--image-size", type=int, default=None, help="imagenet crop (224)")
    parser.add_argument("--n", type=int, default=1000, help="test images attacked")
    parser.add_argument("--eps", type=float, default=7.65, help="BIM L-inf budget in 1/255")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100, help="images per forward pass")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    set_threads(args.threads)
    weights = resolve_weights(args.classifier)
    classifier = load_classifier(weights).requires_grad_(False)
    config = ResidualStudyConfig(
        classifier=args.classifier,
        dataset=args.dataset,
        out=str(args.out),
        attack_eps=args.eps,
        attack_steps=args.steps,
        n=args.n,
        data_dir=args.data_dir,
        train_dataset=args.train_dataset,
        train_data_dir=args.train_data_dir,
        image_size=args.image_size,
        inference_batch=args.batch,
    )
    assert config.train_dataset is not None  # set from dataset by the config
    data = load_dataset(
        args.dataset, "test", args.data_dir, image_size=args.image_size, max_images=args.n
    )
    same = config.train_dataset == config.dataset
    train_test = load_dataset(
        config.train_dataset, "test", args.data_dir if same else args.train_data_dir
    )
    args.out.mkdir(parents=True, exist_ok=True)
    try:  # cached in OUT: a rerun reuses it (and refuses one made with other settings)
        adv, attack = fooling_set(
            classifier, data, config, weights.sha256, torch.device("cpu"),
            args.out / ADVERSARIAL_FILE, reuse=True,
        )  # fmt: skip
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"fooling set: {adv.stats}", flush=True)

    points_file = args.out / "points.json"
    measured: dict[str, dict] = (
        json.loads(points_file.read_text(encoding="utf-8")) if points_file.exists() else {}
    )
    runs: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(args.snapshots.glob("*.safetensors")):
        match = NAME.match(path.name)
        if match:
            runs.setdefault(match["run"], []).append((int(match["iteration"]), path))
    presets = {}
    for run, snapshots in sorted(runs.items()):
        points = []
        train_config: dict = {}
        for iteration, path in sorted(snapshots):
            model, train_config = load_snapshot(path, data.channels)
            if model is None or train_config["dataset"] != config.train_dataset:
                break
            key = f"{path.name} {path.stat().st_size} {path.stat().st_mtime_ns}"
            if key not in measured:
                measured[key] = {
                    "iteration": iteration,
                    "accuracy_after_defense": defended_accuracy(
                        model, classifier, adv.adversarial, adv.labels, args.batch
                    ),
                    "clean_accuracy_defended": defended_accuracy(
                        model, classifier, adv.clean, adv.labels, args.batch
                    ),
                    "heldout_psnr_db": heldout_psnr(model, train_test, train_config),
                }
                temporary = points_file.with_suffix(".tmp")
                temporary.write_text(json.dumps(measured, indent=1), encoding="utf-8")
                temporary.replace(points_file)
                print(run, measured[key], flush=True)
            points.append(measured[key])
        if not points:
            continue
        preset = get_preset(train_config["preset"])
        presets[run] = {
            **preset_summary(preset, data.channels),
            "zoo_run": run,
            "training": {k: train_config[k] for k in ("iterations", "batch_size", "lr", "seed")},
            "stabilize": train_config.get("stabilize") or {},
            "evaluations": points,
            "final": points[-1],
        }
    results = {
        "settings": {**config.__dict__, "source": f"snapshots in {args.snapshots}"},
        "attack": attack,
        "adversarial_set": adv.stats,
        "classifier": {
            "path": args.classifier,
            "weights": weights.to_dict(),
            "arch": classifier.config.arch if classifier.config else None,
        },
        "presets": presets,
    }
    write_reports(args.out, results)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
