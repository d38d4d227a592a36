"""Input-transformation defenses, adaptive-attack wrappers and detectors.

Purifiers (``nn.Module``, NCHW float [0, 1] -> same shape in [0, 1]): :class:`Identity`,
:class:`JPEG`, :class:`BitDepthReduction`, :class:`MedianSmoothing`, :class:`ComDefendDefense`
and their sequential :class:`Compose`; build them from specs with :func:`parse_defense`.
Adaptive attacks: :class:`BPDA`, :class:`EOT`, :func:`eot_grad` and
:func:`make_threat_model_defense` for the :data:`THREAT_MODELS`. Detectors:
:class:`PCADetector`, :class:`FeatureSqueezingDetector`, :func:`detection_metrics`.
"""

from comdefend.defenses.adaptive import (
    BPDA,
    EOT,
    THREAT_MODELS,
    DefendedClassifier,
    ThreatModel,
    eot_grad,
    make_threat_model_defense,
)
from comdefend.defenses.base import Defense, check_batch, check_images
from comdefend.defenses.comdefend_defense import DEFENSE_BINARIZER_MODES, ComDefendDefense
from comdefend.defenses.detectors import (
    DETECTORS,
    Detector,
    DetectorKind,
    FeatureSqueezingDetector,
    MissingDependencyError,
    PCADetector,
    detection_metrics,
)
from comdefend.defenses.purifiers import (
    JPEG,
    BitDepthReduction,
    Compose,
    Identity,
    MedianSmoothing,
    pad2d,
)
from comdefend.defenses.spec import DEFENSES, DefenseKind, parse_defense, register_defense

__all__ = [
    "BPDA",
    "DEFENSE_BINARIZER_MODES",
    "DEFENSES",
    "DETECTORS",
    "EOT",
    "JPEG",
    "THREAT_MODELS",
    "ThreatModel",
    "BitDepthReduction",
    "ComDefendDefense",
    "Compose",
    "DefendedClassifier",
    "DefenseKind",
    "Defense",
    "Detector",
    "DetectorKind",
    "FeatureSqueezingDetector",
    "Identity",
    "MedianSmoothing",
    "MissingDependencyError",
    "PCADetector",
    "check_batch",
    "check_images",
    "detection_metrics",
    "eot_grad",
    "make_threat_model_defense",
    "pad2d",
    "parse_defense",
    "register_defense",
]
