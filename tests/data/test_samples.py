"""The embedded samples: balanced, and exactly the test images their provenance names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from comdefend.data import load_dataset
from comdefend.data.datasets import class_balanced_indices
from comdefend.errors import DatasetNotFoundError


@pytest.mark.parametrize(
    "dataset,shape", [("fashion-mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))]
)
def test_sample_is_balanced_and_documented(dataset: str, shape: tuple[int, ...]) -> None:
    sample = load_dataset(dataset, "sample")
    assert sample.images.shape == (1000, *shape) and sample.images.dtype == torch.uint8
    assert torch.bincount(sample.labels).tolist() == [100] * 10
    assert sample.provenance["split"] == "test" and sample.provenance["per_class"] == 100
    assert len(sample.classes) == 10


def test_sample_matches_fashion_test_set(fashion_dir: Path) -> None:
    _check_against_test_set("fashion-mnist", None)


def test_sample_matches_cifar_test_set(cifar_dir: Path) -> None:
    _check_against_test_set("cifar10", cifar_dir.parent)


def _check_against_test_set(dataset: str, data_dir: Path | None) -> None:
    sample = load_dataset(dataset, "sample")
    test = load_dataset(dataset, "test", data_dir)
    assert torch.equal(sample.indices, class_balanced_indices(test.labels, 100, seed=0))
    assert torch.equal(sample.images, test.images[sample.indices])
    assert torch.equal(sample.labels, test.labels[sample.indices])


def test_no_sample_for_cifar100() -> None:
    with pytest.raises(DatasetNotFoundError, match="samples exist for"):
        load_dataset("cifar100", "sample")
