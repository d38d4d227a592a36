"""L-inf gradient-sign attacks: FGSM, BIM (I-FGSM), PGD (with restarts) and MI-FGSM.

All four maximise the cross-entropy of the true label inside the ball
``{x' : |x' - x|_inf <= eps, 0 <= x' <= 1}``. Every returned example satisfies
``|x_adv - x|_inf <= eps`` (up to float rounding) and ``eps = 0`` returns ``x`` exactly.

A model whose input gradient is exactly zero (a defense with a hard threshold, JPEG or bit-depth
reduction inside it) raises :class:`~comdefend.attacks.ZeroGradientError` at the first step
instead of returning ``x`` unchanged: attack
``make_threat_model_defense(defense, "bpda", classifier)`` instead (see :mod:`comdefend.attacks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from comdefend.attacks.base import Attack, check_bool, check_int, check_linf_eps, check_real
from comdefend.errors import UsageError


def project_linf(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto the L-inf ball of radius ``eps`` around ``x``, then onto [0, 1].

    Example:
        >>> x = torch.full((1, 1, 1, 2), 0.5)
        >>> project_linf(x + torch.tensor([0.3, -0.01]).view(1, 1, 1, 2), x, 0.1).flatten()
        tensor([0.6000, 0.4900])
    """
    return (x + (x_adv - x).clamp(-eps, eps)).clamp(0.0, 1.0)


