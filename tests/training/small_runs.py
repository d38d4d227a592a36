"""Settings of the tiny Fashion-MNIST trainings the training tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from comdefend.training import TrainConfig


def small_config(out: Path, iterations: int, **kwargs: Any) -> TrainConfig:
    """A few iterations of batch 8, evaluated every 10 and checkpointed every 2 (seed 5)."""
    base: dict[str, Any] = dict(
        dataset="fashion-mnist",
        out=str(out),
        iterations=iterations,
        batch_size=8,
        eval_every=10,
        eval_images=16,
        checkpoint_every=2,
        seed=5,
    )
    return TrainConfig(**{**base, **kwargs})
