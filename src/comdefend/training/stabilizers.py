"""Optional measures against the plain recipe's collapse, by name (``--stabilize NAME[,NAME]``).

The plain ComDefend recipe (Adam, constant learning rate, noise of std 20 before the code's
sigmoid) can collapse: the code logits grow without bound and the decoder's output sigmoid
saturates, after which every gradient is exactly zero (docs/notes/training-collapse.md). None
of the measures here changes what the model *is*: the architecture, the loss and the inference
path (the sign of the code logits decides each bit) stay the same; they only change how it is
trained.

Each measure is a registered :class:`Stabilizer`; ``NAME=VALUE`` overrides its default
strength. The resolved measures are a :class:`Stabilization`, recorded in the run's config and
in every checkpoint it writes.

Example:
    >>> from comdefend.training.stabilizers import parse_stabilizers
    >>> parse_stabilizers("clip-grad,adam-eps=1e-6")
    {'clip-grad': 1.0, 'adam-eps': 1e-06}
    >>> Stabilization.from_names({"clip-grad": 0.5}).clip_grad_norm
    0.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from comdefend.errors import UsageError
from comdefend.registry import Registry


@dataclass(frozen=True)
class Stabilization:
    """The resolved training measures (``None``: not used).

    Attributes:
        clip_grad_norm: rescale the gradient of all parameters together to at most this L2 norm
            before every optimizer step.
        code_bound: during training, code logits ``l`` enter the noisy sigmoid as
            ``B * tanh(l / B)``: bounded by ``B``, unchanged in sign (so every bit at inference is
            what the unbounded logit would give) and close to ``l`` while ``|l|`` is small.
        adam_eps: Adam's epsilon (PyTorch's default is 1e-8): a larger value damps the steps of
            parameters whose gradients have become tiny.
        cosine_decay: decay the learning rate along a half cosine to 0 over the run, on top of
            the recipe's schedule.
        warmup: raise the learning rate linearly from ``1/W`` of its value to all of it over
            the first ``W`` iterations (Adam's first steps move every weight by about the
            learning rate at once, whatever its gradient).
        logit_penalty: a bound ``B``: the loss gains ``mean((relu(|l| - B) / B)^2)`` over the
            code logits ``l``, a restoring force on logits beyond ``B`` (none inside it). Unlike
            ``code_bound`` it does not hide large logits from the sigmoid, it pulls them back;
            every bit is still the sign of its logit.
        rollback: when a held-out evaluation shows a collapse (or every gradient has been zero
            for a while), go back to the state of the last healthy evaluation (weights and
            optimizer) and go on with the learning rate times this factor; at most
            :data:`MAX_ROLLBACKS` times in a run.
        amsgrad: Adam's AMSGrad variant: each parameter's step is divided by the largest
            second-moment estimate seen so far instead of the running one, so a gradient that
            has become tiny (behind a saturated sigmoid) gives a tiny step, not a full one.
    """

    clip_grad_norm: float | None = None
    code_bound: float | None = None
    adam_eps: float | None = None
    cosine_decay: bool = False
    amsgrad: bool = False
    warmup: float | None = None
    logit_penalty: float | None = None
    rollback: float | None = None

    @classmethod
    def from_names(cls, chosen: dict[str, float]) -> Stabilization:
        """The measures ``{name: strength}`` (as returned by :func:`parse_stabilizers`)."""
        result = cls()
        for name, value in chosen.items():
            result = STABILIZERS.get(name).apply(result, value)
        return result

    def check_evaluations(self, heldout_images: int) -> None:
        """Refuse measures that act on held-out evaluations in a run that has none.

        ``rollback`` notices a collapse by the held-out PSNR and goes back to the last
        evaluation that was healthy: without held-out images it could never act.

        Args:
            heldout_images: test images of each held-out evaluation (0: none, as with
                ``--eval-images 0`` or an image folder, which has no test split).
        """
        if self.rollback is not None and heldout_images < 1:
            raise UsageError(
                "--stabilize rollback needs held-out evaluations (a collapse shows in their "
                "PSNR; it goes back to the last healthy one) but this run has none "
                "(--eval-images 0, or --dataset folder, which has no test split): give "
                "--eval-images N on a dataset with a test split, or leave rollback out"
            )

    def penalty(self, logits: torch.Tensor) -> torch.Tensor | None:
        """The logit penalty's loss term for the unbounded code ``logits`` (None if unused)."""
        if self.logit_penalty is None:
            return None
        bound = self.logit_penalty
        return torch.mean((torch.relu(logits.abs() - bound) / bound) ** 2)

    def optimizer(
        self, parameters: list[torch.nn.Parameter], lr: float, betas: tuple[float, float]
    ) -> torch.optim.Adam:
        """The Adam optimizer these measures ask for (epsilon, AMSGrad)."""
        eps = 1e-8 if self.adam_eps is None else self.adam_eps
        return torch.optim.Adam(parameters, lr=lr, betas=betas, eps=eps, amsgrad=self.amsgrad)

    def bound_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Training-time code logits after the bound (``logits`` itself without one)."""
        if self.code_bound is None:
            return logits
        return self.code_bound * torch.tanh(logits / self.code_bound)

    def lr_factor(self, iteration: int, total: int) -> float:
        """Factor on the recipe's learning rate at 0-based ``iteration`` of ``total``."""
        factor = 1.0
        if self.warmup is not None:
            factor = min(1.0, (iteration + 1) / self.warmup)
        if self.cosine_decay:
            factor *= 0.5 * (1.0 + math.cos(math.pi * iteration / max(1, total)))
        return factor

    def clip(self, parameters: list[torch.nn.Parameter]) -> float | None:
        """Clip the gradients in place; returns their norm before clipping (None if unused)."""
        if self.clip_grad_norm is None:
            return None
        return float(torch.nn.utils.clip_grad_norm_(parameters, self.clip_grad_norm))


