"""Learning-rate schedules of the seed study, as pure functions of the iteration."""

from __future__ import annotations

import math

from comdefend.errors import UsageError

SCHEDULES = ("constant", "piecewise", "exponential")
# Default initial learning rate per schedule: the paper's 1e-3, and the seed's 1e-2 for decays.
DEFAULT_LR = {"constant": 1e-3, "piecewise": 1e-2, "exponential": 1e-2}
PIECEWISE_BOUNDARIES = (0.25, 0.75, 0.90)
PIECEWISE_FACTORS = (1.0, 0.1, 0.05, 0.01)  # 0.01 / 0.001 / 0.0005 / 0.0001 at lr = 0.01
EXPONENTIAL_RATE = 0.96
EXPONENTIAL_STEP_FRACTION = 0.01


def learning_rate(schedule: str, base_lr: float, iteration: int, total: int) -> float:
    """Learning rate for 0-based ``iteration`` of ``total``.

    ``piecewise``: ``base_lr`` times 1, 0.1, 0.05, 0.01 after 25%, 75%, 90% of ``total``.
    ``exponential``: ``base_lr * 0.96 ** floor(iteration / (1% of total))`` (staircase).
    """
    if schedule == "constant":
        return base_lr
    if schedule == "piecewise":
        stage = sum(iteration >= round(b * total) for b in PIECEWISE_BOUNDARIES)
        return base_lr * PIECEWISE_FACTORS[stage]
    if schedule == "exponential":
        step = max(1, round(EXPONENTIAL_STEP_FRACTION * total))
        return base_lr * EXPONENTIAL_RATE ** math.floor(iteration / step)
    raise UsageError(f"unknown learning-rate schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
