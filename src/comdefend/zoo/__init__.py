"""Pretrained weights shipped inside the package (timm/CompressAI-style registry).

``registry.json`` beside this file lists every entry: file, sha256, kind (purifier or
classifier), dataset, architecture, the exact training command, the metrics measured after
training, the hardware it was trained on, and its license. Loading verifies the sha256.

Example:
    >>> from comdefend.zoo import list_pretrained, load_pretrained
    >>> names = list_pretrained()
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from comdefend.checkpoint import read_metadata, sha256_of
from comdefend.errors import CheckpointError, UsageError

ZOO_FOLDER = Path(str(resources.files("comdefend.zoo")))
REGISTRY_FILE = ZOO_FOLDER / "registry.json"


@dataclass(frozen=True)
class PretrainedEntry:
    """One pretrained model: where it is and how it was made."""

    name: str
    file: str
    sha256: str
    kind: str  # "purifier" or "classifier"
    dataset: str
    architecture: str
    command: str
    metrics: dict[str, Any]
    hardware: str
    iterations: int
    license: str = "MIT"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return ZOO_FOLDER / "weights" / self.file

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_registry() -> dict[str, PretrainedEntry]:
    if not REGISTRY_FILE.is_file():
        return {}
    entries = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    return {entry["name"]: PretrainedEntry(**entry) for entry in entries}


def list_pretrained(kind: str | None = None) -> list[str]:
    """Names of the shipped models (optionally only ``purifier`` or ``classifier``)."""
    return [name for name, e in _read_registry().items() if kind is None or e.kind == kind]


def get_entry(name: str) -> PretrainedEntry:
    registry = _read_registry()
    if name not in registry:
        valid = ", ".join(registry) or "(none shipped in this build)"
        raise UsageError(f"unknown pretrained model {name!r}; valid: {valid}")
    return registry[name]


def pretrained_path(name: str, verify: bool = True) -> Path:
    """Path of a shipped checkpoint, after checking its sha256 against the registry."""
    entry = get_entry(name)
    if not entry.path.is_file():
        raise CheckpointError(f"{name}: weights file {entry.path} is missing from this install")
    if verify:
        digest = sha256_of(entry.path)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{name}: {entry.path} has sha256 {digest}, but the registry says {entry.sha256}; "
                "the file is corrupt or was replaced"
            )
    return entry.path


def resolve_weights(path_or_name: str | Path) -> str:
    """A checkpoint path for ``path_or_name``: an existing file as given, else a zoo name's file.

    Lets every command that takes a checkpoint path also take a shipped model's name
    (``--classifier resnet20-cifar10``, ``comdefend:comdefend-cifar10``); the zoo file's sha256
    is verified. Anything else is returned unchanged, so the caller's missing-file error applies.
    """
    text = str(path_or_name)
    if Path(text).exists():
        return text
    registry = _read_registry()
    if text in registry:
        return str(pretrained_path(text))
    return text


def load_pretrained(name: str, map_location: str = "cpu", verify: bool = True) -> nn.Module:
    """Load a shipped model by name (eval mode): a ComDefend purifier or a classifier."""
    path = pretrained_path(name, verify)
    kind = read_metadata(path).get("kind")
    if kind == "purifier":
        from comdefend.models.comdefend import ComDefend

        return ComDefend.from_checkpoint(path, map_location)
    if kind == "classifier":
        from comdefend.models.classifiers import load_classifier

        return load_classifier(path, map_location)
    raise CheckpointError(f"{name}: unexpected checkpoint kind {kind!r}")


#: The slice of the embedded sample on which every entry's ``sample_*`` metric is recorded.
SAMPLE_SLICE = slice(0, 1000, 2)


def measure_on_sample(name: str) -> dict[str, Any]:
    """Measure a shipped model on every other image of its dataset's embedded sample (500).

    Classifiers: top-1 ``sample_accuracy``. Purifiers: ``sample_psnr_db`` (8-bit PSNR of the
    mean MSE between images and their purification). The registry records these at
    registration so that a test can check that the shipped files still give them.
    """
    import torch

    from comdefend.data.datasets import load_dataset
    from comdefend.metrics import mean_psnr

    entry = get_entry(name)
    model = load_pretrained(name)
    sample = load_dataset(entry.dataset, "sample")
    indices = torch.arange(len(sample))[SAMPLE_SLICE]
    x = sample.float_images(indices)
    labels = sample.labels[indices]
    with torch.no_grad():
        if entry.kind == "classifier":
            predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(250)])
            return {
                "sample_accuracy": float((predictions == labels).double().mean()),
                "sample_images": len(labels),
            }
        purified = torch.cat([model.purify(chunk) for chunk in x.split(250)])
        return {"sample_psnr_db": mean_psnr(purified, x), "sample_images": len(labels)}


__all__ = [
    "PretrainedEntry",
    "get_entry",
    "list_pretrained",
    "load_pretrained",
    "measure_on_sample",
    "pretrained_path",
    "resolve_weights",
]
