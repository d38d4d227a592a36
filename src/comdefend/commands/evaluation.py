"""Evaluation command: ``evaluate`` (attacks × eps × defenses × threat models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from comdefend.commands.options import (
    check_model_reference,
    defense_usages,
    device_choice,
    image_size_option,
    images_option,
    interrupt_message,
    names_of,
    output_folder_option,
    positive_int_option,
    precision_option,
    resume_message,
    seed_option,
    threads_choice,
    warn_small_eps,
)
from comdefend.defenses.spec import COMDEFEND_OPTIONS
from comdefend.errors import UsageError

#: ``@noise=, @seed=, ...``: the options a comdefend:PATH@... defense spec takes.
_COMDEFEND_OPTION_FLAGS = ", ".join(f"@{option}=" for option in COMDEFEND_OPTIONS)


def _split_list(values: list[str] | None) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (options accept repeats and commas)."""
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


def _parse_eps(values: list[str] | None) -> list[float]:
    eps = []
    for item in _split_list(values):
        try:
            eps.append(float(item))
        except ValueError:
            raise UsageError(
                f"--eps takes numbers in units of 1/255 (e.g. 2,4,8,16), got {item!r}"
            ) from None
    return eps


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_attack_params(values: list[str] | None) -> dict[str, dict[str, Any]]:
    params: dict[str, dict[str, Any]] = {}
    for item in values or []:
        name, dot, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not dot or not eq or not name.strip() or not key.strip():
            raise UsageError(
                f"--attack-param takes ATTACK.KEY=VALUE (e.g. pgd.steps=20), got {item!r}"
            )
        params.setdefault(name.strip().lower(), {})[key.strip()] = _parse_value(value.strip())
    return params


def _check_attack_params(params: dict[str, dict[str, Any]], attacks: list[str]) -> None:
    """Build each attack with its ``--attack-param`` values around a stand-in model, so an
    unknown attack, key or value out of range stops the command before any data is read."""
    from torch import nn

    from comdefend.attacks import ATTACKS, make_attack

    evaluated = {ATTACKS.canonical(a) for a in attacks if a in ATTACKS}
    for name, values in params.items():
        if name not in ATTACKS:
            raise UsageError(
                f"--attack-param {name}...: unknown attack {name!r}; attacks: {names_of('attacks')}"
            )
        if ATTACKS.canonical(name) not in evaluated:
            raise UsageError(
                f"--attack-param given for attack {name!r}, which is not evaluated (--attack)"
            )
        make_attack(name, nn.Identity(), **values)


