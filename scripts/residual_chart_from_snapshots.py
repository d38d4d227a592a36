"""The residual study's chart, measured on snapshots of the zoo trainings instead of new runs.

    python scripts/residual_chart_from_snapshots.py runs/snapshots --classifier resnet20-cifar10 \
        --data-dir ../shared/data/cifar10 --out reports/residual-study-zoo

``comdefend residual-study`` trains every preset itself and measures "accuracy after defending"
at each evaluation. On a machine that can only afford the zoo trainings, the same measurement can
be made afterwards on copies of their training checkpoints: SNAPSHOTS holds files named
``<zoo name>-<iteration>.safetensors`` (training-state checkpoints, as ``comdefend train``
writes them). The fooling set (BIM against the undefended classifier, kept where the classifier
was right and the attack fooled it), the measurements and the outputs (``results.json``,
``table.md``, ``accuracy_vs_iteration.png``) are those of the residual study.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from comdefend.checkpoint import load_checkpoint
from comdefend.data.datasets import load_dataset
from comdefend.evaluation.residual_study import (
    ResidualStudyConfig,
    defended_accuracy,
    make_adversarial_set,
    write_reports,
)
from comdefend.models.classifiers import load_classifier
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import get_preset, preset_summary
from comdefend.training.trainer import evaluate_reconstruction, image_channels_for
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
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=1000, help="test images attacked")
    parser.add_argument("--eps", type=float, default=7.65, help="BIM L-inf budget in 1/255")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

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
    )
    data = load_dataset(args.dataset, "test", args.data_dir)
    adv, attack = make_adversarial_set(classifier, data, config, torch.device("cpu"))
    print(f"fooling set: {adv.stats}", flush=True)

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
            if model is None or train_config["dataset"] != args.dataset:
                break
            point = {
                "iteration": iteration,
                "accuracy_after_defense": defended_accuracy(
                    model, classifier, adv.adversarial, adv.labels, 100
                ),
                "clean_accuracy_defended": defended_accuracy(
                    model, classifier, adv.clean, adv.labels, 100
                ),
                "heldout_psnr_db": heldout_psnr(model, data, train_config),
            }
            print(run, point, flush=True)
            points.append(point)
        if not points:
            continue
        preset = get_preset(train_config["preset"])
        presets[run] = {
            **preset_summary(preset, data.channels),
            "zoo_run": run,
            "training": {k: train_config[k] for k in ("iterations", "batch_size", "lr", "seed")},
            "evaluations": points,
            "final": points[-1],
        }
    results = {
        "settings": {**config.__dict__, "source": "snapshots of the zoo trainings"},
        "attack": attack,
        "adversarial_set": adv.stats,
        "classifier": {"path": args.classifier, "weights": weights.to_dict()},
        "presets": presets,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_reports(args.out, results)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
