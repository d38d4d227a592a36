"""Worst case over attacks: an image counts as robust only if it resists every attack."""

from __future__ import annotations

from typing import Any

import torch

from comdefend.evaluation.results import CellResult, WorstCaseResult
from comdefend.evaluation.scoring import accuracy_stats


def worst_case(
    defenses: list[str],
    cells: list[CellResult],
    correctness: dict[tuple[Any, ...], torch.Tensor],
) -> list[WorstCaseResult]:
    """Per (defense, threat model, eps): the accuracy of the per-image conjunction over attacks.

    Args:
        defenses: the run's defense specs (their positions key ``correctness``).
        cells: the run's cells, in order.
        correctness: ``(attack, eps, defense index, threat model)`` -> ``(draws, n)`` bool.

    L-inf eps and ``min-norm`` are separate groups; skipped cells are left out. Randomized
    defenses: the conjunction is taken per evaluation draw (same noise for every attack), then
    averaged over draws.
    """
    groups: dict[tuple[str, str, Any], list[tuple[str, torch.Tensor]]] = {}
    for cell in cells:
        key = (cell.attack, cell.eps, defenses.index(cell.defense))
        correct = correctness.get((*key, cell.threat_model))
        if correct is None:
            continue
        group = (cell.defense, cell.threat_model, cell.eps)
        groups.setdefault(group, []).append((cell.attack, correct))
    rows = []
    for (defense, tm, eps), members in groups.items():
        combined = members[0][1].clone()
        for _, correct in members[1:]:
            combined &= correct
        accuracy, std = accuracy_stats(combined)
        rows.append(
            WorstCaseResult(
                defense=defense,
                threat_model=tm,
                eps=eps,
                attacks=[name for name, _ in members],
                worst_case_robust_accuracy=accuracy,
                worst_case_robust_accuracy_std=std,
                n=int(combined.shape[1]),
            )
        )
    return rows
