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
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from comdefend.errors import CheckpointError

METADATA_KEY = "comdefend"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
        head = handle.read(8)
    if head.startswith(b"PK"):
        return "a zip archive (a torch.save or numpy .npz file?)"
    if head[:1] == b"\x80" or head.startswith(b"(") or head.startswith(b"c"):
        return "a Python pickle"
    if head.startswith(b"\x93NUMPY"):
        return "a NumPy .npy array"
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


def load_weights(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], path: object, architecture: str
) -> None:
    """``model.load_state_dict(tensors, strict=True)``, with a :class:`CheckpointError` that
    names the file and the architecture its config describes when they do not fit."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(
            f"{path}: weights do not fit the architecture its config describes "
            f"({architecture}): {first}"
        ) from error


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
