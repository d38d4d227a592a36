"""Per-image results of an evaluation, as typed records that merge across processes.

Every number in a report is an average over images, so each process of a run keeps the
per-image values of the images it evaluated (with their positions in the evaluated set) and the
report is computed once, from the merged records, by the same functions whatever the number of
processes. Records travel between processes as safetensors bytes (tensors) plus JSON metadata:
nothing is pickled.

Example:
    >>> import torch
    >>> a = DefenseScores(torch.tensor([2, 3]), torch.ones(1, 2, dtype=torch.bool),
    ...                   torch.zeros(1, 2, dtype=torch.float64))
    >>> b = DefenseScores(torch.tensor([0, 1]), torch.zeros(1, 2, dtype=torch.bool),
    ...                   torch.zeros(1, 2, dtype=torch.float64))
    >>> DefenseScores.merge([a, b]).correct.tolist()
    [[False, False, True, True]]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as _save_tensors

from comdefend.errors import CheckpointError


def header_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of safetensors bytes (raises on bytes that are not safetensors).

    Example:
        >>> header_metadata(save_tensors({"a": torch.zeros(1)}, {"what": "example"}))
        {'what': 'example'}
    """
    header_size = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_size])["__metadata__"]
    if not isinstance(metadata, dict):
        raise ValueError("no metadata")
    return {str(k): str(v) for k, v in metadata.items()}


def save_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``tensors``, each packed dense and row-major on the CPU first.

    safetensors refuses strided views, and tensors reach the records in whatever layout their
    inputs had (``clone()`` keeps it): ImageNet images once arrived as a transposed HWC view,
    and saving a progress record crashed.
    """
    packed = {
        name: tensor.detach().to("cpu").contiguous(memory_format=torch.contiguous_format)
        for name, tensor in tensors.items()
    }
    return _save_tensors(packed, metadata)


def _order(indices: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(indices, stable=True)
    if indices.numel() > 1 and bool((indices[order][1:] == indices[order][:-1]).any()):
        raise ValueError("records to merge cover some images twice")
    return order


SCORE_TENSORS = ("indices", "correct", "mse")  # a DefenseScores' tensors, in field order


@dataclass(frozen=True)
class DefenseScores:
    """Outcome of ``classifier(defense(images))`` on some of the evaluated images.

    Attributes:
        indices: ``(n,)`` int64 positions of the images in the evaluated set.
        correct: ``(draws, n)`` bool, the classifier's answer is the label (one row per
            evaluation draw of a randomized defense, else one row).
        mse: ``(draws, n)`` float64, MSE of the 8-bit quantized purified image against the
            8-bit quantized clean image.
    """

    indices: torch.Tensor
    correct: torch.Tensor
    mse: torch.Tensor

    @staticmethod
    def merge(parts: Sequence[DefenseScores]) -> DefenseScores:
        """One record over the union of ``parts``' images, in image order."""
        indices = torch.cat([p.indices for p in parts])
        order = _order(indices)
        return DefenseScores(
            indices[order],
            torch.cat([p.correct for p in parts], dim=1)[:, order],
            torch.cat([p.mse for p in parts], dim=1)[:, order],
        )

    def subset(self, positions: torch.Tensor) -> DefenseScores:
        """The scores of the images at ``positions`` (in that order) of a record over every
        image in image order (``indices`` is ``0, 1, ..., n - 1``)."""
        return DefenseScores(positions.clone(), self.correct[:, positions], self.mse[:, positions])


@dataclass(frozen=True)
class CellRecord:
    """One computed (attack, eps, defense, effective threat model) on some images.

    Attributes:
        defense_index: position of the defense in the run's ``defenses``.
        threat_model: the effective threat model the adversarials were crafted under.
        scores: the defended classifier on the adversarial images.
        l2: ``(n,)`` float64 L2 norm of each image's perturbation.
        linf: ``(n,)`` float64 L-inf norm of each image's perturbation.
        attacker_model: what the attacker differentiated (``classifier`` when oblivious).
        attack_settings: the attack's hyper-parameters (``Attack.settings()``).
        seconds: time spent crafting (first cell that uses a set of adversarials) and
            scoring, summed over processes.
    """

    defense_index: int
    threat_model: str
    scores: DefenseScores
    l2: torch.Tensor
    linf: torch.Tensor
    attacker_model: str
    attack_settings: dict[str, Any]
    seconds: float

    @staticmethod
    def merge(parts: Sequence[CellRecord]) -> CellRecord:
        """One record over the union of ``parts``' images (same cell in every part)."""
        first = parts[0]
        scores = DefenseScores.merge([p.scores for p in parts])
        order = _order(torch.cat([p.scores.indices for p in parts]))
        return CellRecord(
            first.defense_index,
            first.threat_model,
            scores,
            torch.cat([p.l2 for p in parts])[order],
            torch.cat([p.linf for p in parts])[order],
            first.attacker_model,
            first.attack_settings,
            round(sum(p.seconds for p in parts), 3),
        )


