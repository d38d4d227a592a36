"""The plan of a run: its (attack, eps) groups and, in each, how every (threat model, defense)
cell is computed, reused or skipped."""

from __future__ import annotations

from dataclasses import dataclass

from comdefend.defenses import Defense, Identity, make_threat_model_defense
from comdefend.errors import UsageError
from comdefend.evaluation.config import MIN_NORM, EvaluationConfig, is_min_norm
from comdefend.evaluation.crafting import comdefend_parts


def eps_plan(config: EvaluationConfig, attack: str) -> list[tuple[float | str, float | None]]:
    """``(eps label, eps in [0, 1] or None)`` of each group of ``attack``."""
    if is_min_norm(attack):
        return [(MIN_NORM, None)]
    return [(e, e / 255.0) for e in config.eps]


@dataclass(frozen=True)
class PlannedCell:
    """One (threat model, defense) cell of every (attack, eps) and how it is computed.

    Attributes:
        threat_model: the requested threat model.
        defense_index: position of the defense in the run's defenses; ``spec`` its name.
        effective: the threat model the adversarials are crafted under, or ``"skip"``.
        note: recorded in the cell (e.g. why a result is reused).
        reason: why the cell is skipped.
    """

    threat_model: str
    defense_index: int
    spec: str
    effective: str
    note: str | None
    reason: str | None


def _plan_cell(defense: Defense, tm: str) -> tuple[str, str | None, str | None]:
    """(effective threat model or ``"skip"``, note, reason for a skip)."""
    if isinstance(defense, Identity):
        if tm == "oblivious":
            return "oblivious", None, None
        return "oblivious", "no defense: every threat model equals oblivious (reused)", None
    if tm == "oblivious":
        return "oblivious", None, None
    if tm == "relaxed" and not comdefend_parts(defense):
        try:
            make_threat_model_defense(defense, tm)
        except UsageError as error:
            return "skip", None, str(error)
    if tm == "bpda+eot" and not defense.randomized:
        return "bpda", "defense not randomized: bpda+eot falls back to bpda (reused)", None
    if bool(getattr(defense, "differentiable", False)) and tm == "bpda":
        return tm, "defense differentiable: the attacker uses exact gradients", None
    return tm, None, None


def plan_cells(config: EvaluationConfig, defenses: list[Defense]) -> list[PlannedCell]:
    """The cells of one (attack, eps), threat model by threat model, defense by defense."""
    plan = []
    for tm in config.threat_models:
        for index, (spec, defense) in enumerate(zip(config.defenses, defenses, strict=True)):
            effective, note, reason = _plan_cell(defense, tm)
            plan.append(PlannedCell(tm, index, spec, effective, note, reason))
    return plan