def evaluate_command(
    dataset: str = typer.Option(..., help=f"Dataset: {names_of('datasets')}."),
    split: str = typer.Option(
        "test",
        help="test, or sample: the 1,000 test images shipped with the package (no dataset needed).",
    ),
    classifier: str = typer.Option(
        ...,
        "--classifier",
        "-c",
        help="Classifier checkpoint path, zoo name (e.g. resnet20-cifar10), or your own model "
        "as package.module:factory, a callable without arguments that returns an nn.Module "
        "taking NCHW float images in [0, 1] and returning one logit per class (checked on the "
        "first images; the current folder is importable).",
    ),
    defense: list[str] = typer.Option(
        ["none"],
        "--defense",
        "-d",
        help=f"Defense spec, repeatable; chain with + (e.g. jpeg:75+median:3). Kinds: "
        f"{defense_usages()}. comdefend:PATH@KEY=VALUE,... sets the purifier's options "
        f"({_COMDEFEND_OPTION_FLAGS}), e.g. "
        "comdefend:zoo:comdefend-cifar10@noise=0,precision=bf16.",
    ),
    attack: list[str] = typer.Option(
        ["fgsm", "pgd"],
        "--attack",
        "-a",
        help=f"Attack, repeatable or comma separated: {names_of('attacks')}.",
    ),
    eps: list[str] = typer.Option(
        ["2,4,8,16"],
        "--eps",
        help="L-inf budgets in units of 1/255 (8 means 8/255), in [0, 255], comma separated; "
        "floats allowed. Ignored by deepfool and cw (minimum-norm, reported as 'min-norm').",
    ),
    threat_model: list[str] = typer.Option(
        ["oblivious"],
        "--threat-model",
        "-t",
        help=f"{names_of('threat-models')}; comma separated or repeated.",
    ),
    n: int = images_option(1000, "Evaluate the first N test images."),
    seed: int = typer.Option(0, help="Master seed (attacks, noise draws).", callback=seed_option),
    batch_size: int = typer.Option(
        100, help="Images per attack / forward call.", callback=positive_int_option
    ),
    data_dir: Path | None = typer.Option(None, help="Dataset folder (else $COMDEFEND_DATA)."),
    image_size: int | None = image_size_option(),
    out: Path | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Report folder, e.g. reports/NAME (results.json, results.csv, report.md, "
        "report.html; plots with the report extra). Required unless --json.",
        callback=output_folder_option,
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing report folder."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run in --out (same settings): each finished "
        "(attack, eps) is read back, not recomputed.",
    ),
    eot_samples: int = typer.Option(
        8, help="EOT draws of the attacker under bpda+eot.", callback=positive_int_option
    ),
    eot_draws: int = typer.Option(
        3, help="Evaluation draws of randomized defenses.", callback=positive_int_option
    ),
    detector: list[str] = typer.Option(
        [], "--detector", help=f"Detectors to evaluate, repeatable: {names_of('detectors')}."
    ),
    detector_holdout: int = typer.Option(
        1000,
        help="Clean test images after the first N that calibrate the detectors (5% FPR).",
        callback=positive_int_option,
    ),
    attack_param: list[str] = typer.Option(
        [], "--attack-param", help="Attack hyper-parameter ATTACK.KEY=VALUE, e.g. pgd.steps=20."
    ),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    precision: str | None = typer.Option(
        None,
        help="fp32, tf32 (CUDA GPUs) or bf16 for every ComDefend defense's purification "
        "(default: each defense's own, fp32); attacks and the classifier stay fp32.",
        callback=precision_option,
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    as_json: bool = typer.Option(
        False, "--json", help="Print the results (results.json's content) as JSON on stdout."
    ),
) -> None:
    """Robust accuracy of classifier + defenses under attacks, written as JSON/CSV/MD/HTML.

    Your own PyTorch classifier: give --classifier mymodels:build where mymodels.py (in the
    current folder, or any importable package) has a function build() that returns the model
    (an nn.Module taking NCHW float images in [0, 1] and returning one logit per class, with
    its weights loaded). For example, on the 1,000 Fashion-MNIST test images shipped with the
    package:

    \b
    comdefend evaluate --classifier mymodels:build --dataset fashion-mnist --split sample \\
        --defense none --defense jpeg:75 --defense comdefend:zoo:comdefend-fashion-mnist \\
        --attack fgsm,pgd --attack-param pgd.steps=10 --eps 8 \\
        --threat-model oblivious,bpda --images 100 --out reports/mine

    Runs in one process, or in several under torchrun (``torchrun --nproc-per-node N -m
    comdefend evaluate ...``): the images are shared among the processes and rank 0 writes the
    same report.
    """
    from comdefend.evaluation.distributed import torchrun_rank
    from comdefend.evaluation.harness import EvaluationConfig, evaluate
    from comdefend.validation import set_threads

    if out is None and not as_json:
        raise UsageError("give a report folder with --out (or --json to print the results)")
    eps_values = _parse_eps(eps)
    warn_small_eps(eps_values)
    attack_params = _parse_attack_params(attack_param)
    _check_attack_params(attack_params, _split_list(attack))
    check_model_reference(classifier, "--classifier")
    set_threads(threads, "--threads")

    config = EvaluationConfig(
        dataset=dataset,
        classifier=str(classifier),
        split=split,
        defenses=list(defense),  # not split on commas: comdefend options contain them
        attacks=_split_list(attack),
        eps=eps_values,
        threat_models=_split_list(threat_model),
        n=n,
        seed=seed,
        batch_size=batch_size,
        data_dir=str(data_dir) if data_dir else None,
        out=str(out) if out is not None else None,
        force=force,
        resume=resume,
        eot_samples=eot_samples,
        eot_draws=eot_draws,
        detectors=_split_list(detector),
        detector_holdout=detector_holdout,
        attack_params=attack_params,
        device=device,
        progress=progress,
        precision=precision,
        image_size=image_size,
    )
    kept = "every finished batch and (attack, eps) group is saved"
    saved = resume_message(out, kept, out / "progress.safetensors") if out else lambda: ""
    with interrupt_message(saved):
        result = evaluate(config)
    if torchrun_rank() != 0:
        return  # rank 0 reports
    if as_json:
        typer.echo(result.to_json())
    for line in result.skipped:
        typer.echo(f"note: {line}", err=True)
    if result.resumed_groups:
        typer.echo(f"resumed: {result.resumed_groups} (attack, eps) groups read back", err=as_json)
    if steps := result.work.get("saved_batches_read_back"):
        typer.echo(f"resumed: {steps} saved batches of an unfinished group read back", err=as_json)
    written = f"; wrote {', '.join(result.files)} to {out}" if out is not None else ""
    processes = f" by {result.processes} processes" if result.processes > 1 else ""
    typer.echo(
        f"evaluated {len(result.cells)} cells on {result.dataset.n} images{processes}{written}",
        err=as_json,
    )


def register(app: typer.Typer) -> None:
    """Add the evaluation commands to ``app``."""
    app.command("evaluate")(evaluate_command)
