"""Seeds of an evaluation: every random choice is seeded per batch, so results do not depend on
which process evaluates which batch (see :mod:`comdefend.evaluation.distributed`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def derive_seed(seed: int, *key: object) -> int:
    """A seed in [0, 2**31) determined by ``seed`` and ``key`` (stable across runs).

    Example:
        >>> derive_seed(0, "attack", "pgd") == derive_seed(0, "attack", "pgd")
        True
    """
    text = "|".join([str(seed), *map(str, key)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (2**31)


def batch_seed(seed: int, key: tuple[object, ...], batch: int) -> int:
    """The seed of batch ``batch`` of a computation named ``key``.

    Batch 0 keeps the seed the whole computation had before seeds were per batch (so a run
    with one batch gives the numbers of earlier versions).
    """
    return derive_seed(seed, *key) if batch == 0 else derive_seed(seed, *key, "batch", batch)


@dataclass(frozen=True)
class Batches:
    """The evaluated images cut into numbered batches of ``size`` (the last may be shorter).

    Example:
        >>> Batches(7, 3).slice(2), Batches(7, 3).count
        (slice(6, 7, None), 3)
    """

    n: int
    size: int

    @property
    def count(self) -> int:
        return (self.n + self.size - 1) // self.size

    def slice(self, batch: int) -> slice:
        return slice(batch * self.size, min((batch + 1) * self.size, self.n))

    def indices(self, batches: list[int]) -> torch.Tensor:
        """Positions of the images of ``batches`` (in that order)."""
        if not batches:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(self.n)[self.slice(b)] for b in batches])
