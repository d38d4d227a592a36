"""Classifier commands: ``train-classifier``, ``classifiers`` and ``test-classifier``."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from comdefend.commands.options import (
    check_model_reference,
    device_choice,
    image_size_option,
    images_option,
    names_of,
    non_negative_float_option,
    non_negative_int_option,
    output_folder_option,
    positive_float_option,
    positive_int_option,
    seed_option,
    threads_choice,
)
from comdefend.errors import UsageError


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def train_classifier_command(
    dataset: str = typer.Option("cifar10", help=f"Dataset: {names_of('datasets')}."),
    arch: str | None = typer.Option(
        None, help="Architecture (see 'comdefend classifiers'; default by dataset)."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder, e.g. runs/NAME.", callback=output_folder_option
    ),
    epochs: int = typer.Option(
        30, help="Epochs over the training set.", callback=positive_int_option
    ),
    batch_size: int = typer.Option(128, help="Batch size.", callback=positive_int_option),
    lr: float = typer.Option(
        0.1, help="Peak learning rate (SGD, Nesterov momentum 0.9).", callback=positive_float_option
    ),
    lr_schedule: str = typer.Option("cosine", help="cosine, onecycle or constant (per step)."),
    warmup_epochs: float = typer.Option(
        0.0, help="Linear learning-rate warm-up (epochs).", callback=non_negative_float_option
    ),
    weight_decay: float = typer.Option(
        5e-4, help="L2 weight decay.", callback=non_negative_float_option
    ),
    label_smoothing: float = typer.Option(
        0.0, help="Label smoothing of the cross-entropy.", callback=non_negative_float_option
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random crop + flip."),
    seed: int = typer.Option(
        0, help="Random seed (init, batch order, augmentation, dropout).", callback=seed_option
    ),
    data_dir: Path | None = typer.Option(None, help="Dataset folder (else $COMDEFEND_DATA)."),
    limit_train: int | None = typer.Option(
        None, help="Train on the first N images only.", callback=positive_int_option
    ),
    limit_test: int | None = typer.Option(
        None, help="Final test on the first N images only.", callback=positive_int_option
    ),
    eval_images: int = typer.Option(
        1000, help="Test images evaluated after every epoch.", callback=non_negative_int_option
    ),
    checkpoint_every: int = typer.Option(
        500, help="Checkpoint interval (iterations).", callback=positive_int_option
    ),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a classifier (Ctrl-C saves a checkpoint; --resume continues exactly)."""
    from comdefend.training.classifier import ClassifierTrainConfig, train_classifier
    from comdefend.training.engine import TrainingInterrupted

    config = ClassifierTrainConfig(
        dataset=dataset,
        arch=arch,
        out=str(out),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        warmup_epochs=warmup_epochs,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        augment=augment,
        seed=seed,
        data_dir=str(data_dir) if data_dir else None,
        limit_train=limit_train,
        limit_test=limit_test,
        eval_images=eval_images,
        checkpoint_every=checkpoint_every,
        device=device,
        threads=threads,
    )
    try:
        summary = train_classifier(config, resume=resume, progress=progress)
    except TrainingInterrupted as interrupted:
        # Said here: the CLI framework turns a KeyboardInterrupt into a bare exit 130.
        typer.echo(str(interrupted), err=True)
        raise typer.Exit(130) from None
    if "config" not in summary:
        return  # a data-parallel process other than 0: process 0 reports
    typer.echo(
        f"done: {summary['arch']} on {dataset}, {summary['iterations']} iterations, test accuracy "
        f"{summary['test_accuracy']:.4f} ({summary['test_images']} images)"
    )
    typer.echo(f"model: {summary['model']}")


def classifiers_command(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """List the classifier architectures with their inputs and parameter counts."""
    from comdefend.models.classifiers import list_classifiers

    rows = list_classifiers()
    if as_json:
        _echo_json(rows)
        return
    table = [
        (
            str(row["name"]),
            str(row["dataset"]),
            f"{row['input_channels']}x{row['image_size']}x{row['image_size']}",
            f"{row['parameters']:,}",
            str(row["description"]),
        )
        for row in rows
    ]
    header = ("name", "dataset", "input", "params", "description")
    # columns as wide as their longest entry, so a long name never runs into the next column
    widths = [max(len(line[i]) for line in [header, *table]) for i in range(4)]
    for name, dataset, shape, parameters, description in [header, *table]:
        typer.echo(
            f"{name:<{widths[0]}}  {dataset:<{widths[1]}}  {shape:<{widths[2]}}  "
            f"{parameters:>{widths[3]}}  {description}"
        )


def test_classifier_command(
    classifier: str = typer.Option(
        ..., "--classifier", "-c", help="Classifier checkpoint path or zoo name."
    ),
    dataset: str | None = typer.Option(
        None, help=f"Dataset: {names_of('datasets')} (default: the checkpoint's)."
    ),
    split: str = typer.Option(
        "test",
        help="train, test, or sample: the 1,000 test images shipped with the package (no "
        "dataset needed), e.g. --split sample.",
    ),
    n: int | None = images_option(None, "Use the first N images (default: all)."),
    data_dir: Path | None = typer.Option(None, help="Dataset folder (else $COMDEFEND_DATA)."),
    image_size: int | None = image_size_option(),
    batch_size: int = typer.Option(
        500, help="Images per forward pass.", callback=positive_int_option
    ),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Top-1 accuracy of a classifier checkpoint on a dataset."""
    from comdefend.data.datasets import DATASETS, load_dataset
    from comdefend.models.classifiers import check_classifier_fits, load_classifier
    from comdefend.training.classifier import evaluate_accuracy
    from comdefend.training.run import resolve_device
    from comdefend.validation import set_threads
    from comdefend.zoo import resolve_weights

    if n is not None and n < 1:
        raise UsageError(f"--images must be >= 1, got {n}")
    check_model_reference(classifier, "--classifier")
    set_threads(threads, "--threads")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    weights = resolve_weights(classifier)
    model = load_classifier(weights, resolve_device(device))
    assert model.config is not None  # set by load_classifier
    name = DATASETS.canonical(dataset or model.config.dataset)
    # another dataset of the same shape is a legitimate test (distribution shift)
    check_classifier_fits(model, name, label=classifier, check_trained_on=False)
    # only the first n images are read (an ImageNet folder decodes no others); head(n) for
    # the embedded sample, which is read whole
    data = load_dataset(name, split, data_dir, image_size=image_size, max_images=n).head(n)
    result = evaluate_accuracy(model, data, batch_size=batch_size, progress=not as_json)
    report = {
        "classifier": str(classifier),
        "weights": weights.to_dict(),
        "arch": model.config.arch,
        "dataset": name,
        "split": split,
        "image_size": int(data.images.shape[-1]),
        "source": data.source,
        **result,
        "recorded_metrics": (model.checkpoint_metadata or {}).get("metrics", {}),
    }
    if as_json:
        _echo_json(report)
    else:
        typer.echo(
            f"{report['arch']} on {name} {split}: accuracy {result['accuracy']:.4f} "
            f"({result['correct']}/{result['images']})"
        )


def register(app: typer.Typer) -> None:
    """Add the classifier commands to ``app``."""
    app.command("train-classifier")(train_classifier_command)
    app.command("classifiers")(classifiers_command)
    app.command("test-classifier")(test_classifier_command)
