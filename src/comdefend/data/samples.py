"""The evaluation samples embedded in the package: 1,000 class-balanced test images per dataset.

They let the demo and the tests run on a machine without any dataset. Each file records its
provenance (dataset, split, the test-set indices, how they were drawn) in its metadata; they are
made by ``scripts/make_samples.py``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from safetensors import safe_open

from comdefend.errors import DatasetNotFoundError

SAMPLE_FOLDER = Path(__file__).with_name("samples")


def sample_path(dataset: str) -> Path:
    return Path(
        str(resources.files("comdefend.data") / "samples" / f"{dataset}-sample.safetensors")
    )


def load_sample(dataset: str):  # -> ImageSet (imported lazily: datasets imports this module)
    """The embedded sample of ``dataset`` as an :class:`~comdefend.data.datasets.ImageSet`."""
    from comdefend.data.datasets import DATASETS, ImageSet

    with_sample = [name for name, spec in DATASETS.items() if "sample" in spec.splits]
    path = sample_path(dataset)
    if dataset not in with_sample or not path.is_file():
        raise DatasetNotFoundError(
            f"no embedded sample for {dataset!r}; samples exist for {', '.join(with_sample)}"
        )
    with safe_open(str(path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["comdefend"])
        images = handle.get_tensor("images")
        labels = handle.get_tensor("labels")
        indices = handle.get_tensor("indices")
    classes = metadata.get("classes") or DATASETS[dataset].class_names
    sample = ImageSet(
        dataset, "sample", images, labels, list(classes), f"embedded:{path.name}", indices
    )
    sample.provenance = metadata  # type: ignore[attr-defined]
    return sample
