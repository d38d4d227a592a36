"""The ``comdefend`` command line."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import typer
from typer.core import TyperGroup, TyperOption

from comdefend.commands.options import (
    check_model_reference,
    device_choice,
    images_option,
    names_of,
    non_negative_float_option,
    non_negative_int_option,
    output_file_option,
    output_folder_option,
    positive_float_option,
    positive_int_option,
    precision_option,
    seed_option,
    status,
    threads_choice,
)
from comdefend.errors import ComDefendError, InputError, UsageError

# typer >= 0.20 vendors click privately; its exception classes are reached through typer's own.
_ClickException: type[Exception] = next(
    base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException"
)

#: Exit status of a command stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
INTERRUPTED_EXIT = 130


class CommandInterrupted(Exception):  # noqa: N818 - a message carrier, not an error
    """Ctrl-C/SIGTERM stopped a command; the message says what was kept and how to go on."""


def _flag_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """No ``<bool>`` after an on/off flag in ``--help``: a flag takes no value."""
    if self.is_flag or _typer_display_type is None:
        return None
    return _typer_display_type(self, ctx)


# typer renders each option's value placeholder with this method; the oldest typer this package
# allows has no such method (and shows no placeholder for flags anyway): leave it alone there.
_typer_display_type = getattr(TyperOption, "display_type_rich", None)
if _typer_display_type is not None:
    TyperOption.display_type_rich = _flag_type  # type: ignore[method-assign, assignment]


class _Group(TyperGroup):
    """typer turns KeyboardInterrupt into a bare exit 130 before ``main`` could speak; catching
    it here, around every command, lets the command's own message reach the user."""

    def invoke(self, ctx: typer.Context):  # type: ignore[override]  # noqa: ANN201
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as interrupt:
            raise CommandInterrupted(str(interrupt) or "interrupted") from interrupt


app = typer.Typer(
    cls=_Group,
    name="comdefend",
    help="ComDefend: compression-based defenses against adversarial examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from comdefend import __version__

        typer.echo(f"comdefend {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the comdefend version and exit.",
    ),
    quiet: bool = typer.Option(
        False,
        "--quiet",
        "-q",
        help="No progress bars or status lines (results, warnings and errors still appear).",
    ),
) -> None:
    """ComDefend: compression-based defenses against adversarial examples."""
    from comdefend.console import configure

    configure(quiet=quiet)


def _echo_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


@app.command()
def presets(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    channels: int = typer.Option(
        3, help="Image channels: 3 (RGB) or 1 (grayscale).", callback=positive_int_option
    ),
) -> None:
    """List the architecture presets with parameter counts and MACs per pixel."""
    from comdefend.models.presets import PRESETS, preset_summary

    if channels not in (1, 3):
        raise UsageError("--channels must be 1 or 3")
    rows = [preset_summary(preset, channels) for preset in PRESETS.values()]
    if as_json:
        _echo_json(rows)
        return
    typer.echo(
        f"{'preset':<20}{'study name':<10}{'enc params':>12}{'dec params':>12}"
        f"{'enc MAC/px':>12}{'dec MAC/px':>12}"
    )
    for row in rows:
        typer.echo(
            f"{row['name']:<20}{row['study_name']:<10}{row['encoder_parameters']:>12,}"
            f"{row['decoder_parameters']:>12,}{row['encoder_macs_per_pixel']:>12,}"
            f"{row['decoder_macs_per_pixel']:>12,}"
        )


