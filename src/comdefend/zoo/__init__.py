"""Pretrained weights shipped inside the package (timm/CompressAI-style registry).

``registry.json`` beside this file lists every entry: file, sha256, kind (purifier or
classifier), dataset, architecture, the exact training command, the metrics measured after
training, the hardware it was trained on, and its license. Loading verifies the sha256.

An entry with a ``source`` is not shipped: its weights come from another package (installed
through an extra) and are converted to safetensors in the user cache folder on first use, with
the sha256 of the original and of the converted file both checked (:mod:`comdefend.zoo.external`).

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
from comdefend.zoo.external import ExternalSource, cache_folder, convert_classifier, source_file

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
    source: ExternalSource | None = None  # set: converted from another package on first use
    input_size: int | None = None  # the image size the model was trained and is evaluated at
    mean: tuple[float, ...] | None = None  # normalization inside the model (classifiers)
    std: tuple[float, ...] | None = None

    @property
    def path(self) -> Path:
        """The checkpoint: in the package, or (``source`` entries) in the user cache folder."""
        if self.source is not None:
            return cache_folder() / "zoo" / self.file
        return ZOO_FOLDER / "weights" / self.file

    @property
    def installed(self) -> bool:
        """False for a ``source`` entry whose package is missing (the shipped ones: True)."""
        return self.source is None or source_file(self.source) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _entry_from_dict(data: dict[str, Any]) -> PretrainedEntry:
    values = dict(data)
    if values.get("source") is not None:
        values["source"] = ExternalSource(**values["source"])
    for key in ("mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    return PretrainedEntry(**values)


def _read_registry() -> dict[str, PretrainedEntry]:
    if not REGISTRY_FILE.is_file():
        return {}
    entries = json.loads(REGISTRY_FILE.read_text(encoding="utf-8"))
    return {entry["name"]: _entry_from_dict(entry) for entry in entries}


def list_pretrained(kind: str | None = None) -> list[str]:
    """Names of the shipped models (optionally only ``purifier`` or ``classifier``)."""
    return [name for name, e in _read_registry().items() if kind is None or e.kind == kind]


def get_entry(name: str) -> PretrainedEntry:
    registry = _read_registry()
    if name not in registry:
        valid = ", ".join(registry) or "(none shipped in this build)"
        raise UsageError(f"unknown pretrained model {name!r}; valid: {valid}")
    return registry[name]


def _converted_path(entry: PretrainedEntry) -> Path:
    """The cached conversion of a ``source`` entry, made (or remade) when missing or stale."""
    assert entry.source is not None
    path = entry.path
    if path.is_file() and sha256_of(path) == entry.sha256:
        return path
    if entry.kind != "classifier" or entry.mean is None or entry.std is None:
        raise CheckpointError(f"{entry.name}: only classifiers with mean and std are converted")
    # A missing, partial or stale cache file is remade; the cache is ours to overwrite.
    convert_classifier(
        entry.name,
        entry.source,
        entry.architecture,
        entry.dataset,
        int(entry.extra.get("num_classes", 1000)),
        entry.mean,
        entry.std,
        path,
    )
    digest = sha256_of(path)
    if digest != entry.sha256:
        import safetensors
        import torch

        raise CheckpointError(
            f"{entry.name}: converting {entry.source.package} gave {path} with sha256 {digest}, "
            f"but the zoo records {entry.sha256} (torch {torch.__version__}, safetensors "
            f"{safetensors.__version__} wrote it; the original file's sha256 was correct)"
        )
    return path


def pretrained_path(name: str, verify: bool = True) -> Path:
    """Path of a zoo checkpoint, after checking its sha256 against the registry.

    For an entry converted from another package, the first call converts it into the user
    cache folder (both sha256s checked); a missing package is a :class:`UsageError` that says
    how to install it.
    """
    entry = get_entry(name)
    if entry.source is not None:
        return _converted_path(entry)
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
    "ExternalSource",
    "PretrainedEntry",
    "get_entry",
    "list_pretrained",
    "load_pretrained",
    "measure_on_sample",
    "pretrained_path",
    "resolve_weights",
]
