"""Crafting adversarial examples for one (attack, eps, attacker model) on a set of batches."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from comdefend.attacks import ATTACKS, make_attack
from comdefend.defenses import ComDefendDefense
from comdefend.evaluation.seeding import Batches, batch_seed, derive_seed


def comdefend_parts(module: nn.Module) -> list[ComDefendDefense]:
    """The ComDefend defenses inside ``module`` (in module order)."""
    return [m for m in module.modules() if isinstance(m, ComDefendDefense)]


def craft(
    name: str,
    eps: float | None,
    model: nn.Module,
    key: tuple[Any, ...],
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: Batches,
    numbers: list[int],
    seed: int,
    params: dict[str, Any],
    num_classes: int | None,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Adversarial versions of the images of batches ``numbers`` against ``model``.

    Every batch starts from seeds derived from (``seed``, ``key``, batch number): PyTorch's
    global RNG and the noise streams of the attacker's ComDefend views (randomized defenses
    under bpda, bpda+eot or relaxed). Batch 0 uses the seeds a whole run used before seeds were
    per batch.

    Args:
        name: attack name (:data:`comdefend.attacks.ATTACKS`).
        eps: L-inf budget in [0, 1], or ``None`` for minimum-norm attacks.
        model: what the attacker differentiates (images to logits).
        key: names the computation, e.g. ``("pgd", 8.0)`` or ``("pgd", 8.0, spec, "bpda")``.
        x, y: all evaluated images and labels (CPU).
        batches: how the images are cut; ``numbers``: the batches to craft.
        seed: the run's master seed (also the attack's own ``seed``).
        params: the attack's extra hyper-parameters.
        num_classes: passed to attacks that take it, unless ``params`` sets it.
        device: where the attack runs.

    Returns:
        The adversarial images of the batches in order (CPU), and the attack's settings.
    """
    kwargs = dict(params)
    accepted = inspect.signature(ATTACKS[name].__init__).parameters
    if "num_classes" in accepted and "num_classes" not in kwargs and num_classes:
        kwargs["num_classes"] = num_classes
    views = [part for part in comdefend_parts(model) if part.seed is not None]
    first_seeds = [part.seed for part in views]
    torch.manual_seed(derive_seed(seed, "attack", *key))
    attack = make_attack(name, model, eps, seed=seed, **kwargs)
    outputs = []
    for number in numbers:
        torch.manual_seed(batch_seed(seed, ("attack", *key), number))
        for index, (part, first) in enumerate(zip(views, first_seeds, strict=True)):
            part.reseed(
                first if number == 0 else derive_seed(seed, "attacker noise", *key, number, index)
            )
        part_slice = batches.slice(number)
        outputs.append(attack(x[part_slice].to(device), y[part_slice].to(device)).cpu())
    adversarial = torch.cat(outputs) if outputs else x[:0].clone()
    return adversarial, attack.settings()