@app.command("import-official")
def import_official_command(
    encoder: Path = typer.Argument(..., help="The authors' encoder .npy (e.g. enc20_0.0001.npy)."),
    decoder: Path = typer.Argument(..., help="The authors' decoder .npy (e.g. dec20_0.0001.npy)."),
    out: Path = typer.Option(
        ..., "-o", "--out", help="Output .safetensors checkpoint.", callback=output_file_option
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
) -> None:
    """Convert the authors' released TF/canton checkpoints into a comdefend checkpoint."""
    from comdefend.official import import_official

    if out.exists() and not force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    model = import_official(encoder, decoder)
    model.save(out)
    config = model.config
    status(
        f"wrote {out}: {'RGB' if config.image_channels == 3 else 'grayscale'}, "
        f"{config.bits_per_pixel} bits/pixel, channel order {config.channel_order}, "
        f"purify mode {config.purify_mode}"
        + (f" ({config.patch_size}px patches)" if config.purify_mode == "patch" else "")
    )


@app.command()
def purify(
    inputs: list[Path] = typer.Argument(..., help="Image files or folders (PNG/JPEG)."),
    model_path: str = typer.Option(
        ..., "--model", "-m", help="Purifier checkpoint path or zoo name (comdefend zoo list)."
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Output folder (PNG files, same names); never an input's folder.",
        callback=output_folder_option,
    ),
    mode: str | None = typer.Option(None, help="patch or full (default: the checkpoint's)."),
    patch_size: int | None = typer.Option(
        None, help="Patch size for patch mode.", callback=positive_int_option
    ),
    noise_std: float | None = typer.Option(
        None, help="Test-time code noise std.", callback=non_negative_float_option
    ),
    seed: int = typer.Option(0, help="Seed of the test-time noise.", callback=seed_option),
    force: bool = typer.Option(False, "--force", help="Overwrite earlier outputs (not inputs)."),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    precision: str = typer.Option(
        "fp32",
        help="fp32, tf32 (CUDA GPUs) or bf16 (CPUs with AVX512-BF16 or AMX, GPUs): the "
        "purification's arithmetic (docs/PERFORMANCE.md has its measured effect).",
        callback=precision_option,
    ),
) -> None:
    """Purify image files with a ComDefend checkpoint."""
    import torch

    from comdefend.console import progress_bar
    from comdefend.data.images import collect_images, read_image, write_png
    from comdefend.models.comdefend import ComDefend
    from comdefend.models.precision import check_precision
    from comdefend.training.run import resolve_device
    from comdefend.validation import outputs_spare_inputs, set_threads
    from comdefend.zoo import resolve_weights

    check_model_reference(model_path, "--model")
    set_threads(threads, "--threads")
    overrides: dict = {}
    if mode is not None:
        if mode not in ("patch", "full"):
            raise UsageError(f"--mode must be 'patch' or 'full', got {mode!r}")
        overrides["purify_mode"] = mode
    if patch_size is not None:
        overrides["patch_size"] = patch_size
    if noise_std is not None:
        overrides["inference_noise_std"] = noise_std
    overrides["precision"] = check_precision(precision, resolve_device(device))
    files = collect_images(inputs)
    targets = [out / (file.stem + ".png") for file in files]
    outputs_spare_inputs([*inputs, *files], out, targets)  # with or without --force
    if len(set(targets)) != len(targets):
        raise UsageError("two inputs share a file name; purify them into separate folders")
    existing = [str(t) for t in targets if t.exists()]
    if existing and not force:
        raise UsageError(f"{len(existing)} output file(s) exist (e.g. {existing[0]}); pass --force")
    weights = resolve_weights(model_path)
    model = ComDefend.from_checkpoint(weights, resolve_device(device), **overrides)
    model.binarizer.reseed(seed)
    channels = model.config.image_channels
    images = []
    for file in files:  # read everything first: a bad file stops the run before any output
        image = read_image(file, channels=None)
        if image.shape[0] != channels:
            kind = {1: "grayscale", 3: "RGB"}
            raise InputError(f"{file} is {kind[image.shape[0]]} but the model is {kind[channels]}")
        images.append(image)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for image, target in progress_bar(
            list(zip(images, targets, strict=True)), desc="purify", unit="img"
        ):
            purified = model.purify(image.unsqueeze(0).to(model_device(model)))[0]
            write_png(target, purified, model.config.output_quantization)
    status(f"wrote {len(targets)} image(s) to {out}")


def model_device(model):  # noqa: ANN001, ANN201
    return next(model.parameters()).device


@app.command()
def reconstruct(
    model_path: str = typer.Option(
        ..., "--model", "-m", help="Purifier checkpoint path or zoo name (comdefend zoo list)."
    ),
    dataset: str = typer.Option("fashion-mnist", help=f"Dataset: {names_of('datasets')}."),
    split: str = typer.Option("test", help="train, test, or sample (the embedded test images)."),
    n: int | None = images_option(None, "Use the first N images (default: all)."),
    data_dir: Path | None = typer.Option(None, help="Dataset folder (else $COMDEFEND_DATA)."),
    batch_size: int = typer.Option(
        250, help="Images per forward pass.", callback=positive_int_option
    ),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Reconstruction quality of a purifier on a dataset: PSNR, bits/pixel, bit density."""
    from comdefend.evaluation.reconstruction import reconstruction_report
    from comdefend.models.comdefend import ComDefend
    from comdefend.training.run import resolve_device
    from comdefend.validation import set_threads
    from comdefend.zoo import resolve_weights

    check_model_reference(model_path, "--model")
    set_threads(threads, "--threads")
    weights = resolve_weights(model_path)
    model = ComDefend.from_checkpoint(weights, resolve_device(device))
    report = reconstruction_report(model, dataset, split, n, data_dir, batch_size, progress=True)
    report["model"] = weights.to_dict()
    if as_json:
        _echo_json(report)
    else:
        typer.echo(
            f"{report['dataset']} {report['split']} ({report['images']} images): "
            f"PSNR {report['psnr_db']:.2f} dB, {report['bits_per_pixel']} bits/pixel "
            f"(compression {report['compression_ratio']:.1f}x), bit density "
            f"{report['bit_density']:.3f}"
        )


@app.command("train")
def train_command(
    out: Path = typer.Option(
        ..., "--out", "-o", help="Run folder, e.g. runs/NAME.", callback=output_folder_option
    ),
    recipe: str = typer.Option(
        "residual-study",
        help="Named settings (residual-study, authors, authors-torch); flags override them.",
    ),
    dataset: str | None = typer.Option(
        None, help=f"Dataset: {names_of('datasets')} or folder (recipe: cifar10)."
    ),
    preset: str | None = typer.Option(
        None,
        help=f"Architecture preset: {names_of('presets')} (see 'comdefend presets'; recipe: "
        "plain).",
    ),
    iterations: int | None = typer.Option(
        None, help="Training iterations (recipe's).", callback=positive_int_option
    ),
    epochs: float | None = typer.Option(
        None, help="Alternative to --iterations.", callback=positive_float_option
    ),
    batch_size: int | None = typer.Option(
        None, help="Global batch size (recipe's).", callback=positive_int_option
    ),
    lr: float | None = typer.Option(
        None, help="Initial learning rate (recipe's).", callback=positive_float_option
    ),
    lr_schedule: str | None = typer.Option(None, help="constant, piecewise or exponential."),
    noise_std: float | None = typer.Option(
        None, help="Training noise std before the sigmoid.", callback=non_negative_float_option
    ),
    code_penalty: float | None = typer.Option(
        None, help="lambda of the code penalty.", callback=non_negative_float_option
    ),
    stabilize: str | None = typer.Option(
        None,
        help="Measures against collapse, NAME[=VALUE][,NAME...]: rollback, logit-penalty, "
        "clip-grad, code-bound, adam-eps, amsgrad, warmup, cosine-decay (none in any recipe; "
        "'none' turns them off). The measured choice against the collapse: rollback "
        "(docs/notes/training-collapse.md).",
    ),
    patch_size: int | None = typer.Option(
        None,
        help="Train on random P x P crops of the training images (default 32: image folders "
        "are cut into 32x32 patches, smaller datasets are used whole).",
        callback=positive_int_option,
    ),
    code_channels: int | None = typer.Option(
        None, help="Code channels (bits/pixel).", callback=positive_int_option
    ),
    seed: int = typer.Option(0, help="Random seed (init, batches, noise).", callback=seed_option),
    data_dir: Path | None = typer.Option(None, help="Dataset folder (else $COMDEFEND_DATA)."),
    eval_every: int = typer.Option(
        500, help="Held-out evaluation interval (iterations).", callback=positive_int_option
    ),
    eval_images: int = typer.Option(
        500, help="Held-out test images for evaluation (0: none).", callback=non_negative_int_option
    ),
    checkpoint_every: int = typer.Option(
        250, help="Checkpoint interval (iterations).", callback=positive_int_option
    ),
    snapshot_every: int | None = typer.Option(
        None,
        help="Keep the weights every N iterations (and at the end) in OUT/snapshots/, to "
        "measure the run along its training later.",
        callback=positive_int_option,
    ),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    precision: str = typer.Option(
        "fp32",
        help="fp32, bf16, fp16 or tf32 (CUDA): the forward pass's arithmetic (autocast, fp32 "
        "weights; noise, binarizer and loss in fp32); refused where the device lacks it and "
        "fixed for the run (not changed by --resume).",
    ),
    channels_last: bool = typer.Option(
        False,
        "--channels-last/--no-channels-last",
        help="Train in the channels-last (NHWC) memory format: the same training, faster "
        "convolutions on CPUs; checkpoints keep the usual layout.",
    ),
    compile: bool = typer.Option(
        False,
        "--compile/--no-compile",
        help="Compile the training pass with torch.compile (needs a C++ compiler; the first "
        "iteration takes tens of seconds longer, the others are faster). Evaluation stays "
        "eager; checkpoints are unchanged.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out."),
) -> None:
    """Train a ComDefend purifier (Ctrl-C saves a checkpoint; --resume continues exactly).

    Data-parallel: torchrun --nproc-per-node N -m comdefend train ... (the batch is split).
    """
    from comdefend.training.engine import TrainingInterrupted
    from comdefend.training.recipes import resolve_config
    from comdefend.training.trainer import train

    config = resolve_config(
        recipe,
        dataset=dataset,
        out=str(out),
        preset=preset,
        code_channels=code_channels,
        iterations=iterations,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        lr_schedule=lr_schedule,
        noise_std=noise_std,
        code_penalty=code_penalty,
        stabilize=stabilize,
        seed=seed,
        data_dir=str(data_dir) if data_dir else None,
        patch_size=patch_size,
        eval_every=eval_every,
        eval_images=eval_images,
        checkpoint_every=checkpoint_every,
        snapshot_every=snapshot_every,
        device=device,
        threads=threads,
        precision=precision,
        channels_last=channels_last,
        compile=compile,
    )
    try:
        summary = train(config, resume=resume)
    except TrainingInterrupted as interrupted:
        typer.echo(str(interrupted), err=True)
        raise typer.Exit(130) from None
    if "config" not in summary:
        return  # a data-parallel process other than 0: process 0 reports
    heldout = summary["heldout"]
    if heldout:
        typer.echo(
            f"done: {summary['iterations']} iterations, held-out PSNR {heldout['psnr_db']:.2f} dB, "
            f"bit density {heldout['bit_density']:.3f}"
        )
    stopped = summary.get("stopped_early")
    if stopped:
        typer.echo(
            f"stopped early at iteration {stopped['iteration']} of {config.iterations}: "
            f"{stopped['reason']}"
        )
    typer.echo(f"model: {summary['model']}")
    best = summary.get("best")
    if best and best["iteration"] != summary["iterations"]:
        note = " (the run collapsed: use these weights)" if summary.get("collapsed") else ""
        typer.echo(
            f"best held-out PSNR {best['psnr_db']:.2f} dB at iteration {best['iteration']}: "
            f"{best['model']}{note}"
        )


@app.command()
def quickstart(
    out: Path = typer.Option(
        Path("reports/quickstart"),
        "--out",
        "-o",
        help="Report folder.",
        callback=output_folder_option,
    ),
    iterations: int = typer.Option(
        100, help="Training iterations (batch 20).", callback=positive_int_option
    ),
    eval_images: int = typer.Option(
        1000,
        "--images",
        "-n",
        "--eval-images",
        help="Test images for the reconstruction report.",
        callback=positive_int_option,
    ),
    data_dir: Path | None = typer.Option(None, help="Fashion-MNIST folder."),
    seed: int = typer.Option(0, help="Random seed.", callback=seed_option),
    threads: int | None = threads_choice(),
    force: bool = typer.Option(False, "--force", help="Replace an earlier quick-start run."),
) -> None:
    """Offline quick start: train a small ComDefend on Fashion-MNIST and write a report."""
    from comdefend.quickstart import run_quickstart
    from comdefend.validation import set_threads

    set_threads(threads, "--threads")

    result = run_quickstart(
        out, iterations, eval_images, str(data_dir) if data_dir else None, seed, force
    )
    report = result["reconstruction"]
    typer.echo(
        f"Fashion-MNIST test ({report['images']} images): PSNR {report['psnr_db']:.2f} dB at "
        f"{report['bits_per_pixel']} bits/pixel ({report['compression_ratio']:.1f}x), "
        f"bit density {report['bit_density']:.3f}"
    )
    status(f"report: {out / 'report.md'}  grid: {result['grid']}")


@app.command()
def demo(
    out: Path = typer.Option(
        Path("reports/demo"), "--out", "-o", help="Report folder.", callback=output_folder_option
    ),
    images: int = typer.Option(
        25,
        "--images",
        "-n",
        help="Sample images per dataset (1..1000).",
        callback=positive_int_option,
    ),
    dataset: list[str] = typer.Option(
        ["fashion-mnist", "cifar10"], "--dataset", help="fashion-mnist and/or cifar10."
    ),
    attack: list[str] = typer.Option(
        None,
        "--attack",
        help=f"Attacks: {names_of('attacks')} (default: fgsm, bim, deepfool, cw, pgd).",
    ),
    threat_model: list[str] = typer.Option(
        None, "--threat-model", help="Threat models (default: oblivious, bpda)."
    ),
    seed: int = typer.Option(0, help="Master seed.", callback=seed_option),
    device: str = device_choice(),
    threads: int | None = threads_choice(),
    force: bool = typer.Option(False, "--force", help="Replace an earlier demo report."),
) -> None:
    """Offline demo: the shipped models against the paper's attacks, oblivious and BPDA."""
    from comdefend.demo import DEMO_ATTACKS, DEMO_THREAT_MODELS, DemoConfig, run_demo
    from comdefend.validation import set_threads

    set_threads(threads, "--threads")
    summary = run_demo(
        DemoConfig(
            out=str(out),
            datasets=[d for item in dataset for d in item.split(",")],
            n=images,
            attacks=[a for item in attack or DEMO_ATTACKS for a in item.split(",")],
            threat_models=[
                t for item in threat_model or DEMO_THREAT_MODELS for t in item.split(",")
            ],
            seed=seed,
            device=device,
            force=force,
        )
    )
    for markdown in summary["markdown"]:
        typer.echo("\n" + markdown)
    status(f"demo finished in {summary['elapsed_s']:.0f} s")
    status(f"report: {summary['index']}")


@app.command()
def download(
    dataset: str = typer.Argument(..., help="cifar10, cifar100 or fashion-mnist."),
    data_dir: Path = typer.Option(
        Path("data"), help="Where to put it.", callback=output_folder_option
    ),
) -> None:
    """Download a dataset (needs internet; checksums are verified)."""
    from comdefend.data.download import download_dataset

    folder = download_dataset(dataset, data_dir)
    typer.echo(f"{dataset} is in {folder}; use --data-dir {data_dir}")


from comdefend.commands import register_all  # noqa: E402

register_all(app)


def _describe_os_error(error: OSError) -> str:
    """``cannot write out/x.png: Permission denied`` from an OSError, without a traceback."""
    reason = error.strerror or str(error)
    if error.filename is None:
        return reason
    return f"{error.filename}: {reason}"


def _stop_as_on_ctrl_c(signum: int, frame: object) -> None:  # noqa: ARG001
    raise KeyboardInterrupt


@contextmanager
def _sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, ``kill``, ``timeout``, torchrun stopping its workers)
    raises KeyboardInterrupt like Ctrl-C for the whole command, so that every command, not only
    the training engine (whose own deferred handler replaces this one while it trains and gives
    it back), ends in its message and exit 130 instead of a silent exit 143."""
    try:
        previous = signal.signal(signal.SIGTERM, _stop_as_on_ctrl_c)
    except ValueError:  # not the main thread: only the main thread may handle signals
        yield
        return
    try:
        yield
    finally:
        # None: a handler not installed from Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every failure a user can cause ends in one ``error:`` line and a non-zero
    exit (2 for bad arguments), Ctrl-C and SIGTERM alike in the command's message and exit 130.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``); tests pass their own.
    """
    from comdefend.console import reset

    try:
        with _sigterm_as_ctrl_c():
            code = app(
                args=list(argv) if argv is not None else None,
                prog_name="comdefend",
                standalone_mode=False,
            )
    except ComDefendError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except CommandInterrupted as interrupt:
        typer.echo(str(interrupt), err=True)
        sys.exit(INTERRUPTED_EXIT)
    except _ClickException as error:  # typer's parsing: unknown option, not a number, ...
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
            typer.echo(context.get_help(), err=True)  # bare `comdefend`: the overview
            sys.exit(2)
        message = error.format_message()  # type: ignore[attr-defined]
        if context is not None:
            message += f" (see '{context.command_path} --help')"
        typer.echo(f"error: {message}", err=True)
        sys.exit(getattr(error, "exit_code", 2))
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except OSError as error:  # full disk, permissions, a path that is a file: the user's to fix
        typer.echo(f"error: {_describe_os_error(error)}", err=True)
        sys.exit(1)
    finally:
        reset()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
