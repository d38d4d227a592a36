"""Detectors in an evaluation: fitted and calibrated once, scores per image, rows per attack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from comdefend.defenses import DETECTORS, detection_metrics
from comdefend.defenses.detectors import Detector, MissingDependencyError

DETECTOR_TRAIN_IMAGES = 2000
DETECTOR_FPR = 0.05
#: What a detection row holds without scikit-learn (the ROC needs it).
ROC_SKIPPED = "ROC curve and AUC skipped: scikit-learn is missing (pip install comdefend[report])"


@dataclass
class Detectors:
    """The run's fitted and calibrated detectors (empty without ``--detector``).

    Attributes:
        detectors: name -> detector with its ``threshold`` set.
        info: ``results.json``'s ``detectors.info``.
    """

    detectors: dict[str, Detector] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    roc_skipped: bool = False

    def score(self, images: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """Every detector's per-image score of ``images`` (CPU)."""
        if not len(images):
            return {name: torch.zeros(0) for name in self.detectors}
        return {
            name: detector.score(images.to(device)).detach().cpu()
            for name, detector in self.detectors.items()
        }

    def finish_info(self, clean_scores: dict[str, torch.Tensor]) -> None:
        """Record each detector's false-positive rate on all evaluated clean images."""
        for name, detector in self.detectors.items():
            flagged = clean_scores[name] > _threshold(detector)
            self.info[name]["fpr_on_evaluated_clean"] = float(flagged.double().mean())

    def row(
        self,
        attack: str,
        eps: float | str,
        clean_scores: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor],
    ) -> dict[str, Any]:
        """One attack's detection results over all evaluated images."""
        row: dict[str, Any] = {"attack": attack, "eps": eps}
        for name, detector in self.detectors.items():
            tpr = float((scores[name] > _threshold(detector)).double().mean())
            try:
                metrics = detection_metrics(clean_scores[name], scores[name], DETECTOR_FPR)
            except MissingDependencyError:
                metrics = {"roc_auc": None, "tpr_at_fpr": None, "roc_fpr": [], "roc_tpr": []}
                self.roc_skipped = True
            row[name] = {
                "roc_auc": metrics["roc_auc"],
                "tpr_at_5fpr": tpr,
                "roc_tpr_at_5fpr": metrics["tpr_at_fpr"],
                "roc_fpr": metrics["roc_fpr"],
                "roc_tpr": metrics["roc_tpr"],
            }
        return row


def fit_detectors(
    names: list[str],
    classifier: nn.Module,
    train_images: torch.Tensor | None,
    holdout: torch.Tensor | None,
    batch_size: int,
    device: torch.device,
    evaluated: int,
) -> Detectors:
    """Fit (on ``train_images``, where the kind learns) and calibrate (5% FPR, ``holdout``).

    Args:
        names: names in :data:`comdefend.defenses.DETECTORS`; ``evaluated``: images evaluated
            (for the message when there is no holdout).
        holdout: clean test images after the evaluated ones, or ``None`` if fewer than two.
    """
    result = Detectors()
    if not names:
        return result
    if holdout is None or train_images is None:
        result.info["skipped"] = (
            f"no held-out clean test images after the first {evaluated} to calibrate the detectors"
        )
        return result
    for name in names:
        kind = DETECTORS.get(name)
        detector = kind.build(classifier, train_images, batch_size)
        threshold = detector.calibrate(holdout.to(device), DETECTOR_FPR)
        result.detectors[name] = detector
        result.info[name] = {
            "settings": detector.settings(),
            "fit_images": int(train_images.shape[0]) if kind.fits_on_images else 0,
            "calibration_images": int(holdout.shape[0]),
            "threshold": threshold,
            "target_fpr": DETECTOR_FPR,
        }
    return result


def _threshold(detector: Detector) -> float:
    """The calibrated threshold (detectors are calibrated when they are fitted)."""
    if detector.threshold is None:
        raise RuntimeError(f"{type(detector).__name__} was not calibrated")
    return detector.threshold
