"""The seed study's experiment as a command: ``comdefend seed-experiment``."""

from __future__ import annotations

from pathlib import Path

import typer


def seed_experiment_command(
    classifier: str = typer.Option(
        ..., "--classifier", "-c", help="Classifier checkpoint path or zoo name."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Experiment folder, e.g. reports/NAME."),
    dataset: str = typer.Option("cifar10", help="cifar10, cifar100 or fashion-mnist."),
    presets: str = typer.Option(
        "all", help="'all' or comma-separated presets/seed names, e.g. normal,1_on_off."
    ),
    iterations: int = typer.Option(7500, help="Training iterations of every preset."),
    eval_every: int = typer.Option(1000, help="Measure accuracy every N iterations (and at end)."),
    batch_size: int = typer.Option(20, help="Training batch size."),
    lr: float | None = typer.Option(None, help="Learning rate (default: the schedule's)."),
    lr_schedule: str = typer.Option("constant", help="Learning-rate schedule."),
    attack_eps: float = typer.Option(0.03, help="BIM L-inf budget in (0, 1] (pixel units)."),
    attack_steps: int = typer.Option(10, help="BIM iterations."),
    n: int = typer.Option(1000, help="Attack the first N test images."),
    seed: int = typer.Option(0, help="Training seed."),
    data_dir: Path | None = typer.Option(None, help="Dataset folder (else $COMDEFEND_DATA)."),
    eval_images: int = typer.Option(500, help="Held-out test images for the PSNR."),
    inference_batch: int = typer.Option(250, help="Images per forward pass when measuring."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    threads: int | None = typer.Option(None, help="CPU threads for torch."),
    resume: bool = typer.Option(
        False, "--resume", help="Skip finished presets, continue an interrupted one."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Accuracy after defending vs. training iteration for ComDefend presets (seed study).

    BIM adversarial examples (against the undefended classifier) that fool it are purified by
    each preset's ComDefend at every evaluation step of its training; results.json, table.md
    and accuracy_vs_iteration.png are written to --out. Ctrl-C keeps a checkpoint: rerun with
    --resume.
    """
    from comdefend.evaluation.seed_experiment import (
        PLOT_FILE,
        RESULTS_FILE,
        TABLE_FILE,
        SeedExperimentConfig,
        run_seed_experiment,
    )

    config = SeedExperimentConfig(
        classifier=str(classifier),
        out=str(out),
        dataset=dataset,
        presets=presets,
        iterations=iterations,
        eval_every=eval_every,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        attack_eps=attack_eps,
        attack_steps=attack_steps,
        n=n,
        seed=seed,
        data_dir=str(data_dir) if data_dir else None,
        eval_images=eval_images,
        inference_batch=inference_batch,
        device=device,
        threads=threads,
    )
    try:
        results = run_seed_experiment(config, resume=resume, progress=progress)
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: finished presets and a checkpoint are kept in {out}; "
            "rerun with --resume to continue",
            err=True,
        )
        raise
    adv = results["adversarial_set"]
    typer.echo(
        f"fooling set: {adv['size']} of {adv['attacked_images']} test images "
        f"(clean accuracy {adv['clean_accuracy']:.4f})"
    )
    for entry in results["presets"].values():
        final = entry["final"] or {}
        accuracy = final.get("accuracy_after_defense")
        shown = "n/a" if accuracy is None else f"{accuracy:.4f}"
        typer.echo(
            f"{entry['name']} ({entry['seed_name']}, {entry['status']}): "
            f"accuracy after defending {shown}"
        )
    typer.echo(f"wrote {out / RESULTS_FILE}, {out / TABLE_FILE}, {out / PLOT_FILE}")


def register(app: typer.Typer) -> None:
    """Add ``seed-experiment`` to ``app``."""
    app.command("seed-experiment")(seed_experiment_command)
