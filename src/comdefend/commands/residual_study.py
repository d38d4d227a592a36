"""The residual-variant study as a command: ``comdefend residual-study``."""

from __future__ import annotations

from pathlib import Path

import typer

from comdefend.commands.options import (
    check_model_reference,
    device_choice,
    image_size_option,
    images_option,
    iteration_list_option,
    names_of,
    non_negative_int_option,
    output_folder_option,
    positive_float_option,
    positive_int_option,
    seed_option,
    status,
    threads_choice,
    warn_small_eps,
)


def residual_study_command(
    classifier: str = typer.Option(
        ..., "--classifier", "-c", help="Classifier checkpoint path or zoo name."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Experiment folder, e.g. reports/NAME.",
        callback=output_folder_option,
    ),
    dataset: str = typer.Option(
        "cifar10", help=f"Dataset attacked and evaluated: {names_of('datasets')}."
    ),
    presets: str = typer.Option(
        "all",
        help=f"'all' or comma-separated presets or study names, e.g. normal,1_on_off; presets: "
        f"{names_of('presets')}.",
    ),
    iterations: int = typer.Option(
        7500, help="Training iterations of every preset.", callback=positive_int_option
    ),
    eval_every: int = typer.Option(
        100,
        help="Keep a snapshot and measure it every N iterations and at the end (the study's).",
        callback=positive_int_option,
    ),
    clean_every: int = typer.Option(
        500,
        help="Measure defended clean accuracy every N iterations (a multiple of --eval-every).",
        callback=positive_int_option,
    ),
    batch_size: int = typer.Option(20, help="Training batch size.", callback=positive_int_option),
    lr: float | None = typer.Option(
        None, help="Learning rate (default: the schedule's).", callback=positive_float_option
    ),
    lr_schedule: str = typer.Option("constant", help="Learning-rate schedule."),
    attack_eps: float = typer.Option(
        7.65,
        help="BIM L-inf budget in units of 1/255 (default 7.65/255 = the study's 0.03).",
        callback=positive_float_option,
    ),
    attack_steps: int = typer.Option(10, help="BIM iterations.", callback=positive_int_option),
    n: int = images_option(1000, "Attack the first N test images."),
    seed: int = typer.Option(0, help="Training seed.", callback=seed_option),
    data_dir: Path | None = typer.Option(None, help="Folder of --dataset (else $COMDEFEND_DATA)."),
    train_dataset: str | None = typer.Option(
        None, help="What ComDefend trains on (default: --dataset; cifar10 for imagenet)."
    ),
    train_data_dir: Path | None = typer.Option(
        None, help="Folder of --train-dataset (else $COMDEFEND_DATA)."
    ),
    image_size: int | None = image_size_option(),
    eval_images: int = typer.Option(
        500, help="Held-out test images for the PSNR.", callback=non_negative_int_option
    ),
    inference_batch: int = typer.Option(
        250,
        help="Images per forward pass when measuring (the fooling set is always made in "
        "batches of 16).",
        callback=positive_int_option,
    ),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    precision: str = typer.Option(
        "fp32",
        help="Training arithmetic: fp32, bf16, fp16 or tf32 (see 'comdefend train --help'); "
        "snapshots are measured in fp32.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the study in --out: finished presets and measured points are kept.",
    ),
    stage: str = typer.Option(
        "all",
        help="all (train, then measure, preset after preset), train, or measure (the "
        "snapshots there; run beside a --stage train process).",
    ),
    follow: bool = typer.Option(
        False,
        "--follow",
        help="With --stage measure: wait for new snapshots until every run is finished.",
    ),
    pause_at: int | None = typer.Option(
        None,
        "--pause-at",
        metavar="ITERATION",
        callback=positive_int_option,
        help="Train each preset only up to this iteration in this call, then go on to the next "
        "(breadth-first: every preset to 1,600 first); a later --resume continues them.",
    ),
    measure_at: str | None = typer.Option(
        None,
        "--measure-at",
        metavar="ITERATIONS",
        callback=iteration_list_option,
        help="With --stage measure: measure only these snapshots, e.g. 500,2500 (the others "
        "are left for a later call).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Accuracy after defending vs. training iteration for ComDefend presets (residual study).

    BIM adversarial examples (against the undefended classifier) that fool it are purified by
    each preset's ComDefend at every snapshot of its training (every --eval-every iterations);
    results.json, points.csv, table.md and the charts are written to --out. Training and
    measuring can run as two processes (--stage train, --stage measure --follow). Ctrl-C or
    SIGTERM keeps the checkpoint and every measured point: rerun with --resume.
    """
    from comdefend.evaluation.residual_study import (
        PLOT_FILE,
        RESULTS_FILE,
        TABLE_FILE,
        ResidualStudyConfig,
        run_residual_study,
    )

    check_model_reference(classifier, "--classifier")
    warn_small_eps([attack_eps], "--attack-eps")
    config = ResidualStudyConfig(
        classifier=str(classifier),
        out=str(out),
        dataset=dataset,
        presets=presets,
        iterations=iterations,
        eval_every=eval_every,
        clean_every=clean_every,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        attack_eps=attack_eps,
        attack_steps=attack_steps,
        n=n,
        seed=seed,
        data_dir=str(data_dir) if data_dir else None,
        train_dataset=train_dataset,
        train_data_dir=str(train_data_dir) if train_data_dir else None,
        image_size=image_size,
        eval_images=eval_images,
        inference_batch=inference_batch,
        device=device,
        threads=threads,
        precision=precision,
    )
    try:
        results = run_residual_study(
            config,
            resume=resume,
            progress=progress,
            stage=stage,
            follow=follow,
            pause_at=pause_at,
            measure_at=measure_at,  # type: ignore[arg-type]  # parsed by its callback
        )
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted: finished presets, the last checkpoint and every measured point are "
            f"kept in {out}; the same command with --resume continues"
        ) from None
    if stage == "train":
        for name, state in results["trained"].items():
            status(f"{name}: {state}")
        return
    adv = results["adversarial_set"]
    status(
        f"fooling set: {adv['size']} of {adv['attacked_images']} test images "
        f"(clean accuracy {adv['clean_accuracy']:.4f})"
    )
    for entry in results["presets"].values():
        points = entry["evaluations"]
        last = points[-1] if points else None
        shown = (
            "no point yet"
            if last is None
            else (
                f"accuracy after defending {last['accuracy_after_defense']:.4f} "
                f"at iteration {last['iteration']:,}"
            )
        )
        state = f", {entry['status']}" if entry["status"] else ""
        status(f"{entry['name']} ({entry['study_name']}{state}): {len(points)} points, {shown}")
    status(f"wrote {out / RESULTS_FILE}, {out / TABLE_FILE}, {out / PLOT_FILE}")


def register(app: typer.Typer) -> None:
    """Add ``residual-study`` to ``app``."""
    app.command("residual-study")(residual_study_command)
