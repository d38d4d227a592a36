"""Training: one engine (:mod:`.engine`) with a task per kind of model (ComDefend purifiers in
:mod:`.trainer`, classifiers in :mod:`.classifier`), named recipes (:mod:`.recipes`),
stabilizers (:mod:`.stabilizers`), schedules and resumable run folders."""

from comdefend.training.engine import (
    TrainingDivergedError,
    TrainingInterrupted,
    TrainingTask,
    run_training,
)
from comdefend.training.recipes import RECIPES, Recipe, resolve_config
from comdefend.training.schedules import SCHEDULES, learning_rate
from comdefend.training.stabilizers import STABILIZERS, Stabilization
from comdefend.training.trainer import (
    PurifierTask,
    TrainConfig,
    evaluate_reconstruction,
    train,
)

__all__ = [
    "RECIPES",
    "SCHEDULES",
    "STABILIZERS",
    "PurifierTask",
    "Recipe",
    "Stabilization",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "TrainingTask",
    "evaluate_reconstruction",
    "learning_rate",
    "resolve_config",
    "run_training",
    "train",
]
