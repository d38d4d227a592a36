"""Checks of the numbers, devices and paths a user gives, shared by every command and config.

Each check returns the value it accepted (possibly normalised) or raises
:class:`~comdefend.errors.UsageError` with a one-line message that names the option, so that the
command line prints one ``error:`` line and the Python API raises the package's own type.
``comdefend.commands.options`` wraps them as typer callbacks for the command line.

Example:
    >>> positive_int(3, "--iterations")
    3
    >>> positive_int(0, "--iterations")
    Traceback (most recent call last):
    ...
    comdefend.errors.UsageError: --iterations must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from comdefend.errors import UsageError

#: Seeds must fit torch's and numpy's generators with room for per-item offsets.
MAX_SEED = 2**63 - 1

#: Device names accepted by ``--device`` (``cuda:N`` picks one GPU).
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N")


def positive_int(value: Any, name: str) -> int:
    """``value`` if it is an integer >= 1 (counts: iterations, batch sizes, images, threads)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def non_negative_int(value: Any, name: str) -> int:
    """``value`` if it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def finite_float(
    value: Any, name: str, minimum: float | None = None, *, strict: bool = False
) -> float:
    """``float(value)`` if it is a finite number, at least ``minimum`` (above it if ``strict``).

    Example:
        >>> finite_float(0.5, "--lr", 0.0, strict=True)
        0.5
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    number = float(value)
    bound = ""
    if minimum is not None:
        bound = f" {'>' if strict else '>='} {minimum:g}"
    if not math.isfinite(number) or (
        minimum is not None and (number <= minimum if strict else number < minimum)
    ):
        raise UsageError(f"{name} must be a finite number{bound}, got {value!r}")
    return number


def positive_float(value: Any, name: str) -> float:
    """A finite number > 0 (learning rates, budgets)."""
    return finite_float(value, name, 0.0, strict=True)


def non_negative_float(value: Any, name: str) -> float:
    """A finite number >= 0 (noise std, penalties)."""
    return finite_float(value, name, 0.0)


def seed_value(value: Any, name: str = "--seed") -> int:
    """An integer seed in ``0 .. 2**63 - 1`` (what torch and numpy generators accept)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise UsageError(f"{name} must be an integer in 0..2**63-1, got {value!r}")
    return value


def thread_count(value: Any, name: str = "--threads") -> int | None:
    """``None`` (torch's default) or a thread count >= 1."""
    return None if value is None else positive_int(value, name)


def set_threads(threads: int | None, name: str = "threads") -> None:
    """``torch.set_num_threads(threads)`` unless ``threads`` is None; 0 or less is refused.

    Replaces ``if threads: torch.set_num_threads(threads)``, which silently ignored 0.
    """
    if thread_count(threads, name) is not None:
        import torch

        torch.set_num_threads(threads)  # type: ignore[arg-type]


def device_name(value: str, name: str = "--device") -> str:
    """``value`` if it names a device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    text = str(value).strip().lower()
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda") or (kind == "cuda" and index.isdigit()):
        return text
    raise UsageError(f"unknown {name} {value!r}; valid: {', '.join(DEVICE_NAMES)}")


def resolve_device(value: str, name: str = "--device") -> Any:
    """The ``torch.device`` that ``value`` names; CUDA must be present when asked for.

    Raises:
        UsageError: an unknown name (``tpu``), ``cuda`` on a machine without CUDA, or a GPU
            index beyond the ones present.
    """
    import torch

    text = device_name(value, name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"{name} {value} requested but CUDA is not available on this machine")
        device = torch.device(text)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"{name} {value}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        return device
    return torch.device(text)


def _existing_ancestor(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def _check_writable(folder: Path, name: str, target: Path) -> None:
    """A temporary file can be created in ``folder`` (permissions, read-only mounts, root)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UsageError(f"{name} {target}: cannot write in {folder} ({reason})") from None


def output_folder(path: str | os.PathLike, name: str = "--out") -> Path:
    """``path`` as a folder that can be created or written: not a file, not under a file,
    and its nearest existing folder writable. Nothing is created.

    Raises:
        UsageError: the path or one of its parents is a file, or the folder is read-only.
    """
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{name} {folder} is a file; give a folder")
    existing = _existing_ancestor(folder)
    if not existing.is_dir():
        raise UsageError(f"{name} {folder}: {existing} is a file, not a folder")
    _check_writable(existing, name, folder)
    return folder


def output_file(path: str | os.PathLike, name: str = "--out") -> Path:
    """``path`` as a file that can be written: not a folder, its folder writable."""
    file = Path(path)
    if file.is_dir():
        raise UsageError(
            f"{name} {file} is a folder; give a file name such as {file / 'model.safetensors'}"
        )
    parent = _existing_ancestor(file.parent)
    if not parent.is_dir():
        raise UsageError(f"{name} {file}: {parent} is a file, not a folder")
    _check_writable(parent, name, file)
    return file


def outputs_spare_inputs(
    inputs: Iterable[str | os.PathLike],
    output_folder: str | os.PathLike,
    outputs: Iterable[str | os.PathLike] = (),
    name: str = "--out",
) -> None:
    """Refuse an output folder that is an input folder (or the folder of an input file), and
    outputs that would replace an input file; paths are compared after resolving links.

    Raises:
        UsageError: naming the input that would be overwritten or mixed with the outputs.

    Example:
        >>> outputs_spare_inputs(["photos/a.jpg"], "purified")
    """
    folder = Path(output_folder).resolve()
    sources = [Path(p) for p in inputs]
    for source in sources:
        own_folder = source if source.is_dir() else source.parent
        if own_folder.resolve() == folder:
            raise UsageError(
                f"{name} {output_folder} is the folder of the input {source}; write the outputs "
                "to another folder (they would replace or mix with the originals)"
            )
    resolved = {source.resolve(): source for source in sources}
    for output in outputs:
        overwritten = resolved.get(Path(output).resolve())
        if overwritten is not None:
            raise UsageError(
                f"{name} would overwrite the input {overwritten}; "
                "write the outputs to another folder"
            )
