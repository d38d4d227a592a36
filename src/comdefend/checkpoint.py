"""Checkpoint files: safetensors tensors plus a JSON description in the safetensors header.

Nothing here unpickles: a checkpoint is loaded with ``safetensors`` only, and the JSON metadata
says what the tensors are (``kind``: ``purifier``, ``classifier`` or ``training-state``) and the
full configuration that built them. Every write goes to a temporary file in the same folder and
is renamed into place, so an interrupted write never destroys an earlier checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from comdefend.errors import CheckpointError

METADATA_KEY = "comdefend"
FORMAT_VERSION = 1


#: Every temporary file of :func:`atomic_write` ends with this, so that leftovers of a killed
#: process are recognisable: ``.NAME~HOST~PID~RANDOM.comdefend-tmp`` beside the target.
TEMPORARY_SUFFIX = ".comdefend-tmp"

#: A leftover from another machine (shared folder) is removed once it is this old.
FOREIGN_TEMPORARY_AGE_S = 24 * 3600


def _host() -> str:
    return socket.gethostname().replace("~", "-").replace(os.sep, "-") or "host"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else (or cannot tell): keep its file
    return True


def clean_stale_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers (SIGKILL, power loss) left in ``folder``.

    A temporary file is stale when the process that made it on this machine is gone, or when it
    comes from another machine and is older than a day. Files of live writers and any file not
    named by :func:`atomic_write` are left alone.

    Returns:
        The files removed.
    """
    removed: list[Path] = []
    try:
        candidates = list(Path(folder).glob(f".*{TEMPORARY_SUFFIX}"))
    except OSError:
        return removed
    host, now = _host(), time.time()
    for file in candidates:
        parts = file.name[: -len(TEMPORARY_SUFFIX)].rsplit("~", 3)
        if len(parts) != 4 or not parts[2].isdigit():
            continue
        _, file_host, pid, _ = parts
        try:
            if file_host == host:
                stale = int(pid) != os.getpid() and not _process_alive(int(pid))
            else:
                stale = now - file.stat().st_mtime > FOREIGN_TEMPORARY_AGE_S
            if stale:
                file.unlink()
                removed.append(file)
        except OSError:
            continue  # raced with its owner or another cleaner
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    The temporary file sits beside ``path`` (named ``.NAME~HOST~PID~RANDOM.comdefend-tmp``)
    and is removed if ``write`` fails; stale ones that killed processes left in the folder
    are removed first (:func:`clean_stale_temporary_files`).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporary_files(target.parent)
    handle, tmp_name = tempfile.mkstemp(
        prefix=f".{target.name}~{_host()}~{os.getpid()}~",
        suffix=TEMPORARY_SUFFIX,
        dir=target.parent,
    )
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> Path:
    """Write ``tensors`` and JSON-serialisable ``metadata`` (must hold ``kind``) atomically."""
    if "kind" not in metadata:
        raise ValueError("checkpoint metadata needs a 'kind'")
    payload = {"format_version": FORMAT_VERSION, **metadata}
    header = {METADATA_KEY: json.dumps(payload, sort_keys=True)}
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=header))


def _describe_foreign_file(path: Path) -> str:
    with path.open("rb") as handle:
        head = handle.read(9)
    # A safetensors file starts with its header's length (8 bytes, little-endian), then "{".
    # Check that first: the length's low byte can be anything, e.g. 0x80 or "(" like a pickle.
    if len(head) == 9 and head[8:9] == b"{":
        return "a corrupt or truncated safetensors file"
    if head.startswith(b"PK"):
        return "a zip archive (a torch.save or numpy .npz file?)"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    return "not a safetensors file"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON description of a checkpoint, without loading its tensors."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"checkpoint not found: {file}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{file} is {_describe_foreign_file(file)}, not a comdefend safetensors checkpoint; "
            "comdefend never unpickles files (import the authors' .npy weights with "
            "'comdefend import-official')"
        ) from error
    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{file} is a safetensors file without comdefend metadata; "
            "it was not written by comdefend"
        )
    try:
        return json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} has corrupt comdefend metadata: {error}") from error


def load_checkpoint(
    path: str | os.PathLike, expected_kind: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load tensors (on CPU) and metadata; check ``kind`` when ``expected_kind`` is given."""
    metadata = read_metadata(path)
    kind = metadata.get("kind")
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(
            f"{path} holds a {kind!r} checkpoint, but a {expected_kind!r} checkpoint is needed here"
        )
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                tensors[name] = handle.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt: {error}") from error
    return tensors, metadata


def check_config_fields(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Refuse config dicts with fields the dataclass ``cls`` does not know (newer file?)."""
    from dataclasses import fields

    unknown = set(data) - {item.name for item in fields(cls)}
    if unknown:
        raise CheckpointError(f"unknown {what} config fields: {sorted(unknown)}")


def check_weights(
    tensors: Mapping[str, torch.Tensor],
    source: object,
    expected: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse weights that would load silently but compute garbage.

    Every floating-point tensor must be finite; a tensor that the model holds as floating point
    (``expected``, its ``state_dict()``) must be floating point in the file too, and without
    ``expected`` every tensor must be (integer and bool tensors are only accepted where the
    model itself keeps integers, e.g. BatchNorm's ``num_batches_tracked``).

    Args:
        tensors: name -> tensor, as read from the file.
        source: what to name in the message (the file).
        expected: the model's own state dict, when known.

    Raises:
        CheckpointError: one line naming the first offending tensor.
    """
    for name, tensor in tensors.items():
        reference = expected.get(name) if expected is not None else None
        wants_float = reference is None or reference.is_floating_point()
        if wants_float and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                "weights must be floating point"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{source}: tensor {name!r} holds {bad} NaN or infinite value(s) of "
                f"{tensor.numel()}; refusing weights that would compute garbage"
            )


def _describe_mismatch(
    expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> str:
    """Which keys are missing, unexpected or of another shape, named (a few of each)."""

    def listing(names: list[str]) -> str:
        shown = ", ".join(repr(n) for n in names[:3])
        return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    reshaped = [
        f"{name!r} is {tuple(tensors[name].shape)} in the file but "
        f"{tuple(expected[name].shape)} in the model"
        for name in expected
        if name in tensors and tuple(tensors[name].shape) != tuple(expected[name].shape)
    ]
    parts = []
    if missing:
        parts.append(f"missing {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected {listing(unexpected)}")
    if reshaped:
        parts.append(
            reshaped[0] + (f" (and {len(reshaped) - 1} more)" if len(reshaped) > 1 else "")
        )
    return "; ".join(parts)


def load_weights(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: object, architecture: str
) -> None:
    """``model.load_state_dict(tensors, strict=True)`` after :func:`check_weights`, with a
    :class:`CheckpointError` that names the file, ``architecture`` (how to name the model, e.g.
    ``"the architecture its config describes (preset plain, ...)"``) and the first keys that
    do not fit."""
    expected = model.state_dict()
    mismatch = _describe_mismatch(expected, tensors)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not fit {architecture}: {mismatch}")
    check_weights(tensors, path, expected)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:  # not expected after the checks above; keep it one line
        detail = " ".join(str(error).split())
        raise CheckpointError(f"{path}: weights do not fit {architecture}: {detail}") from error


# (resolved path, size, mtime in ns) -> sha256: an evaluation verifies a zoo file when it loads
# it and records its hash in the results; the file is read once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file; remembered until the file's size or modification time changes."""
    file = Path(path)
    stat = file.stat()
    key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(chunk_size), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
