"""Architectures: ComDefend (ComCNN + binarizer + RecCNN), its presets and building blocks."""

from comdefend.models.binarizer import BINARIZER_MODES, Binarizer, binarize
from comdefend.models.comdefend import ComDefend, ComDefendConfig, check_images
from comdefend.models.presets import PRESETS, Preset, get_preset, list_presets, preset_summary

__all__ = [
    "BINARIZER_MODES",
    "PRESETS",
    "Binarizer",
    "ComDefend",
    "ComDefendConfig",
    "Preset",
    "binarize",
    "check_images",
    "get_preset",
    "list_presets",
    "preset_summary",
]