@dataclass(frozen=True)
class GroupRecord:
    """Everything computed for one (attack, eps) on some images.

    Attributes:
        attack: attack name.
        eps: eps label (a number in units of 1/255, or ``"min-norm"``).
        cells: one record per computed (defense, effective threat model), in computing order.
        indices: ``(n,)`` positions of this record's images (those of its cells).
        detector_scores: detector name -> ``(n,)`` score of each oblivious adversarial image.
        grid_indices: positions of the first evaluated images this record holds (report grid).
        grid_adversarial: their oblivious adversarials (only for the grid's group).
    """

    attack: str
    eps: float | str
    cells: list[CellRecord]
    indices: torch.Tensor
    detector_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    grid_indices: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    grid_adversarial: torch.Tensor | None = None

    def cell(self, defense_index: int, threat_model: str) -> CellRecord | None:
        for record in self.cells:
            if record.defense_index == defense_index and record.threat_model == threat_model:
                return record
        return None

    @staticmethod
    def merge(parts: Sequence[GroupRecord]) -> GroupRecord:
        """One record over the union of ``parts``' images (same group in every part)."""
        first = parts[0]
        indices = torch.cat([p.indices for p in parts])
        order = _order(indices)
        cells = [
            CellRecord.merge([p.cells[number] for p in parts]) for number in range(len(first.cells))
        ]
        scores = {
            name: torch.cat([p.detector_scores[name] for p in parts])[order]
            for name in first.detector_scores
        }
        grid_parts = [p for p in parts if p.grid_adversarial is not None]
        grid_indices = torch.zeros(0, dtype=torch.long)
        grid = None
        if grid_parts:
            grid_indices = torch.cat([p.grid_indices for p in grid_parts])
            grid_order = _order(grid_indices)
            grid = torch.cat([p.grid_adversarial for p in grid_parts])[grid_order]  # type: ignore[misc]
            grid_indices = grid_indices[grid_order]
        return GroupRecord(
            first.attack, first.eps, cells, indices[order], scores, grid_indices, grid
        )

    # -- transport between processes (no pickle) -------------------------------------------
    def to_bytes(self, extra: dict[str, str] | None = None) -> bytes:
        """safetensors bytes: the tensors, and the rest as JSON metadata (with ``extra``'s
        entries beside it, read back by :func:`header_metadata`)."""
        tensors, meta = self.tensors()
        return save_tensors(tensors, {**(extra or {}), "record": json.dumps(meta, default=str)})

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, description)``: what :meth:`to_bytes` writes (tensors copied)."""
        tensors: dict[str, torch.Tensor] = {"indices": self.indices.clone()}
        cells = []
        for number, cell in enumerate(self.cells):
            for name in ("indices", "correct", "mse"):
                tensors[f"cell/{number}/{name}"] = getattr(cell.scores, name).clone()
            tensors[f"cell/{number}/l2"] = cell.l2.clone()
            tensors[f"cell/{number}/linf"] = cell.linf.clone()
            cells.append(
                {
                    "defense_index": cell.defense_index,
                    "threat_model": cell.threat_model,
                    "attacker_model": cell.attacker_model,
                    "attack_settings": cell.attack_settings,
                    "seconds": cell.seconds,
                }
            )
        for name, values in self.detector_scores.items():
            tensors[f"detector/{name}"] = values.clone()
        tensors["grid_indices"] = self.grid_indices.clone()
        if self.grid_adversarial is not None:
            tensors["grid_adversarial"] = self.grid_adversarial.clone()
        meta = {
            "attack": self.attack,
            "eps": self.eps,
            "cells": cells,
            "detectors": list(self.detector_scores),
        }
        return tensors, meta

    @staticmethod
    def from_bytes(data: bytes) -> GroupRecord:
        """Inverse of :meth:`to_bytes`."""
        try:
            tensors = load_tensors(data)
            meta = json.loads(header_metadata(data)["record"])
        except Exception as error:  # noqa: BLE001 - any corruption is reported the same way
            raise CheckpointError(f"unreadable evaluation record ({error})") from error
        cells = [
            CellRecord(
                int(cell["defense_index"]),
                str(cell["threat_model"]),
                DefenseScores(
                    tensors[f"cell/{number}/indices"],
                    tensors[f"cell/{number}/correct"],
                    tensors[f"cell/{number}/mse"],
                ),
                tensors[f"cell/{number}/l2"],
                tensors[f"cell/{number}/linf"],
                str(cell["attacker_model"]),
                dict(cell["attack_settings"]),
                float(cell["seconds"]),
            )
            for number, cell in enumerate(meta["cells"])
        ]
        return GroupRecord(
            meta["attack"],
            meta["eps"],
            cells,
            tensors["indices"],
            {name: tensors[f"detector/{name}"] for name in meta["detectors"]},
            tensors["grid_indices"],
            tensors.get("grid_adversarial"),
        )


@dataclass(frozen=True)
class CleanRecord:
    """The defended classifier on the clean images (one :class:`DefenseScores` per defense),
    and the detectors' scores of the clean images."""

    defenses: list[DefenseScores]
    detector_scores: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def merge(parts: Sequence[CleanRecord]) -> CleanRecord:
        defenses = [
            DefenseScores.merge([p.defenses[i] for p in parts])
            for i in range(len(parts[0].defenses))
        ]
        order = _order(torch.cat([p.defenses[0].indices for p in parts])) if defenses else None
        scores = {
            name: torch.cat([p.detector_scores[name] for p in parts])[order]
            for name in parts[0].detector_scores
        }
        return CleanRecord(defenses, scores)

    def subset(self, positions: torch.Tensor) -> CleanRecord:
        """The record of the images at ``positions`` (in that order), from a record over every
        image in image order (what :meth:`merge` makes of every process's part)."""
        return CleanRecord(
            [scores.subset(positions) for scores in self.defenses],
            {name: values[positions] for name, values in self.detector_scores.items()},
        )

    def tensors(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, description)``: the record as named tensors (each name starting with
        ``prefix``) and the JSON-able description that :meth:`from_tensors` reads back."""
        # clone: a tensor shared by two names would not be written twice
        tensors = {name: values.clone() for name, values in self.named_tensors(prefix).items()}
        return tensors, {"defenses": len(self.defenses), "detectors": list(self.detector_scores)}

    def named_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The record's tensors by the names :meth:`tensors` gives them (not copied)."""
        named = {
            f"{prefix}defense/{i}/{name}": getattr(scores, name)
            for i, scores in enumerate(self.defenses)
            for name in SCORE_TENSORS
        }
        named.update({f"{prefix}detector/{n}": v for n, v in self.detector_scores.items()})
        return named

    @staticmethod
    def from_tensors(
        tensors: dict[str, torch.Tensor], description: dict[str, Any], prefix: str = ""
    ) -> CleanRecord:
        """The record that :meth:`tensors` wrote (a missing tensor raises ``KeyError``)."""
        defenses = [
            DefenseScores(*(tensors[f"{prefix}defense/{i}/{name}"] for name in SCORE_TENSORS))
            for i in range(int(description["defenses"]))
        ]
        detectors = {n: tensors[f"{prefix}detector/{n}"] for n in description["detectors"]}
        return CleanRecord(defenses, detectors)

    def to_bytes(self, extra: dict[str, str] | None = None) -> bytes:
        """safetensors bytes (with ``extra``'s entries in the metadata)."""
        tensors, meta = self.tensors()
        return save_tensors(tensors, {**(extra or {}), "record": json.dumps(meta)})

    @staticmethod
    def from_bytes(data: bytes) -> CleanRecord:
        """Inverse of :meth:`to_bytes`."""
        try:
            tensors = load_tensors(data)
            meta = json.loads(header_metadata(data)["record"])
            return CleanRecord.from_tensors(tensors, meta)
        except Exception as error:  # noqa: BLE001
            raise CheckpointError(f"unreadable evaluation record ({error})") from error
