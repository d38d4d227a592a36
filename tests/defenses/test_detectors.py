"""PCA and feature-squeezing detectors, calibration and detection metrics."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from comdefend.defenses import (
    BitDepthReduction,
    FeatureSqueezingDetector,
    MedianSmoothing,
    MissingDependencyError,
    PCADetector,
    detection_metrics,
)
from comdefend.errors import InputError, UsageError


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """8 x 8 grayscale images: upsampled 3 x 3 noise plus faint sensor noise."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 3, 3, generator=generator)
    up = F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=True)
    return up + 0.003 * torch.randn(up.shape, generator=generator)


def high_frequency(x: torch.Tensor, seed: int, eps: float = 0.03) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return x + eps * torch.randn(x.shape, generator=generator).sign()


def test_pca_detector_separates_high_frequency_noise_and_calibrates() -> None:
    detector = PCADetector().fit(smooth_images(800, seed=0))
    assert detector.rank == 64 and detector.tail_size == 32
    threshold = detector.calibrate(smooth_images(800, seed=1), fpr=0.05)
    assert threshold == detector.threshold

    clean = smooth_images(600, seed=2)
    clean_scores = detector.score(clean)
    adversarial_scores = detector.score(high_frequency(clean, seed=3))
    assert clean_scores.shape == (600,)
    assert 0.8 < float(clean_scores.mean()) < 1.5  # whitened (out-of-sample: a bit above 1)
    # AUC = P(adversarial score > clean score), computed pairwise (no scikit-learn import).
    auc = float((adversarial_scores[:, None] > clean_scores[None, :]).double().mean())
    assert auc > 0.9

    false_positives = float(detector.predict(clean).float().mean())
    assert 0.02 <= false_positives <= 0.09
    assert float(detector.predict(high_frequency(clean, seed=3)).float().mean()) > 0.9


def test_pca_detector_with_fewer_images_than_pixels() -> None:
    detector = PCADetector(tail=5, statistic="variance").fit(smooth_images(30, seed=0))
    assert detector.rank <= 29 and detector.tail_size == 5
    scores = detector.score(smooth_images(4, seed=1))
    assert scores.shape == (4,) and bool(torch.isfinite(scores).all())
    assert detector.settings()["rank"] == detector.rank


def test_pca_detector_errors() -> None:
    detector = PCADetector()
    with pytest.raises(UsageError, match="fit"):
        detector.score(torch.rand(2, 1, 8, 8))
    with pytest.raises(UsageError, match="calibrate"):
        detector.predict(torch.rand(2, 1, 8, 8))
    detector.fit(torch.rand(20, 1, 4, 4))
    with pytest.raises(InputError, match="fitted on 16"):
        detector.score(torch.rand(2, 1, 8, 8))
    with pytest.raises(UsageError):
        detector.calibrate(torch.rand(10, 1, 4, 4), fpr=1.5)
    with pytest.raises(InputError):
        PCADetector().fit(torch.full((4, 1, 2, 2), float("nan")))


def test_feature_squeezing_scores() -> None:
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    detector = FeatureSqueezingDetector(
        classifier, [BitDepthReduction(1), MedianSmoothing(2)], batch_size=3
    )
    x = torch.rand(7, 1, 8, 8)
    scores = detector.score(x)
    assert scores.shape == (7,) and scores.dtype == torch.float64
    assert bool((scores >= 0).all()) and bool((scores <= 2).all())
    assert float(scores.max()) > 0
    # Images that no squeezer changes (constant 0 or 1) score 0.
    fixed = torch.cat([torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)])
    assert detector.score(fixed).tolist() == [0.0] * 4
    detector.calibrate(x, fpr=0.2)
    assert detector.predict(fixed).tolist() == [False] * 4
    assert detector.settings()["squeezers"] == ["bits:1", "median:2"]


def test_detection_metrics_perfect_and_reversed() -> None:
    perfect = detection_metrics([0.1, 0.2, 0.3], torch.tensor([0.7, 0.8]), fpr=0.05)
    assert perfect["roc_auc"] == 1.0 and perfect["tpr_at_fpr"] == 1.0
    assert perfect["n_clean"] == 3 and perfect["n_adversarial"] == 2
    assert perfect["roc_fpr"][0] == 0.0 and perfect["roc_tpr"][-1] == 1.0
    assert 0.3 < perfect["threshold"] <= 0.7
    reversed_ = detection_metrics([0.7, 0.8], [0.1, 0.2])
    assert reversed_["roc_auc"] == 0.0 and reversed_["tpr_at_fpr"] == 0.0


def test_detection_metrics_tpr_at_fpr_reads_the_curve() -> None:
    clean = [float(i) for i in range(100)]  # 0..99
    adversarial = [95.5, 96.5, 50.5, 10.5]  # two above the 5% FPR threshold
    metrics = detection_metrics(clean, adversarial, fpr=0.05)
    assert metrics["tpr_at_fpr"] == 0.5


def test_detection_metrics_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError):
        detection_metrics([], [1.0])
    with pytest.raises(InputError):
        detection_metrics([float("nan")], [1.0])
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(MissingDependencyError, match=r"comdefend\[report\]"):
        detection_metrics([0.0], [1.0])


def test_a_user_detector_without_settings_is_described_by_its_type() -> None:
    """``evaluate`` records ``detector.settings()`` in results.json: a user's subclass that only
    implements ``score`` gets the base class's description instead of an AttributeError."""
    from comdefend.defenses.detectors import Detector

    class Brightness(Detector):
        def score(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1).mean(1)

    detector = Brightness()
    assert detector.calibrate(torch.rand(8, 1, 4, 4), fpr=0.25) == detector.threshold
    assert detector.settings() == {"type": "Brightness"}
