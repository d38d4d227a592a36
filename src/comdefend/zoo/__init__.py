"""Pretrained weights shipped inside the package (timm/CompressAI-style registry).

``registry.json`` beside this file lists every entry: file, sha256, kind (purifier or
classifier), dataset, architecture, the exact training command, the metrics measured after
training, the hardware it was trained on, its license, and its model card (what it is for and
its measured clean and robust accuracy with their conditions: :mod:`comdefend.zoo.cards`).
Loading verifies the sha256. The file is versioned (``{"format": "comdefend-zoo/2", "entries":
[...]}``); a bare list of entries (format 1) is still read. ``comdefend zoo register`` adds an
entry (:mod:`comdefend.zoo.registration`), ``comdefend zoo card`` attaches measurements.

An entry with a ``source`` is not shipped: its weights come from another package (installed
through an extra) and are converted to safetensors in the user cache folder on first use, with
the sha256 of the original and of the converted file both checked (:mod:`comdefend.zoo.external`).

Example:
    >>> from comdefend.zoo import list_pretrained, load_pretrained
    >>> names = list_pretrained()
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from torch import nn

from comdefend.checkpoint import read_metadata, sha256_of
from comdefend.errors import CheckpointError, UsageError
from comdefend.zoo.cards import Measurement, ModelCard
from comdefend.zoo.external import ExternalSource, cache_folder, convert_classifier, source_file

ZOO_FOLDER = Path(str(resources.files("comdefend.zoo")))
REGISTRY_FILE = ZOO_FOLDER / "registry.json"
#: ``registry.json``'s ``format``; format 1 was a bare list of entries.
REGISTRY_FORMAT = "comdefend-zoo/2"


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
    card: ModelCard = field(default_factory=ModelCard)  # what it is for, what it measured
    # the folder of the registry it was read from (its weights/ lie there); not serialized
    folder: Path | None = field(default=None, compare=False, repr=False)

    @property
    def path(self) -> Path:
        """The checkpoint: in the registry's ``weights/`` folder (the package's for shipped
        entries), or (``source`` entries) in the user cache folder."""
        if self.source is not None:
            return cache_folder() / "zoo" / self.file
        return (self.folder or ZOO_FOLDER) / "weights" / self.file

    @property
    def installed(self) -> bool:
        """False for a ``source`` entry whose package is missing (the shipped ones: True)."""
        return self.source is None or source_file(self.source) is not None

    def to_dict(self) -> dict[str, Any]:
        """The entry as ``registry.json`` holds it."""
        values = asdict(self)
        values.pop("folder")
        values["card"] = self.card.to_dict()
        return values


def _entry_from_dict(data: dict[str, Any], folder: Path | None = None) -> PretrainedEntry:
    values = dict(data)
    if values.get("source") is not None:
        values["source"] = ExternalSource(**values["source"])
    for key in ("mean", "std"):
        if values.get(key) is not None:
            values[key] = tuple(values[key])
    values["card"] = ModelCard.from_dict(values.get("card"))
    return PretrainedEntry(**values, folder=folder)


def registry_file(registry: str | os.PathLike | None = None) -> Path:
    """The registry to read or write: ``registry`` (a ``.json`` file, or a folder holding
    ``registry.json``), else the package's own."""
    if registry is None:
        return REGISTRY_FILE
    path = Path(registry).expanduser()
    return path if path.suffix == ".json" and not path.is_dir() else path / "registry.json"