@dataclass(frozen=True)
class Stabilizer:
    """One registered measure: its field of :class:`Stabilization` and default strength."""

    name: str
    field: str
    default: float
    description: str

    @property
    def is_switch(self) -> bool:
        """Whether the measure is only on or off (``amsgrad``, ``cosine-decay``): no value."""
        return isinstance(getattr(Stabilization(), self.field), bool)

    def apply(self, settings: Stabilization, value: float) -> Stabilization:
        """``settings`` with this measure at strength ``value`` (a switch's is its default).

        Raises:
            UsageError: a value given to a switch, a rollback factor outside (0, 1], any other
                value that is not finite or not > 0.
        """
        if self.is_switch:
            if value != self.default:
                raise UsageError(self.no_value_message(f"{value:g}"))
            changes_on: dict[str, Any] = {self.field: True}
            return replace(settings, **changes_on)
        if self.field == "rollback":
            if not 0 < value <= 1:  # NaN too
                raise UsageError(
                    f"--stabilize rollback={value:g}: the factor must lie in (0, 1] (the "
                    "learning rate is multiplied by it at each rollback)"
                )
        elif not math.isfinite(value):
            raise UsageError(
                f"--stabilize {self.name}={value:g}: the value must be a finite number"
            )
        elif value <= 0:
            raise UsageError(f"--stabilize {self.name}={value:g}: the value must be > 0")
        changes: dict[str, Any] = {self.field: float(value)}
        return replace(settings, **changes)

    def no_value_message(self, value: str) -> str:
        return (
            f"--stabilize {self.name}={value}: {self.name} is on or off: it takes no value "
            f"(write --stabilize {self.name})"
        )


#: Rollbacks allowed in one run (``rollback``); after that a collapse is only reported.
MAX_ROLLBACKS = 5

STABILIZERS: Registry[Stabilizer] = Registry("stabilizer")
for _entry in (
    Stabilizer(
        "clip-grad",
        "clip_grad_norm",
        1.0,
        "clip the global gradient norm before each step (value: the max norm, default 1)",
    ),
    Stabilizer(
        "code-bound",
        "code_bound",
        60.0,
        "train with code logits B*tanh(l/B) (value: B, default 60 = 3 noise stds); bits unchanged",
    ),
    Stabilizer(
        "adam-eps",
        "adam_eps",
        1e-4,
        "Adam's epsilon (value, default 1e-4; PyTorch's own is 1e-8)",
    ),
    Stabilizer(
        "cosine-decay",
        "cosine_decay",
        1.0,
        "multiply the learning rate by a half cosine from 1 to 0 over the run",
    ),
    Stabilizer(
        "warmup",
        "warmup",
        500.0,
        "raise the learning rate linearly over the first W iterations (value: W, default 500)",
    ),
    Stabilizer(
        "logit-penalty",
        "logit_penalty",
        60.0,
        "add mean((relu(|l|-B)/B)^2) of the code logits to the loss (value: B, default 60)",
    ),
    Stabilizer(
        "rollback",
        "rollback",
        0.5,
        "on a collapse, return to the last healthy evaluation's state and multiply the learning "
        "rate by the value (default 0.5)",
    ),
    Stabilizer(
        "amsgrad",
        "amsgrad",
        1.0,
        "Adam's AMSGrad variant: steps never grow when gradients vanish",
    ),
):
    STABILIZERS.add(_entry.name, _entry)


def parse_stabilizers(text: str | None) -> dict[str, float]:
    """``"clip-grad,code-bound=40"`` -> ``{"clip-grad": 1.0, "code-bound": 40.0}``.

    ``None``, ``""`` and ``"none"`` mean no measure (``none`` stands alone: it cannot be mixed
    with measures). Names are canonicalised and checked; switches (``amsgrad``,
    ``cosine-decay``) take no value.
    """
    if text is None or text.strip().lower() in ("", "none"):
        return {}
    chosen: dict[str, float] = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        if not name.strip():
            raise UsageError(f"--stabilize {text!r}: empty name")
        if name.strip().lower() == "none":
            raise UsageError(
                f"--stabilize {text!r}: 'none' turns every measure off, so it stands alone "
                "(--stabilize none); to use measures, name only them"
            )
        entry = STABILIZERS.get(name)
        if entry.is_switch and equals:
            raise UsageError(entry.no_value_message(value.strip()))
        try:
            strength = float(value) if value.strip() else entry.default
        except ValueError:
            raise UsageError(f"--stabilize {item!r}: {value!r} is not a number") from None
        if entry.name in chosen:
            raise UsageError(f"--stabilize names {entry.name} twice")
        entry.apply(Stabilization(), strength)  # checks the value
        chosen[entry.name] = strength
    return chosen


__all__ = ["MAX_ROLLBACKS", "STABILIZERS", "Stabilization", "Stabilizer", "parse_stabilizers"]
