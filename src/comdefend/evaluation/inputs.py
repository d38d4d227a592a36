"""What an evaluation evaluates, resolved once: the classifier and the defenses.

The classifier is given as a checkpoint path or zoo name, as ``package.module:factory`` (a
callable without required arguments that builds the user's ``nn.Module``, imported with
:func:`~comdefend.models.classifiers.import_classifier_factory`) or, from Python, as an
``nn.Module``. :func:`resolve_classifier` turns each into a :class:`ResolvedClassifier`: the model
in eval mode on the run's device and its provenance
(:class:`~comdefend.evaluation.results.ClassifierInfo`), whose sha256 (of the checkpoint file,
or of the module's ``state_dict`` tensors) the results record and the resume fingerprint checks.

A defense is a spec string (:func:`comdefend.defenses.parse_defense`), a
:class:`~comdefend.defenses.Defense`, or any ``nn.Module`` mapping NCHW images in [0, 1] to
images of the same shape, which :class:`ModuleDefense` wraps: its ``differentiable`` and
``randomized`` attributes (default ``True`` and ``False``) tell the threat models whether the
attacker needs BPDA or EOT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from comdefend.data.datasets import tensors_sha256
from comdefend.defenses import Defense
from comdefend.errors import UsageError
from comdefend.evaluation.results import ClassifierInfo
from comdefend.zoo import WeightsRef

#: Images of the probe batch on which a classifier's and a user defense's contract is checked.
PROBE_IMAGES = 4


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's ``state_dict`` tensors (names, dtypes, shapes and values): the
    identity of a model that has no checkpoint file.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> module_sha256(a) == module_sha256(a), module_sha256(a) == module_sha256(b)
        (True, False)
    """
    state = module.state_dict()
    return tensors_sha256({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


def class_path(value: object) -> str:
    """``package.module.Class`` of ``value``'s type."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


@dataclass(frozen=True)
class ResolvedClassifier:
    """A classifier ready to evaluate.

    Attributes:
        model: in eval mode, on the run's device.
        info: its provenance (reference, kind, sha256, class, checkpoint).
        weights: the checkpoint it was loaded from (``None`` for a factory or a module).
        num_classes: the classes its checkpoint says it has (``None`` when unknown).
    """

    model: nn.Module
    info: ClassifierInfo
    weights: WeightsRef | None = None
    num_classes: int | None = None

    @property
    def from_checkpoint(self) -> bool:
        return self.info.kind == "checkpoint"


def resolve_classifier(
    reference: str, device: torch.device | str = "cpu", module: nn.Module | None = None
) -> ResolvedClassifier:
    """Load, import or take the classifier; put it in eval mode on ``device``.

    Args:
        reference: a checkpoint path or zoo name, or ``package.module:factory``; with ``module``
            it only names the module in the results.
        device: where the model runs.
        module: a model passed from Python (moved to ``device`` and put in eval mode in place).

    Raises:
        UsageError: a factory that cannot be imported or called, or that builds no ``nn.Module``
            (:func:`~comdefend.models.classifiers.import_classifier_factory`); a ``module`` that
            is not an ``nn.Module``.
        CheckpointError: an unreadable checkpoint.
    """
    from comdefend.models.classifiers import (
        import_classifier_factory,
        is_factory_reference,
        load_classifier,
    )

    if module is not None or is_factory_reference(reference):
        kind = "module" if module is not None else "factory"
        model = module if module is not None else import_classifier_factory(reference)
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"classifier must be a torch.nn.Module, a checkpoint path, a zoo name or "
                f"package.module:factory, got a {type(model).__name__}"
            )
        model = model.to(device).eval()
        info = ClassifierInfo(
            reference=reference, kind=kind, sha256=module_sha256(model), module=class_path(model)
        )
        return ResolvedClassifier(model, info)
    model = load_classifier(reference, device).eval()
    weights: WeightsRef | None = getattr(model, "weights", None)
    config = getattr(model, "config", None)
    info = ClassifierInfo(
        reference=reference,
        kind="checkpoint",
        sha256=weights.sha256 if weights is not None else None,
        module=class_path(model),
        weights=weights.to_dict() if weights is not None else None,
        config=config.to_dict() if config is not None else None,
        recorded_metrics=(getattr(model, "checkpoint_metadata", None) or {}).get("metrics", {}),
    )
    num_classes = getattr(config, "num_classes", None)
    return ResolvedClassifier(model, info, weights, num_classes)


class ModuleDefense(Defense):
    """A user's purifier module as a :class:`~comdefend.defenses.Defense`.

    The module maps NCHW float images in [0, 1] to images of the same shape. Its attributes
    ``differentiable`` (default ``True``; ``False`` makes the attacker use BPDA under ``bpda``)
    and ``randomized`` (default ``False``; ``True`` makes the evaluation draw it several times
    and the attacker use EOT under ``bpda+eot``) are read once. Randomness should come from
    torch's global generator, which the evaluation seeds per batch and draw.

    Args:
        module: the purifier.
        name: how its cells are labelled (unique in a run).

    Example:
        >>> defense = ModuleDefense(nn.AvgPool2d(3, 1, 1), "blur")
        >>> defense.name, defense(torch.rand(1, 1, 8, 8)).shape
        ('blur', torch.Size([1, 1, 8, 8]))
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module = module
        self._name = name
        self.differentiable = bool(getattr(module, "differentiable", True))
        self.randomized = bool(getattr(module, "randomized", False))

    @property
    def name(self) -> str:
        return self._name

    def params(self) -> dict[str, Any]:
        return {"module": class_path(self.module), "sha256": module_sha256(self.module)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def defense_label(module: nn.Module) -> str:
    """The name a defense module's cells get: a :class:`Defense`'s spec, a module's string
    ``name`` attribute, else its class name."""
    name = getattr(module, "name", None)
    if isinstance(name, str) and name.strip():
        return name.strip()
    return type(module).__name__


def as_defense(module: nn.Module, name: str) -> Defense:
    """``module`` itself when it is a :class:`Defense` named ``name``, else a
    :class:`ModuleDefense`."""
    if not isinstance(module, nn.Module):
        raise UsageError(
            f"a defense must be a spec string (e.g. jpeg:75) or a torch.nn.Module, got a "
            f"{type(module).__name__}"
        )
    if isinstance(module, Defense) and module.name == name:
        return module
    return ModuleDefense(module, name)


def check_defense_outputs(defense: nn.Module, images: torch.Tensor, label: str) -> None:
    """A user's defense on a probe batch: it must return finite floating-point images of the
    input's shape (UsageError, one line, otherwise)."""
    try:
        with torch.no_grad():
            purified = defense(images)
    except Exception as error:  # noqa: BLE001 - the user's module may raise anything
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
        raise UsageError(
            f"defense {label} failed on images of shape {tuple(images.shape)} (NCHW float in "
            f"[0, 1]): {reason}"
        ) from error
    if not isinstance(purified, torch.Tensor) or purified.shape != images.shape:
        got = tuple(purified.shape) if isinstance(purified, torch.Tensor) else type(purified)
        raise UsageError(
            f"defense {label} returned {got} for images of shape {tuple(images.shape)}; a "
            "defense returns images of the shape it is given"
        )
    if not purified.is_floating_point() or not bool(torch.isfinite(purified).all()):
        raise UsageError(f"defense {label} returned non-float, NaN or infinite images")


__all__ = [
    "PROBE_IMAGES",
    "ModuleDefense",
    "ResolvedClassifier",
    "as_defense",
    "check_defense_outputs",
    "class_path",
    "defense_label",
    "module_sha256",
    "resolve_classifier",
]
