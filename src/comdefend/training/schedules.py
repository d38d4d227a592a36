"""Learning-rate schedules, as pure functions of the iteration, in two registries.

:data:`SCHEDULES` holds ComDefend's (the residual study's ``constant``, ``piecewise`` and
``exponential``), :data:`CLASSIFIER_SCHEDULES` the classifier trainer's (``cosine``,
``onecycle``, ``constant``). A user adds one with ``SCHEDULES.add(name, Schedule(...))``.

Example:
    >>> learning_rate("piecewise", 0.01, 3000, 4000)
    0.0005
    >>> classifier_learning_rate("cosine", 0.1, 50, 100)
    0.05
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from comdefend.registry import Registry

PIECEWISE_BOUNDARIES = (0.25, 0.75, 0.90)
PIECEWISE_FACTORS = (1.0, 0.1, 0.05, 0.01)  # 0.01 / 0.001 / 0.0005 / 0.0001 at lr = 0.01
EXPONENTIAL_RATE = 0.96
EXPONENTIAL_STEP_FRACTION = 0.01
ONECYCLE_RISE = 0.3


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule.

    Attributes:
        name: registry name (``--lr-schedule NAME``).
        rate: ``rate(base_lr, iteration, total)``, the learning rate of 0-based ``iteration``.
        default_lr: the initial learning rate used when none is given (``None``: no default).
        description: one line for ``--help`` texts.
    """

    name: str
    rate: Callable[[float, int, int], float]
    default_lr: float | None = None
    description: str = ""


#: ComDefend training schedules (``comdefend train --lr-schedule``).
SCHEDULES: Registry[Schedule] = Registry("learning-rate schedule")
#: Classifier training schedules (``comdefend train-classifier --lr-schedule``).
CLASSIFIER_SCHEDULES: Registry[Schedule] = Registry("classifier learning-rate schedule")


def _constant(base_lr: float, iteration: int, total: int) -> float:
    return base_lr


def _piecewise(base_lr: float, iteration: int, total: int) -> float:
    stage = sum(iteration >= round(b * total) for b in PIECEWISE_BOUNDARIES)
    return base_lr * PIECEWISE_FACTORS[stage]


def _exponential(base_lr: float, iteration: int, total: int) -> float:
    step = max(1, round(EXPONENTIAL_STEP_FRACTION * total))
    return base_lr * EXPONENTIAL_RATE ** math.floor(iteration / step)


def _cosine(base_lr: float, iteration: int, total: int) -> float:
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, total)))


def _onecycle(base_lr: float, iteration: int, total: int) -> float:
    progress = iteration / max(1, total)
    if progress < ONECYCLE_RISE:
        start = base_lr / 25
        return start + (base_lr - start) * progress / ONECYCLE_RISE
    fall = (progress - ONECYCLE_RISE) / (1 - ONECYCLE_RISE)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * fall))


# Default initial learning rates: the paper's 1e-3, and the residual study's 1e-2 for the decays.
for _schedule in (
    Schedule("constant", _constant, 1e-3, "the paper's constant learning rate"),
    Schedule(
        "piecewise", _piecewise, 1e-2, "x1, 0.1, 0.05, 0.01 after 25%, 75%, 90% of the iterations"
    ),
    Schedule("exponential", _exponential, 1e-2, "x0.96 every 1% of the iterations (staircase)"),
):
    SCHEDULES.add(_schedule.name, _schedule)
for _schedule in (
    Schedule("cosine", _cosine, description="cosine decay to 0"),
    Schedule("onecycle", _onecycle, description="up from lr/25 for 30%, then cosine to 0"),
    Schedule("constant", _constant, description="constant"),
):
    CLASSIFIER_SCHEDULES.add(_schedule.name, _schedule)


def learning_rate(schedule: str, base_lr: float, iteration: int, total: int) -> float:
    """Learning rate of ComDefend schedule ``schedule`` for 0-based ``iteration`` of ``total``.

    ``piecewise``: ``base_lr`` times 1, 0.1, 0.05, 0.01 after 25%, 75%, 90% of ``total``.
    ``exponential``: ``base_lr * 0.96 ** floor(iteration / (1% of total))`` (staircase).
    """
    return SCHEDULES.get(schedule).rate(base_lr, iteration, total)


def classifier_learning_rate(
    schedule: str, base_lr: float, iteration: int, total: int, warmup: int = 0
) -> float:
    """Learning rate of 0-based ``iteration`` of ``total``; linear warm-up over ``warmup``."""
    rate = CLASSIFIER_SCHEDULES.get(schedule).rate
    if iteration < warmup:
        return base_lr * (iteration + 1) / warmup
    return rate(base_lr, iteration - warmup, max(1, total - warmup))
