"""Scoring: the defended classifier ``classifier(defense(x))`` on images, and a cell's numbers.

:class:`Scorer` purifies and classifies the images of some batches and returns per-image
:class:`~comdefend.evaluation.records.DefenseScores`. Deterministic defenses are scored in
batches sized for the device and the images (:func:`scoring_batch_size`; purification gives the
same numbers at any batch size) and images an attack left unchanged are not purified again: their
clean result is reused. Randomized defenses are scored per attack batch, with noise seeded per
(defense, draw, batch), so clean and adversarial evaluations see the same noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from comdefend.defenses import Defense
from comdefend.evaluation.crafting import comdefend_parts
from comdefend.evaluation.records import DefenseScores
from comdefend.evaluation.seeding import Batches, derive_seed
from comdefend.metrics import mse_per_image, psnr_from_mse, quantize_8bit

#: Pixels (height x width, all images of a batch) purified at once: 100 images of 32x32 on a CPU.
CPU_PIXELS_PER_BATCH = 100 * 32 * 32
#: The same on a GPU: 4,096 images of 32x32, 80 of 224x224.
GPU_PIXELS_PER_BATCH = 4096 * 32 * 32


def scoring_batch_size(device: torch.device, height: int, width: int) -> int:
    """Images per purification call for deterministic defenses on ``device``.

    Example:
        >>> cpu = torch.device("cpu")
        >>> scoring_batch_size(cpu, 28, 28), scoring_batch_size(cpu, 224, 224)
        (130, 2)
    """
    budget = GPU_PIXELS_PER_BATCH if device.type == "cuda" else CPU_PIXELS_PER_BATCH
    return max(1, budget // max(1, height * width))


class Scorer:
    """Purify-and-classify for every defense of a run.

    Args:
        classifier: images to logits (eval mode, no gradients needed).
        defenses: the evaluated defenses; ``specs`` their names (they key the noise seeds).
        x, y: all evaluated images (CPU, [0, 1]) and labels.
        batches: the attack batches (randomized defenses are scored per batch).
        seed: the run's master seed; ``draws``: evaluation draws of randomized defenses.
        device: where to compute.
    """

    def __init__(
        self,
        classifier: nn.Module,
        defenses: list[Defense],
        specs: list[str],
        x: torch.Tensor,
        y: torch.Tensor,
        batches: Batches,
        seed: int,
        draws: int,
        device: torch.device,
    ) -> None:
        self.classifier = classifier
        self.defenses = defenses
        self.specs = specs
        self.x = x
        self.y = y
        self.batches = batches
        self.seed = seed
        self.eot_draws = draws
        self.device = device
        self.batch_size = scoring_batch_size(device, x.shape[-2], x.shape[-1])
        self.original_seeds = [[p.seed for p in comdefend_parts(d)] for d in defenses]
        self.purified_images = 0  # images purified so far (all defenses and draws)
        self.reused_images = 0  # adversarial images equal to their clean version, not purified

    def draws(self, index: int) -> int:
        return self.eot_draws if self.defenses[index].randomized else 1

    def reseed(self, index: int, draw: int, batch: int) -> None:
        """Seed defense ``index``'s noise (and PyTorch's global RNG) for (draw, batch)."""
        key = ("defense", self.specs[index], draw, batch)
        torch.manual_seed(derive_seed(self.seed, *key))
        for part_index, part in enumerate(comdefend_parts(self.defenses[index])):
            if part.seed is not None:
                part.reseed(derive_seed(self.seed, *key, part_index))

    def restore_seeds(self) -> None:
        """Give every defense its own seed back (as loaded)."""
        for defense, seeds in zip(self.defenses, self.original_seeds, strict=True):
            for part, seed in zip(comdefend_parts(defense), seeds, strict=True):
                part.reseed(seed)

    def _score(self, index: int, images: torch.Tensor, positions: torch.Tensor) -> tuple:
        purified = self.defenses[index](images.to(self.device))
        self.purified_images += int(images.shape[0])
        correct = self.classifier(purified).argmax(1).cpu() == self.y[positions]
        clean = quantize_8bit(self.x[positions].double())
        return correct, mse_per_image(quantize_8bit(purified.cpu().double()), clean)

    @torch.inference_mode()
    def score(
        self,
        index: int,
        images: torch.Tensor,
        numbers: list[int],
        clean: DefenseScores | None = None,
    ) -> DefenseScores:
        """Defense ``index`` then the classifier on ``images``, the images of batches
        ``numbers`` (in order).

        Args:
            clean: this defense's scores of the same clean images; where given, images equal to
                their clean version reuse it (deterministic defenses only).
        """
        positions = self.batches.indices(numbers)
        draws = self.draws(index)
        correct = torch.zeros(draws, len(positions), dtype=torch.bool)
        mse = torch.zeros(draws, len(positions), dtype=torch.float64)
        if self.defenses[index].randomized:
            for draw in range(draws):
                start = 0
                for number in numbers:
                    size = len(range(*self.batches.slice(number).indices(self.batches.n)))
                    part = slice(start, start + size)
                    self.reseed(index, draw, number)
                    correct[draw, part], mse[draw, part] = self._score(
                        index, images[part], positions[part]
                    )
                    start += size
        else:
            todo = torch.arange(len(positions))
            if clean is not None:
                if not torch.equal(clean.indices, positions):
                    raise ValueError("clean scores of other images")
                same = (images == self.x[positions]).flatten(1).all(dim=1)
                correct[0, same], mse[0, same] = clean.correct[0, same], clean.mse[0, same]
                todo = todo[~same]
                self.reused_images += int(same.sum())
            if numbers:
                self.reseed(index, 0, numbers[0])
            for start in range(0, len(todo), self.batch_size):
                chosen = todo[start : start + self.batch_size]
                correct[0, chosen], mse[0, chosen] = self._score(
                    index, images[chosen], positions[chosen]
                )
        self.restore_seeds()
        return DefenseScores(positions, correct, mse)

    @torch.inference_mode()
    def purified_sample(self, index: int, images: torch.Tensor) -> torch.Tensor:
        """Defense ``index`` on a few images (the report's grid), seeded as draw 0, batch 0."""
        self.reseed(index, 0, 0)
        out = self.defenses[index](images.to(self.device)).cpu()
        self.restore_seeds()
        return out


def accuracy_stats(correct: torch.Tensor) -> tuple[float, float]:
    """Mean over draws of the per-draw accuracy, and its standard deviation over draws."""
    per_draw = correct.double().mean(dim=1)
    std = float(per_draw.std(unbiased=False)) if per_draw.numel() > 1 else 0.0
    return float(per_draw.mean()), std


def success_rate(clean: torch.Tensor, adversarial: torch.Tensor) -> float | None:
    """Fraction of the images classified correctly when clean that the attack flips (mean over
    draws)."""
    rates = []
    for c0, c1 in zip(clean, adversarial, strict=True):
        total = int(c0.sum())
        if total:
            rates.append(int((c0 & ~c1).sum()) / total)
    return sum(rates) / len(rates) if rates else None


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def perturbation_norms(x: torch.Tensor, x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image L2 and L-inf norms (float64) of ``x_adv - x``."""
    delta = (x_adv - x).flatten(1).double()
    return delta.norm(dim=1), delta.abs().amax(dim=1)


def cell_metrics(
    clean: DefenseScores, adversarial: DefenseScores, l2: torch.Tensor, linf: torch.Tensor
) -> dict[str, Any]:
    """A cell's numbers (``results.json``) from the per-image records of all its images."""
    robust, robust_std = accuracy_stats(adversarial.correct)
    clean_accuracy, clean_std = accuracy_stats(clean.correct)
    return {
        "clean_accuracy": clean_accuracy,
        "clean_accuracy_std": clean_std,
        "robust_accuracy": robust,
        "robust_accuracy_std": robust_std,
        "attack_success_rate": success_rate(clean.correct, adversarial.correct),
        "mean_l2": float(l2.mean()),
        "mean_linf": float(linf.mean()),
        "psnr_purified_db": finite_or_none(psnr_from_mse(float(adversarial.mse.mean()))),
        "n": int(l2.shape[0]),
        "draws": int(adversarial.correct.shape[0]),
    }