def uniform_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """A uniform random point of the L-inf ball of radius ``eps`` around ``x``, clipped to [0, 1].

    The noise is drawn on the CPU ``generator`` and moved to ``x``'s device (same draws on CPU
    and CUDA).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    noise = torch.rand(x.shape, generator=generator, dtype=dtype)
    noise = (2.0 * noise - 1.0).to(device=x.device, dtype=x.dtype)
    return project_linf(x + eps * noise, x, eps)


def check_restarts(random_start: Any, restarts: Any) -> tuple[bool, int]:
    """Validate ``random_start`` (a bool) and ``restarts`` (>= 1; > 1 needs a random start)."""
    random_start = check_bool("random_start", random_start)
    restarts = check_int("restarts", restarts)
    if restarts > 1 and not random_start:
        raise UsageError("restarts > 1 needs random_start=True (restarts would be identical)")
    return random_start, restarts


class _LinfAttack(Attack):
    norm = "linf"

    def __init__(self, model: nn.Module, eps: float, *, seed: int = 0) -> None:
        super().__init__(model, seed=seed)
        self.eps = check_linf_eps(eps)

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.eps == 0.0:
            return x.clone()
        return self._run(x, y)

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _IterativeLinfAttack(_LinfAttack):
    """The loop BIM, PGD and MI-FGSM share: ``steps`` signed steps of size ``alpha``, each
    projected onto the ``eps`` ball, optionally leaving every image at its first fooling iterate.
    """

    steps: int
    alpha: float

    def __init__(
        self, model: nn.Module, eps: float, *, stop_when_fooled: Any = False, seed: int = 0
    ) -> None:
        super().__init__(model, eps, seed=seed)
        self.stop_when_fooled = check_bool("stop_when_fooled", stop_when_fooled)

    def _descend(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor,
        direction: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        """Take the steps from ``x_adv``; ``direction(grad, rows)`` turns the loss gradient of
        ``rows`` (``None``: every row) into the step direction (its sign is taken).

        With :attr:`stop_when_fooled`, each step first drops the images the model already
        misclassifies (read from the same forward pass as the gradient, so it costs nothing):
        they keep that iterate, and the rest of the loop runs on fewer images.
        """
        if not self.stop_when_fooled:
            for _ in range(self.steps):
                grad, _ = self._loss_grad(x_adv, y)
                step = self.alpha * direction(grad, None).sign()
                x_adv = project_linf(x_adv + step, x, self.eps)
            return x_adv
        x_adv = x_adv.clone()
        rows = torch.arange(x.shape[0], device=x.device)
        for _ in range(self.steps):
            grad, logits = self._loss_grad(x_adv[rows], y[rows])
            correct = logits.argmax(dim=1) == y[rows]
            rows, grad = rows[correct], grad[correct]
            if rows.numel() == 0:
                break
            step = self.alpha * direction(grad, rows).sign()
            x_adv[rows] = project_linf(x_adv[rows] + step, x[rows], self.eps)
        return x_adv


class FGSM(_LinfAttack):
    r"""Fast Gradient Sign Method (Goodfellow et al., 2015): one step of size ``eps``.

    :math:`x_{adv} = \mathrm{clip}_{[0,1]}(x + \epsilon \cdot \mathrm{sign}(\nabla_x
    \mathcal{L}_{CE}(f(x), y)))`.

    Args:
        model: classifier mapping images in [0, 1] to logits.
        eps: L-inf budget in [0, 1] (pixel scale 0..1, so 8/255 is the usual CIFAR budget).
        seed: unused (FGSM is deterministic); kept for a uniform API.

    Shape:
        - x: :math:`(N, C, H, W)` in [0, 1]; y: :math:`(N,)` int64
        - output: :math:`(N, C, H, W)` in [0, 1]

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> x_adv = FGSM(model, eps=8 / 255)(x, y)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
        True
    """

    name = "fgsm"

    def __init__(self, model: nn.Module, eps: float = 8 / 255, *, seed: int = 0) -> None:
        super().__init__(model, eps, seed=seed)

    def _hyperparameters(self) -> dict[str, Any]:
        return {"eps": self.eps}

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        grad, _ = self._loss_grad(x, y)
        return project_linf(x + self.eps * grad.sign(), x, self.eps)


class BIM(_IterativeLinfAttack):
    r"""Basic Iterative Method / I-FGSM (Kurakin et al., 2017): FGSM steps of size ``alpha``.

    Starts at ``x`` (no random start); after every step the iterate is projected back onto the
    ``eps`` ball and [0, 1]. Returns the last iterate.

    Args:
        model: classifier mapping images in [0, 1] to logits.
        eps: L-inf budget in [0, 1].
        alpha: step size. ``None`` (default) means ``2.5 * eps / steps``, the rule of thumb of
            Madry et al.'s ``robustness`` library: the steps can travel 2.5 times the radius,
            enough to reach the boundary and move along it. With the defaults (``eps = 8/255``,
            10 steps) this is 2/255, torchattacks' default; with ``steps = 1`` it is clipped to
            the ball and BIM reduces to FGSM.
        steps: number of iterations (>= 1).
        stop_when_fooled: leave each image at its first iterate the model misclassifies
            (checked on every step's forward pass; the last iterate is returned unchecked)
            instead of stepping on. Only ever lowers the accuracy on the attacked model, and
            saves the steps of images already fooled (those the model gets wrong to begin with
            take none): use it when the attacked model is the evaluated one (a BPDA or EOT view
            of the defense), not to craft transfer examples on an undefended classifier.
        seed: unused (BIM is deterministic); kept for a uniform API.

    Shape:
        - x: :math:`(N, C, H, W)` in [0, 1]; y: :math:`(N,)` int64
        - output: :math:`(N, C, H, W)` in [0, 1]

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> BIM(model, eps=8 / 255).alpha == 2 / 255
        True
    """

    name = "bim"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        stop_when_fooled: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps, stop_when_fooled=stop_when_fooled, seed=seed)
        self.steps = check_int("steps", steps)
        self.alpha = (
            2.5 * self.eps / self.steps if alpha is None else check_real("alpha", alpha, low=0.0)
        )

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "stop_when_fooled": self.stop_when_fooled,
        }

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._descend(x, y, x.clone(), lambda grad, rows: grad)


class PGD(_IterativeLinfAttack):
    r"""Projected Gradient Descent, L-inf (Madry et al., 2018), with random restarts.

    Each restart starts at a uniform random point of the ``eps`` ball (clipped to [0, 1]) when
    ``random_start`` is True, takes ``steps`` signed-gradient steps of size ``alpha`` with
    projection, and ends at its last iterate. Across restarts each example keeps the first
    iterate that is misclassified; if none is, the one with the highest cross-entropy.

    Args:
        model: classifier mapping images in [0, 1] to logits.
        eps: L-inf budget in [0, 1].
        alpha: step size (>= 0). ``None`` (default) means ``2.5 * eps / steps`` (as for
            :class:`BIM`): 2/255 with the default ``eps = 8/255`` and 10 steps, torchattacks'
            default, but unlike a fixed 2/255 it still lets the steps cross the whole ball
            when ``eps`` or ``steps`` change.
        steps: iterations per restart (>= 1).
        random_start: start from a uniform random point of the ball instead of ``x``.
        restarts: number of runs (>= 1); more than one needs ``random_start``.
        stop_when_fooled: leave each image at its first fooling iterate (see :class:`BIM`).
        seed: seed of the random starts.

    Shape:
        - x: :math:`(N, C, H, W)` in [0, 1]; y: :math:`(N,)` int64
        - output: :math:`(N, C, H, W)` in [0, 1]

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> attack = PGD(model, eps=8 / 255, steps=5, restarts=2, seed=1)
        >>> torch.equal(attack(x, y), attack(x, y))
        True
    """

    name = "pgd"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        restarts: int = 1,
        stop_when_fooled: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps, stop_when_fooled=stop_when_fooled, seed=seed)
        self.steps = check_int("steps", steps)
        self.alpha = (
            2.5 * self.eps / self.steps if alpha is None else check_real("alpha", alpha, low=0.0)
        )
        self.random_start, self.restarts = check_restarts(random_start, restarts)

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "random_start": self.random_start,
            "restarts": self.restarts,
            "stop_when_fooled": self.stop_when_fooled,
        }

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator = self._generator()
        best = x
        best_fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
        for restart in range(self.restarts):
            x_adv = self._one_run(x, y, generator)
            if self.restarts == 1:
                return x_adv
            with torch.no_grad():
                logits = self._forward(x_adv)
            fooled = logits.argmax(dim=1) != y
            loss = F.cross_entropy(logits.float(), y, reduction="none")
            if restart == 0:
                take = torch.ones_like(fooled)
            else:
                take = ~best_fooled & (fooled | (loss > best_loss))
            best = torch.where(take.view(-1, 1, 1, 1), x_adv, best)
            best_fooled = best_fooled | fooled
            best_loss = torch.where(take, loss, best_loss)
            if bool(best_fooled.all()):
                break
        return best

    def _one_run(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        start = uniform_start(x, self.eps, generator) if self.random_start else x.clone()
        return self._descend(x, y, start, lambda grad, rows: grad)


class MIFGSM(_IterativeLinfAttack):
    r"""Momentum Iterative FGSM (Dong et al., 2018), untargeted.

    Accumulates, per example, ``g <- decay * g + grad / mean(|grad|)`` (the gradient normalised
    by its L1 norm; dividing by the mean instead of the sum only rescales every term by the
    same constant, which the sign ignores) and steps ``alpha * sign(g)``, projecting onto the
    ``eps`` ball and [0, 1]. Starts at ``x``; returns the last iterate.

    Args:
        model: classifier mapping images in [0, 1] to logits.
        eps: L-inf budget in [0, 1].
        alpha: step size; ``None`` (default) means ``eps / steps`` as in the paper, so the
            steps add up to exactly ``eps``.
        steps: number of iterations (>= 1).
        decay: momentum decay factor ``mu`` (>= 0; 0 gives I-FGSM).
        stop_when_fooled: leave each image at its first fooling iterate (see :class:`BIM`).
        seed: unused (MI-FGSM is deterministic); kept for a uniform API.

    Shape:
        - x: :math:`(N, C, H, W)` in [0, 1]; y: :math:`(N,)` int64
        - output: :math:`(N, C, H, W)` in [0, 1]

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> MIFGSM(model, eps=0.1, steps=4).alpha
        0.025
    """

    name = "mifgsm"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        decay: float = 1.0,
        stop_when_fooled: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps, stop_when_fooled=stop_when_fooled, seed=seed)
        self.steps = check_int("steps", steps)
        self.alpha = self.eps / self.steps if alpha is None else check_real("alpha", alpha, low=0.0)
        self.decay = check_real("decay", decay, low=0.0)

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "alpha": self.alpha,
            "steps": self.steps,
            "decay": self.decay,
            "stop_when_fooled": self.stop_when_fooled,
        }

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        momentum = torch.zeros_like(x)

        def direction(grad: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
            nonlocal momentum
            l1 = grad.abs().mean(dim=(1, 2, 3), keepdim=True)
            normalised = grad / l1.clamp_min(torch.finfo(grad.dtype).tiny)
            if rows is None:
                momentum = self.decay * momentum + normalised
                return momentum
            momentum[rows] = self.decay * momentum[rows] + normalised
            return momentum[rows]

        return self._descend(x, y, x.clone(), direction)
