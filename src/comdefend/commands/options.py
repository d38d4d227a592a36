"""Command-line helpers: typer callbacks applying :mod:`comdefend.validation` to options.

The flag's name comes from the option itself, so one callback serves every command::

    iterations: int = typer.Option(100, callback=positive_int_option)

A failed check raises :class:`~comdefend.errors.UsageError`, which ``comdefend``'s entry point
prints as one ``error:`` line (exit 2). :func:`interrupt_message` gives a command's Ctrl-C its
own message, :func:`status` prints lines that ``--quiet`` hides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from comdefend import validation
from comdefend.errors import UsageError


def _flag(param: typer.CallbackParam) -> str:
    """The long name of an option (``--iterations``), else its parameter name."""
    options = [o for o in param.opts if o.startswith("--")]
    return options[0] if options else f"--{str(param.name).replace('_', '-')}"


def positive_int_option(param: typer.CallbackParam, value: int | None) -> int | None:
    """Counts: iterations, batch sizes, images, threads (``None`` = the default)."""
    return None if value is None else validation.positive_int(value, _flag(param))


def non_negative_int_option(param: typer.CallbackParam, value: int | None) -> int | None:
    return None if value is None else validation.non_negative_int(value, _flag(param))


def positive_float_option(param: typer.CallbackParam, value: float | None) -> float | None:
    return None if value is None else validation.positive_float(value, _flag(param))


def non_negative_float_option(param: typer.CallbackParam, value: float | None) -> float | None:
    return None if value is None else validation.non_negative_float(value, _flag(param))


def iteration_list_option(param: typer.CallbackParam, value: str | None) -> list[int] | None:
    """A comma-separated list of positive iterations (``500,2500``), sorted, duplicates once."""
    if value is None:
        return None
    flag = _flag(param)
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items:
        raise UsageError(f"{flag} needs at least one iteration, e.g. {flag} 500,2500")
    iterations = set()
    for item in items:
        try:
            number = int(item)
        except ValueError:
            raise UsageError(
                f"{flag} takes comma-separated iterations, e.g. {flag} 500,2500; got {item!r}"
            ) from None
        iterations.add(validation.positive_int(number, flag))
    return sorted(iterations)


def seed_option(param: typer.CallbackParam, value: int | None) -> int | None:
    return None if value is None else validation.seed_value(value, _flag(param))


def device_option(param: typer.CallbackParam, value: str | None) -> str | None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; CUDA must be present when named."""
    if value is None:
        return None
    validation.resolve_device(value, _flag(param))
    return validation.device_name(value, _flag(param))


def _image_size(param: typer.CallbackParam, value: int | None) -> int | None:
    """A crop size from 1 to the ``image_size`` limit of :mod:`comdefend.limits`."""
    from comdefend.limits import check_int

    return None if value is None else check_int(_flag(param), value, 1, limit="image_size")


def shared_option(default: Any, flag: str, help: str, callback: Any) -> Any:  # noqa: A002
    """An option spelled and checked the same on every command that has it."""
    return typer.Option(default, flag, help=help, callback=callback)


def image_size_option() -> int | None:
    """``--image-size``: the center crop of datasets cropped on loading (one definition for
    every command that reads ImageNet)."""
    return shared_option(
        None,
        "--image-size",
        "Center-crop size for imagenet (default 224; resize to size / 0.875 first; at "
        "most 1024 unless $COMDEFEND_MAX_IMAGE_SIZE says more).",
        _image_size,
    )


