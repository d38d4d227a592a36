"""Named training recipes for ComDefend: ``comdefend train --recipe NAME``.

A recipe is a :class:`Recipe` dataclass of training settings, registered in :data:`RECIPES`.
Flags given on the command line override a recipe's fields; the run's config records the
recipe's name and every resolved field, and so does every checkpoint the run writes.

- ``residual-study`` (the default): the residual-variant study's schedule, 7,500 iterations
  (3 CIFAR-10 epochs) of batch 20, Adam lr 1e-3 constant (its ``piecewise`` and
  ``exponential`` schedules start at 1e-2: pass ``--lr-schedule``), noise std 20,
  lambda 1e-4.
- ``authors``: the authors' TensorFlow script, which produced their released CIFAR-10 model:
  one epoch of CIFAR-10 = 2,500 iterations of batch 20, Adam with TensorFlow's defaults (lr 1e-3,
  betas 0.9/0.999, eps 1e-8), constant, noise std 20, lambda 1e-4.
- ``authors-torch``: the authors' later PyTorch script: 10 epochs of batch 128, Adam lr 1e-2 with
  betas (0.5, 0.999), noise std 20, lambda 1e-4. Their script feeds images in [0, 1] without
  the -0.5 shift that ComCNN applies; the shift is part of this package's architecture (and of
  the authors' released weights), so the recipe keeps it. Without padding the two would be the
  same network up to the first layer's bias; with zero padding they differ only in the border
  pixels' padding value (0 vs 0.5 in image units). The authors trained it on SVHN; here the
  dataset is whatever ``--dataset`` says (CIFAR-10 by default). With this optimizer the plain
  model was dead (output saturated, every gradient 0) within 20 iterations on the collapse
  proxy of docs/notes/training-collapse.md (Fashion-MNIST crops, batch 20); no stabilizer
  measured there fixed it.

No recipe turns on a stabilizer: they are faithful to their sources. ``--stabilize`` adds one.

Example:
    >>> from comdefend.training.recipes import RECIPES, resolve_config
    >>> RECIPES.names()
    ['residual-study', 'authors', 'authors-torch']
    >>> config = resolve_config("authors", out="runs/a", batch_size=10)
    >>> config.iterations, config.batch_size, config.recipe
    (2500, 10, 'authors')
    >>> resolve_config("residual-study", out="runs/s", precision="bf16").precision
    'bf16'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from comdefend.errors import UsageError
from comdefend.registry import Registry
from comdefend.training.stabilizers import parse_stabilizers
from comdefend.training.trainer import TrainConfig

DEFAULT_RECIPE = "residual-study"


@dataclass(frozen=True)
class Recipe:
    """Training settings with a name and a source. ``epochs`` (if set) is converted to
    iterations with the training set's size: ``round(epochs * (images // batch_size))``.

    Attributes:
        lr: None means the schedule's default (1e-3 constant, 1e-2 for the study's decays).
        stabilize: ``--stabilize`` text (empty: none).
    """

    name: str
    description: str
    source: str
    dataset: str = "cifar10"
    preset: str = "plain"
    iterations: int | None = 7500
    epochs: float | None = None
    batch_size: int = 20
    lr: float | None = None
    lr_schedule: str = "constant"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    noise_std: float = 20.0
    code_penalty: float = 1e-4
    stabilize: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPES: Registry[Recipe] = Registry("recipe")
RECIPES.add(
    "residual-study",
    Recipe(
        "residual-study",
        "the residual-variant study: 7,500 iterations (3 epochs) of batch 20, Adam 1e-3",
        "PAPER.md, residual-variant study",
    ),
)
RECIPES.add(
    "authors",
    Recipe(
        "authors",
        "the authors' TF script (their released model): 1 CIFAR-10 epoch = 2,500 iterations",
        "PAPER.md, the authors' TensorFlow training script",
        iterations=2500,
        lr=1e-3,
    ),
    aliases=("authors-tf",),
)
RECIPES.add(
    "authors-torch",
    Recipe(
        "authors-torch",
        "the authors' PyTorch script: 10 epochs of batch 128, Adam 1e-2, betas (0.5, 0.999)",
        "PAPER.md, the authors' PyTorch training script (SVHN there)",
        iterations=None,
        epochs=10,
        batch_size=128,
        lr=1e-2,
        adam_beta1=0.5,
    ),
)

RECIPE_FIELDS = tuple(
    f.name for f in fields(Recipe) if f.name not in ("name", "description", "source")
)


def resolve_config(recipe: str = DEFAULT_RECIPE, **settings: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a recipe, overridden by every setting that is not None.

    Args:
        recipe: a registered recipe name (or alias).
        **settings: :class:`TrainConfig` fields, plus ``epochs`` (converted to iterations) and
            ``stabilize`` as text (``"clip-grad,code-bound=40"``). ``None`` keeps the recipe's.

    Raises:
        UsageError: unknown recipe or setting, ``iterations`` and ``epochs`` both given, or a
            bad value.
    """
    entry = RECIPES.get(recipe)
    given = {k: v for k, v in settings.items() if v is not None}
    known = {f.name for f in fields(TrainConfig)} | {"epochs"}
    unknown = sorted(set(given) - known)
    if unknown:
        raise UsageError(f"unknown training setting(s): {', '.join(unknown)}")
    if "iterations" in given and "epochs" in given:
        raise UsageError("pass --iterations or --epochs, not both")
    values = {name: getattr(entry, name) for name in RECIPE_FIELDS}
    if "iterations" in given:
        values["epochs"] = None
    if "epochs" in given:
        values["iterations"] = None
    values.update(given)
    epochs = values.pop("epochs")
    if values["iterations"] is None:
        values["iterations"] = iterations_for_epochs(
            epochs, values["dataset"], values["batch_size"], values.get("data_dir")
        )
    if isinstance(values["stabilize"], str):
        values["stabilize"] = parse_stabilizers(values["stabilize"])
    return TrainConfig(recipe=entry.name, **values)


def iterations_for_epochs(
    epochs: float, dataset: str, batch_size: int, data_dir: str | None = None
) -> int:
    """``round(epochs * (training images // batch_size))``: the last partial batch is dropped."""
    from comdefend.data.datasets import DATASETS, load_dataset

    if not epochs or epochs <= 0:
        raise UsageError(f"--epochs must be > 0, got {epochs}")
    if dataset not in DATASETS:
        raise UsageError("epochs need a fixed-size dataset; use --iterations for folders")
    if batch_size < 1:
        raise UsageError(f"batch-size must be >= 1, got {batch_size}")
    size = len(load_dataset(dataset, "train", data_dir))
    return max(1, round(epochs * (size // batch_size)))


__all__ = ["DEFAULT_RECIPE", "RECIPES", "Recipe", "iterations_for_epochs", "resolve_config"]
