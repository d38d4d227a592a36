"""Datasets, image files and training samplers."""

from comdefend.data.datasets import (
    DATASETS,
    ImageSet,
    class_balanced_indices,
    find_dataset,
    load_dataset,
)
from comdefend.data.images import collect_images, read_image, write_png

__all__ = [
    "DATASETS",
    "ImageSet",
    "class_balanced_indices",
    "collect_images",
    "find_dataset",
    "load_dataset",
    "read_image",
    "write_png",
]