def precision_option(param: typer.CallbackParam, value: str | None) -> str | None:
    """``fp32``, ``tf32`` or ``bf16`` (whether the device has it is checked when it runs)."""
    from comdefend.models.precision import PRECISIONS

    if value is None:
        return None
    text = value.strip().lower()
    if text not in PRECISIONS:
        raise UsageError(f"{_flag(param)} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return text


def output_folder_option(param: typer.CallbackParam, value: Path | None) -> Path | None:
    """A folder that can be created or written (not a file, not read-only)."""
    return None if value is None else validation.output_folder(value, _flag(param))


def output_file_option(param: typer.CallbackParam, value: Path | None) -> Path | None:
    """A file that can be written (not a folder; its folder writable)."""
    return None if value is None else validation.output_file(value, _flag(param))


@contextmanager
def interrupt_message(message: Callable[[], str]) -> Iterator[None]:
    """On Ctrl-C/SIGTERM inside the block, stop with ``message()`` (computed then, so it can
    say whether a checkpoint exists) instead of a bare "interrupted"."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        raise KeyboardInterrupt(message()) from interrupt


def resume_message(folder: Path, kept: str, saved: Path | None = None) -> Callable[[], str]:
    """The interrupt message of a resumable command writing into ``folder``."""

    def message() -> str:
        if saved is not None and not saved.exists():
            return f"interrupted before anything was saved in {folder}"
        return f"interrupted: {kept} in {folder}; the same command with --resume continues"

    return message


def status(message: str) -> None:
    """A status line on stdout (``wrote ...``), left out under ``comdefend --quiet``."""
    from comdefend.console import is_quiet

    if not is_quiet():
        typer.echo(message)


def images_option(default: int | None, help: str) -> Any:  # noqa: A002
    """``--images``/``-n``: how many images a command reads (one spelling for every command;
    torchrun's own parser rejects ``--n`` as ambiguous, so ``--n`` stays only as an alias)."""
    return typer.Option(default, "--images", "-n", "--n", help=help, callback=positive_int_option)


def device_choice() -> str:
    """``--device``: ``auto`` (CUDA when present, else CPU) on every command."""
    return shared_option(
        "auto",
        "--device",
        "auto (CUDA when present, else CPU), cpu, cuda or cuda:N.",
        device_option,
    )


def threads_choice() -> int | None:
    """``--threads``: torch's CPU threads, on every command where torch computes."""
    return shared_option(
        None, "--threads", "CPU threads for torch (default: torch's).", positive_int_option
    )


def names_of(kind: str) -> str:
    """The names in a registry, comma separated, for ``--help`` texts (never typed by hand):
    ``attacks``, ``datasets``, ``defenses``, ``presets``, ``threat-models`` or ``detectors``."""
    from comdefend.registry import Registry

    registry: Registry[Any]
    if kind == "attacks":
        from comdefend.attacks import ATTACKS

        registry = ATTACKS
    elif kind == "datasets":
        from comdefend.data.datasets import DATASETS

        registry = DATASETS
    elif kind == "defenses":
        from comdefend.defenses.spec import DEFENSES

        registry = DEFENSES
    elif kind == "presets":
        from comdefend.models.presets import PRESETS

        registry = PRESETS
    elif kind == "threat-models":
        from comdefend.defenses.adaptive import THREAT_MODELS

        registry = THREAT_MODELS
    elif kind == "detectors":
        from comdefend.defenses.detectors import DETECTORS

        registry = DETECTORS
    else:
        raise ValueError(f"no registry of {kind}")
    return ", ".join(registry.names())


def defense_usages() -> str:
    """Every defense spec's usage line from the defense registry, e.g. ``jpeg:Q (...)``."""
    from comdefend.defenses.spec import DEFENSES

    return _literal("; ".join(kind.usage for kind in DEFENSES.values()))


def _literal(text: str) -> str:
    """``text`` shown as written by typer's rich help, where ``[...]`` would be markup."""
    try:
        from rich.markup import escape
    except ImportError:  # plain click help prints text as is
        return text
    return escape(text)


def warn_small_eps(values: list[float], flag: str = "--eps") -> None:
    """Budgets are in units of 1/255: ``--eps 0.031`` is 0.031/255, almost no perturbation;
    the user most likely meant the fraction 0.031 = 8/255, so say so (and go on)."""
    for value in values:
        if 0 < value < 1:
            guess = round(value * 255)
            typer.echo(
                f"warning: {flag} {value:g} means {value:g}/255, a tiny budget; {flag} is in "
                f"units of 1/255 (did you mean {flag} {guess or 1}, i.e. {value:g} as a "
                "fraction?)",
                err=True,
            )


def check_model_reference(reference: str, flag: str) -> None:
    """A bare name that is neither a file nor a zoo model is a usage error (exit 2), not a
    missing file: checked before any work starts."""
    from comdefend.zoo import list_pretrained

    text = reference.strip()
    if text.startswith("zoo:"):
        text = text[len("zoo:") :].strip()
    elif "/" in text or ":" in text or Path(text).suffix or Path(text).expanduser().exists():
        return  # a path or package.module:factory: its own checks say what is wrong
    names = list_pretrained()
    if text not in names:
        raise UsageError(
            f"{flag} {reference}: no such file and no zoo model of that name "
            f"(zoo models: {', '.join(names)})"
        )
