"""Training loops, schedules and resumable run folders."""

from comdefend.training.schedules import SCHEDULES, learning_rate
from comdefend.training.trainer import TrainConfig, evaluate_reconstruction, train

__all__ = ["SCHEDULES", "TrainConfig", "evaluate_reconstruction", "learning_rate", "train"]
