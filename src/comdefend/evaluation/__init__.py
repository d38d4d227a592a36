"""Adversarial-robustness evaluation: :func:`evaluate` a classifier (yours or a shipped one)
behind defenses, under attacks and threat models, into a typed :class:`EvaluationResult`.

Example:
    >>> from comdefend.evaluation import evaluate
    >>> result = evaluate("fashion-cnn", "fashion-mnist", split="sample",
    ...                   defenses=["none", "jpeg:75"], attacks=["fgsm"], eps=[8],
    ...                   n=8, progress=False)
    >>> [cell.defense for cell in result.cells]
    ['none', 'jpeg:75']
    >>> result.dataset.n, 0.0 <= result.cell("fgsm", 8, "jpeg:75").robust_accuracy <= 1.0
    (8, True)

The modules: :mod:`~comdefend.evaluation.api` (:func:`evaluate`),
:mod:`~comdefend.evaluation.harness` (the engine, :class:`EvaluationConfig` in),
:mod:`~comdefend.evaluation.results` (the typed result and ``results.json``),
:mod:`~comdefend.evaluation.inputs` (the classifier and defenses resolved),
:mod:`~comdefend.evaluation.report` (the report files).
"""

from comdefend.evaluation.api import evaluate
from comdefend.evaluation.config import EvaluationConfig
from comdefend.evaluation.results import (
    CellResult,
    ClassifierInfo,
    CleanResult,
    DatasetInfo,
    DefenseInfo,
    EvaluationResult,
    Provenance,
    WorstCaseResult,
)

__all__ = [
    "CellResult",
    "ClassifierInfo",
    "CleanResult",
    "DatasetInfo",
    "DefenseInfo",
    "EvaluationConfig",
    "EvaluationResult",
    "Provenance",
    "WorstCaseResult",
    "evaluate",
]
