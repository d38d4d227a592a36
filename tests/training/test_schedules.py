"""Learning-rate schedules: both families live in registries, users may add their own."""

from __future__ import annotations

import pytest

from comdefend.errors import UsageError
from comdefend.training import TrainConfig
from comdefend.training.schedules import (
    CLASSIFIER_SCHEDULES,
    SCHEDULES,
    Schedule,
    classifier_learning_rate,
    learning_rate,
)


def test_builtin_schedules_and_defaults() -> None:
    assert SCHEDULES.names() == ["constant", "piecewise", "exponential"]
    assert CLASSIFIER_SCHEDULES.names() == ["cosine", "onecycle", "constant"]
    assert learning_rate("PIECEWISE", 0.01, 3000, 4000) == pytest.approx(0.0005)
    assert learning_rate("exponential", 0.01, 200, 10_000) == pytest.approx(0.01 * 0.96**2)
    assert TrainConfig(dataset="cifar10", lr_schedule="Piecewise").lr == 1e-2
    with pytest.raises(UsageError, match="valid: constant, piecewise, exponential"):
        learning_rate("cosine", 0.1, 0, 10)
    with pytest.raises(UsageError, match="valid: cosine, onecycle, constant"):
        classifier_learning_rate("piecewise", 0.1, 0, 10)


def test_user_schedule_reaches_training_config() -> None:
    SCHEDULES.add("halving", Schedule("halving", lambda lr, i, total: lr / 2 ** (i // 10)))
    try:
        with pytest.raises(UsageError, match="no default; pass --lr"):
            TrainConfig(dataset="cifar10", lr_schedule="halving")
        config = TrainConfig(dataset="cifar10", lr_schedule="halving", lr=0.4)
        assert learning_rate(config.lr_schedule, config.lr, 25, 100) == pytest.approx(0.1)
    finally:
        SCHEDULES.remove("halving")
