"""Deterministic training batches: batch ``i`` depends only on (seed, i).

This is what makes ``--resume`` exact without saving any random-number state: a resumed run asks
for the same batches and the same noise as an uninterrupted one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from comdefend.data.datasets import ImageSet
from comdefend.data.images import IMAGE_SUFFIXES, read_image
from comdefend.errors import DatasetNotFoundError, UsageError


def iteration_generator(seed: int, iteration: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, iteration, stream), independent across iterations."""
    mixed = random.Random(f"{seed}/{iteration}/{stream}").getrandbits(63)
    return torch.Generator().manual_seed(mixed)


class EpochBatches:
    """Shuffled epochs over an in-memory :class:`ImageSet`; the last partial batch is dropped.

    With ``crop`` smaller than the images, each image of a batch is a random ``crop`` x
    ``crop`` window of it (positions drawn from (seed, iteration)): a fully convolutional model
    trains on smaller inputs, each iteration costing less.
    """

    def __init__(
        self, images: ImageSet, batch_size: int, seed: int, crop: int | None = None
    ) -> None:
        if batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {batch_size}")
        if len(images) < batch_size:
            raise UsageError(f"dataset has {len(images)} images, fewer than one batch")
        self.images = images
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = len(images) // batch_size
        height, width = images.images.shape[-2:]
        self.crop = crop if crop is not None and crop < min(height, width) else None
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def __call__(self, iteration: int) -> torch.Tensor:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = iteration_generator(self.seed, epoch, stream=1)
            self._order = torch.randperm(len(self.images), generator=generator)
            self._epoch = epoch
        index = self._order[step * self.batch_size : (step + 1) * self.batch_size]
        batch = self.images.float_images(index)
        if self.crop is None:
            return batch
        generator = iteration_generator(self.seed, iteration, stream=3)
        size, (height, width) = self.crop, batch.shape[-2:]
        tops = torch.randint(height - size + 1, (len(batch),), generator=generator).tolist()
        lefts = torch.randint(width - size + 1, (len(batch),), generator=generator).tolist()
        return torch.stack(
            [
                image[:, t : t + size, s : s + size]
                for image, t, s in zip(batch, tops, lefts, strict=True)
            ]
        )


class FolderPatches:
    """Random ``patch`` x ``patch`` crops of the images under a folder (searched recursively).

    Images are decoded once and kept in memory as uint8; each batch draws images and crop
    positions from a generator seeded by (seed, iteration).
    """

    def __init__(self, folder: str | os.PathLike, batch_size: int, patch: int, seed: int) -> None:
        root = Path(folder)
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetNotFoundError(f"no images found under {root}")
        self.images = []
        for file in files:
            image = read_image(file, channels=3)
            if image.shape[1] >= patch and image.shape[2] >= patch:
                self.images.append((image * 255).round().to(torch.uint8))
        if not self.images:
            raise UsageError(f"no image under {root} is at least {patch}x{patch}")
        self.batch_size, self.patch, self.seed = batch_size, patch, seed
        self.steps_per_epoch = max(1, len(self.images) // batch_size)

    def __call__(self, iteration: int) -> torch.Tensor:
        generator = iteration_generator(self.seed, iteration, stream=1)
        picks = torch.randint(len(self.images), (self.batch_size,), generator=generator).tolist()
        crops = []
        for pick in picks:
            image = self.images[pick]
            top = int(torch.randint(image.shape[1] - self.patch + 1, (1,), generator=generator))
            left = int(torch.randint(image.shape[2] - self.patch + 1, (1,), generator=generator))
            crops.append(image[:, top : top + self.patch, left : left + self.patch])
        return torch.stack(crops).float().div_(255)