def read_registry_entries(registry: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The raw entries of a registry file, of either format (``[]`` when it does not exist).

    Raises:
        CheckpointError: unreadable, or not a registry (the message says why).
    """
    path = registry_file(registry)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read the zoo registry {path}: {error}") from None
    entries: Any
    if isinstance(data, list):  # format 1
        entries = data
    elif isinstance(data, dict) and data.get("format") == REGISTRY_FORMAT:
        entries = data.get("entries")
    else:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a zoo registry this comdefend reads (format {found!r}; reads "
            f"{REGISTRY_FORMAT} and a bare list of entries)"
        )
    if not isinstance(entries, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
    ):
        raise CheckpointError(f"{path}: every registry entry must be an object with a name")
    return entries


def _read_registry(registry: str | os.PathLike | None = None) -> dict[str, PretrainedEntry]:
    path = registry_file(registry)
    folder = path.parent
    found = {}
    for data in read_registry_entries(path):
        try:
            found[data["name"]] = _entry_from_dict(data, folder)
        except TypeError as error:  # an unknown or missing field
            raise CheckpointError(f"{path}: entry {data['name']!r}: {error}") from None
    return found


def list_pretrained(
    kind: str | None = None, registry: str | os.PathLike | None = None
) -> list[str]:
    """Names of the shipped models (optionally only ``purifier`` or ``classifier``).

    ``registry`` reads another registry file (``comdefend zoo ... --registry``)."""
    entries = _read_registry(registry).items()
    return [name for name, e in entries if kind is None or e.kind == kind]


def get_entry(name: str, registry: str | os.PathLike | None = None) -> PretrainedEntry:
    """The entry called ``name`` (``zoo:NAME`` also works).

    Raises:
        UsageError: no such entry (the message lists the valid names).
    """
    bare = name[len(ZOO_PREFIX) :] if name.startswith(ZOO_PREFIX) else name
    entries = _read_registry(registry)
    if bare not in entries:
        valid = ", ".join(entries) or "(none shipped in this build)"
        raise UsageError(f"unknown pretrained model {bare!r}; valid: {valid}")
    return entries[bare]


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


def pretrained_path(
    name: str, verify: bool = True, registry: str | os.PathLike | None = None
) -> Path:
    """Path of a zoo checkpoint, after checking its sha256 against the registry.

    For an entry converted from another package, the first call converts it into the user
    cache folder (both sha256s checked); a missing package is a :class:`UsageError` that says
    how to install it.
    """
    entry = get_entry(name, registry)
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


#: Prefix that names a shipped model explicitly: ``zoo:comdefend-cifar10``.
ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class WeightsRef:
    """A model reference resolved once: what the user wrote, and the file it names.

    Loaders (:meth:`ComDefend.from_checkpoint <comdefend.models.comdefend.ComDefend.
    from_checkpoint>`, :func:`~comdefend.models.classifiers.load_classifier`) accept it and set
    it as ``model.weights``; :meth:`to_dict` is what results and summaries record.

    Attributes:
        source: the reference as the user wrote it (``zoo:fashion-cnn``, ``runs/a/m.safetensors``).
        kind: ``zoo`` (a shipped model) or ``file``.
        path: the resolved absolute path of the checkpoint file.
        sha256: hex sha256 of that file (for ``zoo``, checked against the zoo registry).
        zoo_name: the shipped model's name when ``kind`` is ``zoo``.
    """

    source: str
    kind: Literal["zoo", "file"]
    path: Path
    sha256: str
    zoo_name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``path`` as a string, a shipped model's relative to the
        installed package (``comdefend/zoo/weights/NAME.safetensors``: where the package
        lives is a detail of the machine, not of the model)."""
        return {
            "source": self.source,
            "kind": self.kind,
            "path": self.recorded_path,
            "sha256": self.sha256,
            "zoo_name": self.zoo_name,
        }

    @property
    def recorded_path(self) -> str:
        """The path results record: a file's absolute path, a shipped model's in the package.

        Example:
            >>> resolve_weights("fashion-cnn").recorded_path
            'comdefend/zoo/weights/fashion-cnn.safetensors'
        """
        if self.kind == "zoo" and self.path.is_relative_to(ZOO_FOLDER):
            return (Path("comdefend/zoo") / self.path.relative_to(ZOO_FOLDER)).as_posix()
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.source


def _zoo_ref(source: str, name: str) -> WeightsRef:
    entry = get_entry(name)
    return WeightsRef(source, "zoo", pretrained_path(name).resolve(), entry.sha256, entry.name)


def _file_ref(source: str, path: Path) -> WeightsRef:
    if path.is_dir():
        raise CheckpointError(f"{source} is a folder, not a checkpoint file")
    return WeightsRef(source, "file", path.resolve(), sha256_of(path))


def resolve_weights(reference: str | os.PathLike | WeightsRef) -> WeightsRef:
    """Resolve a checkpoint reference once: a file path or the name of a shipped model.

    ``zoo:NAME`` names a shipped model explicitly; a :class:`~pathlib.Path` is always a file;
    a plain string is a file when one exists there, else a zoo name. A bare name that is both
    (a local file or folder called like a shipped model) is refused with a message saying how
    to pick (``zoo:NAME`` or ``./NAME``). A :class:`WeightsRef` is returned as is.

    Args:
        reference: what the user wrote (``--classifier``, ``comdefend:...``, ``--model``).

    Returns:
        The :class:`WeightsRef` (zoo files have their sha256 verified against the registry).

    Raises:
        CheckpointError: nothing found, a folder, or a zoo file that is missing or corrupt.
        UsageError: an unknown ``zoo:`` name, or an ambiguous bare name.

    Example:
        >>> ref = resolve_weights("zoo:fashion-cnn")  # doctest: +SKIP
        >>> ref.kind, ref.zoo_name, ref.path.name  # doctest: +SKIP
        ('zoo', 'fashion-cnn', 'fashion-cnn.safetensors')
    """
    if isinstance(reference, WeightsRef):
        return reference
    if not isinstance(reference, str):
        path = Path(reference)
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        return _file_ref(str(reference), path)
    text = reference.strip()
    if not text:
        raise UsageError("empty checkpoint reference: give a file path or zoo:NAME")
    if text.startswith(ZOO_PREFIX):
        return _zoo_ref(text, text[len(ZOO_PREFIX) :].strip())
    local = Path(text).expanduser()
    shipped = _read_registry()
    if local.exists():
        if text in shipped:
            what = "folder" if local.is_dir() else "file"
            raise UsageError(
                f"{text!r} is both a local {what} ({local.resolve()}) and a shipped model; "
                f"write zoo:{text} for the shipped model or ./{text} for the local {what}"
            )
        return _file_ref(text, local)
    if text in shipped:
        return _zoo_ref(text, text)
    hint = ""
    if "/" not in text and not local.suffix:
        hint = f" and no shipped model is called that (shipped: {', '.join(shipped) or 'none'})"
    raise CheckpointError(f"checkpoint not found: {text}{hint}")


def weights_file(reference: str | os.PathLike | WeightsRef) -> tuple[WeightsRef, Path]:
    """Resolve ``reference`` (once, if it is not a :class:`WeightsRef` yet) and return it with
    the file to read, after checking that the file still has the recorded sha256."""
    ref = resolve_weights(reference)
    if sha256_of(ref.path) != ref.sha256:
        raise CheckpointError(
            f"{ref.source}: {ref.path} changed since it was resolved (sha256 {ref.sha256[:12]}...)"
        )
    return ref, ref.path


def load_pretrained(name: str, map_location: str = "cpu", verify: bool = True) -> nn.Module:
    """Load a shipped model by name (eval mode): a ComDefend purifier or a classifier.

    ``verify=False`` skips the sha256 check against the registry (the hash is still recorded
    in ``model.weights``).
    """
    bare = name[len(ZOO_PREFIX) :] if name.startswith(ZOO_PREFIX) else name
    if verify:
        ref = _zoo_ref(f"{ZOO_PREFIX}{bare}", bare)
    else:
        path = pretrained_path(bare, verify=False)
        ref = WeightsRef(f"{ZOO_PREFIX}{bare}", "zoo", path.resolve(), sha256_of(path), bare)
    kind = read_metadata(ref.path).get("kind")
    if kind == "purifier":
        from comdefend.models.comdefend import ComDefend

        return ComDefend.from_checkpoint(ref, map_location)
    if kind == "classifier":
        from comdefend.models.classifiers import load_classifier

        return load_classifier(ref, map_location)
    raise CheckpointError(f"{name}: unexpected checkpoint kind {kind!r}")


def _load_file(path: Path, name: str) -> nn.Module:
    kind = read_metadata(path).get("kind")
    if kind == "purifier":
        from comdefend.models.comdefend import ComDefend

        return ComDefend.from_checkpoint(path)
    if kind == "classifier":
        from comdefend.models.classifiers import load_classifier

        return load_classifier(path)
    raise CheckpointError(f"{name}: unexpected checkpoint kind {kind!r}")


#: The slice of the embedded sample on which every entry's ``sample_*`` metric is recorded.
SAMPLE_SLICE = slice(0, 1000, 2)


def measure_on_sample(
    name: str | PretrainedEntry,
    registry: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Measure a zoo model on every other image of its dataset's embedded sample (500).

    Classifiers: top-1 ``sample_accuracy``. Purifiers: ``sample_psnr_db`` (8-bit PSNR of the
    mean MSE between images and their purification). The registry records these at
    registration so that a test can check that the shipped files still give them.

    Args:
        name: the entry's name, or the entry itself (its file is read, sha256 unchecked).
        registry: the registry ``name`` is looked up in (default: the package's).
        path: read this checkpoint instead of the entry's file (registration measures the
            weights before it copies them).
    """
    import torch

    from comdefend.data.datasets import load_dataset
    from comdefend.metrics import mean_psnr
    from comdefend.models.comdefend import ComDefend

    if isinstance(name, PretrainedEntry) or path is not None:
        entry = name if isinstance(name, PretrainedEntry) else get_entry(name, registry)
        model = _load_file(Path(path) if path is not None else entry.path, entry.name)
    else:
        entry = get_entry(name, registry)
        model = (
            load_pretrained(name)
            if registry is None
            else _load_file(pretrained_path(name, registry=registry), name)
        )
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
        assert isinstance(model, ComDefend)  # every zoo entry that is not a classifier
        purified = torch.cat([model.purify(chunk) for chunk in x.split(250)])
        return {"sample_psnr_db": mean_psnr(purified, x), "sample_images": len(labels)}


__all__ = [
    "REGISTRY_FORMAT",
    "ExternalSource",
    "Measurement",
    "ModelCard",
    "ZOO_PREFIX",
    "PretrainedEntry",
    "WeightsRef",
    "get_entry",
    "list_pretrained",
    "load_pretrained",
    "measure_on_sample",
    "pretrained_path",
    "read_registry_entries",
    "registry_file",
    "resolve_weights",
    "weights_file",
]
