"""Adversarial-example detectors and detection metrics.

References:
    - D. Hendrycks, K. Gimpel, "Early Methods for Detecting Adversarial Images", ICLR 2017
      workshop (:class:`PCADetector`).
    - W. Xu, D. Evans, Y. Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
      Networks", NDSS 2018 (:class:`FeatureSqueezingDetector`).

Every detector maps a batch to one score per image (higher = more likely adversarial), and
flags images whose score exceeds a threshold calibrated on clean data at a target false-positive
rate (:meth:`Detector.calibrate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from comdefend.defenses.purifiers import BitDepthReduction, MedianSmoothing
from comdefend.errors import ComDefendError, InputError, UsageError
from comdefend.registry import Registry

ScoreLike = torch.Tensor | np.ndarray | Sequence[float]


class MissingDependencyError(ComDefendError, ImportError):
    """An optional dependency (scikit-learn for the metrics) is not installed."""


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 < fpr < 1.0:
        raise UsageError(f"false-positive rate must lie in (0, 1), got {fpr}")
    return fpr


def _check_finite(x: torch.Tensor, name: str) -> None:
    if x.numel() == 0:
        raise InputError(f"{name} is empty: shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")


class Detector:
    """Base class: a per-image ``score`` plus a threshold calibrated on clean data.

    Subclasses implement :meth:`score`.
    """

    threshold: float | None = None

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """One score per image, higher meaning more likely adversarial: shape ``(N,)``, CPU."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings for ``results.json`` (subclasses add their parameters)."""
        return {"type": type(self).__name__}

    def calibrate(self, clean_holdout: torch.Tensor, fpr: float = 0.05) -> float:
        """Set the threshold at the ``1 - fpr`` quantile of the scores of clean images.

        Args:
            clean_holdout: clean images not used to fit the detector.
            fpr: target false-positive rate on clean data, in (0, 1).

        Returns:
            The threshold; images scoring above it are flagged.
        """
        return self.calibrate_scores(self.score(clean_holdout), fpr)

    def calibrate_scores(self, clean_scores: ScoreLike, fpr: float = 0.05) -> float:
        """As :meth:`calibrate`, from precomputed clean scores."""
        fpr = _check_fpr(fpr)
        scores = torch.as_tensor(np.asarray(clean_scores, dtype=np.float64)).flatten()
        _check_finite(scores, "clean scores")
        self.threshold = float(torch.quantile(scores, 1.0 - fpr))
        self.calibrated_fpr = fpr
        return self.threshold

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``True`` for images flagged as adversarial: shape ``(N,)``, bool, CPU."""
        if self.threshold is None:
            raise UsageError(f"{type(self).__name__} is not calibrated: call calibrate() first")
        return self.score(x) > self.threshold


class PCADetector(Detector):
    """PCA-whitening detector (Hendrycks & Gimpel 2017).

    Clean natural images put almost no variance on their trailing principal components;
    adversarial perturbations do. :meth:`fit` learns the principal components of flattened clean
    images; :meth:`score` whitens an image's coefficients on the ``tail`` lowest-variance
    components (with non-negligible variance) and returns their mean square (``statistic=
    "mean_square"``, about 1 for clean images) or their variance (``"variance"``, as in the
    paper).

    With N >= D images the covariance (D x D, accumulated in float64 over chunks) is
    eigendecomposed; with N < D the centred data are decomposed by SVD instead, and at most
    N - 1 components have non-zero variance (``rank``). Components whose variance is below
    ``rel_tol`` times the largest are dropped before choosing the tail.

    Args:
        tail: number of trailing components scored; ``None``: half the rank (at least 1).
        rel_tol: relative variance below which a component is ignored.
        statistic: ``mean_square`` (default) or ``variance`` of the whitened tail coefficients.

    Shape:
        - fit / score input: ``(N, C, H, W)`` (or ``(N, D)``), same image shape for both.
        - score output: ``(N,)`` float64 on CPU.

    Example:
        >>> detector = PCADetector().fit(clean_train)  # doctest: +SKIP
        >>> detector.calibrate(clean_holdout, fpr=0.05)  # doctest: +SKIP
        >>> detector.predict(adversarial).float().mean()  # detection rate  # doctest: +SKIP
    """

    def __init__(
        self,
        tail: int | None = None,
        rel_tol: float = 1e-6,
        statistic: Literal["mean_square", "variance"] = "mean_square",
    ) -> None:
        if tail is not None and (isinstance(tail, bool) or not isinstance(tail, int) or tail < 1):
            raise UsageError(f"tail must be a positive integer or None, got {tail!r}")
        if not 0.0 <= rel_tol < 1.0:
            raise UsageError(f"rel_tol must lie in [0, 1), got {rel_tol}")
        if statistic not in ("mean_square", "variance"):
            raise UsageError(f"statistic must be mean_square or variance, got {statistic!r}")
        self.tail = tail
        self.rel_tol = float(rel_tol)
        self.statistic = statistic
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # (D, rank), descending variance
        self.eigenvalues: torch.Tensor | None = None  # (rank,)
        self.rank = 0
        self.feature_shape: tuple[int, ...] = ()

    @staticmethod
    def _flatten(x: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise InputError(f"{name} must be a batch tensor (N, ...), got {type(x).__name__}")
        flat = x.detach().reshape(x.shape[0], -1)
        _check_finite(flat, name)
        return flat

    def fit(self, clean_images: torch.Tensor, chunk_size: int = 4096) -> PCADetector:
        """Learn mean and principal components of clean images (2 or more).

        Args:
            clean_images: ``(N, C, H, W)`` or ``(N, D)`` clean training images.
            chunk_size: rows per float64 chunk when accumulating the covariance.

        Returns:
            ``self``.
        """
        flat = self._flatten(clean_images, "clean images")
        n, d = flat.shape
        if n < 2:
            raise InputError(f"PCADetector.fit needs at least 2 images, got {n}")
        mean = torch.zeros(d, dtype=torch.float64)
        for chunk in flat.split(chunk_size):
            mean += chunk.to("cpu", torch.float64).sum(0)
        mean /= n
        if n >= d:
            cov = torch.zeros(d, d, dtype=torch.float64)
            for chunk in flat.split(chunk_size):
                centred = chunk.to("cpu", torch.float64) - mean
                cov += centred.T @ centred
            cov /= n - 1
            eigenvalues, vectors = torch.linalg.eigh(cov)  # ascending
            eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
        else:
            centred = flat.to("cpu", torch.float64) - mean
            _, singular, vh = torch.linalg.svd(centred, full_matrices=False)  # descending
            eigenvalues, vectors = singular**2 / (n - 1), vh.T
        top = float(eigenvalues[0]) if eigenvalues.numel() else 0.0
        keep = eigenvalues > max(top * self.rel_tol, 0.0)
        rank = int(keep.sum())
        if rank == 0:
            raise InputError("clean images have no variance: all identical?")
        self.mean = mean
        self.eigenvalues = eigenvalues[:rank].clone()
        self.components = vectors[:, :rank].clone()
        self.rank = rank
        self.feature_shape = tuple(clean_images.shape[1:])
        return self

    @property
    def tail_size(self) -> int:
        """Number of trailing components actually scored."""
        if self.tail is None:
            return max(1, self.rank // 2)
        return min(self.tail, self.rank)

    def whiten(self, x: torch.Tensor) -> torch.Tensor:
        """Whitened coefficients on all kept components: ``(N, rank)``, float64, CPU."""
        if self.mean is None or self.components is None or self.eigenvalues is None:
            raise UsageError("PCADetector is not fitted: call fit() first")
        flat = self._flatten(x, "images")
        if flat.shape[1] != self.mean.shape[0]:
            raise InputError(
                f"images have {flat.shape[1]} values each ({tuple(x.shape[1:])}) but the "
                f"detector was fitted on {self.mean.shape[0]} ({self.feature_shape})"
            )
        centred = flat.to("cpu", torch.float64) - self.mean
        return (centred @ self.components) / self.eigenvalues.sqrt()

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Mean square (or variance) of the whitened tail coefficients: ``(N,)`` float64."""
        tail = self.whiten(x)[:, -self.tail_size :]
        if self.statistic == "variance" and tail.shape[1] > 1:
            return tail.var(dim=1)
        return tail.square().mean(dim=1)

    def settings(self) -> dict[str, Any]:
        return {
            "type": "pca",
            "rank": self.rank,
            "tail": self.tail_size,
            "rel_tol": self.rel_tol,
            "statistic": self.statistic,
            "threshold": self.threshold,
        }


