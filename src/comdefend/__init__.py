"""comdefend: compression-based defenses against adversarial examples (ComDefend, CVPR 2019)."""

from comdefend.checkpoint import load_checkpoint, save_checkpoint
from comdefend.data import load_dataset
from comdefend.errors import CheckpointError, ComDefendError, InputError, UsageError
from comdefend.losses import comdefend_loss
from comdefend.metrics import psnr
from comdefend.models import (
    Binarizer,
    ComDefend,
    ComDefendConfig,
    binarize,
    get_preset,
    list_presets,
)
from comdefend.official import import_official
from comdefend.zoo import list_pretrained, load_pretrained

__version__ = "0.1.0"

__all__ = [
    "Binarizer",
    "CheckpointError",
    "ComDefend",
    "ComDefendConfig",
    "ComDefendError",
    "InputError",
    "UsageError",
    "__version__",
    "binarize",
    "comdefend_loss",
    "get_preset",
    "import_official",
    "list_pretrained",
    "load_pretrained",
    "list_presets",
    "load_checkpoint",
    "load_dataset",
    "psnr",
    "save_checkpoint",
]