class FeatureSqueezingDetector(Detector):
    """Feature-squeezing detector (Xu et al. 2018).

    Score: the maximum, over the squeezers, of the L1 distance between the classifier's softmax
    on the squeezed input and on the raw input (between 0 and 2).

    Args:
        classifier: maps images to logits (put it in eval mode yourself).
        squeezers: input transformations; default bit depth 5 and a 2 x 2 median filter (the
            paper's CIFAR-10 configuration without non-local means).
        batch_size: images per classifier call in :meth:`score`.

    Shape:
        - score input: ``(N, C, H, W)`` float in [0, 1].
        - score output: ``(N,)`` float64 on CPU.

    Example:
        >>> detector = FeatureSqueezingDetector(classifier)  # doctest: +SKIP
        >>> detector.calibrate(clean_holdout, fpr=0.05)  # doctest: +SKIP
    """

    def __init__(
        self,
        classifier: nn.Module,
        squeezers: Sequence[nn.Module] | None = None,
        batch_size: int = 256,
    ) -> None:
        if squeezers is None:
            squeezers = [BitDepthReduction(5), MedianSmoothing(2)]
        if len(squeezers) == 0:
            raise UsageError("FeatureSqueezingDetector needs at least one squeezer")
        if batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.classifier = classifier
        self.squeezers = list(squeezers)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def _score_batch(self, x: torch.Tensor) -> torch.Tensor:
        raw = F.softmax(self.classifier(x), dim=1)
        distances = [
            (F.softmax(self.classifier(squeeze(x)), dim=1) - raw).abs().sum(dim=1)
            for squeeze in self.squeezers
        ]
        return torch.stack(distances, dim=1).amax(dim=1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Max over squeezers of the L1 softmax distance: ``(N,)`` float64 on CPU."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise InputError("FeatureSqueezingDetector.score needs an (N, C, H, W) tensor")
        parts = [self._score_batch(chunk) for chunk in x.split(self.batch_size)]
        return torch.cat(parts).to("cpu", torch.float64)

    def settings(self) -> dict[str, Any]:
        return {
            "type": "feature_squeezing",
            "squeezers": [getattr(s, "name", type(s).__name__) for s in self.squeezers],
            "threshold": self.threshold,
        }


def _import_sklearn_metrics() -> Any:
    try:
        from sklearn import metrics
    except ImportError as error:
        raise MissingDependencyError(
            "detection metrics need scikit-learn: pip install comdefend[report]"
        ) from error
    return metrics


def _as_scores(scores: ScoreLike, name: str) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        array = scores.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise InputError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return array


def detection_metrics(
    clean_scores: ScoreLike, adversarial_scores: ScoreLike, fpr: float = 0.05
) -> dict[str, Any]:
    """ROC AUC and true-positive rate at a false-positive rate, adversarial = positive class.

    Args:
        clean_scores: detector scores of clean images (higher = more suspicious).
        adversarial_scores: detector scores of adversarial images.
        fpr: the false-positive rate at which ``tpr_at_fpr`` is read, in (0, 1).

    Returns:
        ``roc_auc``; ``tpr_at_fpr`` (best TPR with FPR <= ``fpr``) and the ``threshold`` that
        achieves it (flag scores >= threshold); ``fpr`` (the target); ``roc_fpr`` / ``roc_tpr``
        (the ROC curve, lists for plotting); ``n_clean``, ``n_adversarial``.

    Raises:
        MissingDependencyError: scikit-learn is not installed (``pip install comdefend[report]``).

    Example:
        >>> detection_metrics([0.1, 0.2], [0.8, 0.9])["roc_auc"]
        1.0
    """
    fpr = _check_fpr(fpr)
    clean = _as_scores(clean_scores, "clean scores")
    adversarial = _as_scores(adversarial_scores, "adversarial scores")
    metrics = _import_sklearn_metrics()
    labels = np.concatenate([np.zeros(clean.size), np.ones(adversarial.size)])
    scores = np.concatenate([clean, adversarial])
    roc_fpr, roc_tpr, thresholds = metrics.roc_curve(labels, scores)
    auc = float(metrics.roc_auc_score(labels, scores))
    allowed = np.flatnonzero(roc_fpr <= fpr + 1e-12)
    best = int(allowed[np.argmax(roc_tpr[allowed])])
    threshold = float(thresholds[best])
    return {
        "roc_auc": auc,
        "tpr_at_fpr": float(roc_tpr[best]),
        "fpr": fpr,
        "threshold": threshold if math.isfinite(threshold) else None,
        "roc_fpr": roc_fpr.tolist(),
        "roc_tpr": roc_tpr.tolist(),
        "n_clean": int(clean.size),
        "n_adversarial": int(adversarial.size),
    }


@dataclass(frozen=True)
class DetectorKind:
    """A detector that ``comdefend evaluate --detector NAME`` can fit and calibrate.

    Attributes:
        name: registry name.
        description: one line for ``--help`` and reports.
        build: ``build(classifier, clean_train_images, batch_size)`` returns a fitted (not yet
            calibrated) :class:`Detector`.
        fits_on_images: whether ``build`` learns from ``clean_train_images``.
    """

    name: str
    description: str
    build: Callable[[nn.Module, torch.Tensor, int], Detector]
    fits_on_images: bool


#: Detectors accepted by ``--detector``; a user adds one with ``DETECTORS.add(name, kind)``.
DETECTORS: Registry[DetectorKind] = Registry("detector")
DETECTORS.add(
    "pca",
    DetectorKind(
        "pca",
        "PCA whitening of the trailing components (Hendrycks & Gimpel 2017)",
        lambda classifier, train, batch_size: PCADetector().fit(train),
        fits_on_images=True,
    ),
)
DETECTORS.add(
    "squeeze",
    DetectorKind(
        "squeeze",
        "feature squeezing: bit depth 5 and 2x2 median (Xu et al. 2018)",
        lambda classifier, train, batch_size: FeatureSqueezingDetector(
            classifier, batch_size=batch_size
        ),
        fits_on_images=False,
    ),
)
