r"""Auto-PGD, L-inf (Croce & Hein, ICML 2020), with cross-entropy and DLR losses and EOT.

Reference:
    F. Croce, M. Hein, "Reliable evaluation of adversarial robustness with an ensemble of
    diverse parameter-free attacks", ICML 2020 (arXiv:2003.01690). APGD-CE and APGD-DLR are
    the two white-box attacks of AutoAttack, RobustBench's standard evaluation.

Written from the paper's Algorithm 1 and Section 3:

* step size :math:`\eta^{(0)} = 2\epsilon` per example; first step a plain projected
  signed-gradient step, then
  :math:`z^{(k+1)} = P_S(x^{(k)} + \eta^{(k)} \operatorname{sign}\nabla f(x^{(k)}))` and
  :math:`x^{(k+1)} = P_S(x^{(k)} + \alpha (z^{(k+1)} - x^{(k)})
  + (1 - \alpha)(x^{(k)} - x^{(k-1)}))` with momentum :math:`\alpha = 0.75`;
* checkpoints :math:`w_j = \lceil p_j N_{iter} \rceil` with :math:`p_0 = 0`, :math:`p_1 = 0.22`,
  :math:`p_{j+1} = p_j + \max(p_j - p_{j-1} - 0.03, 0.06)`;
* at a checkpoint an example's step size is halved and its iterate restarts from the best
  point found so far when (1) its loss increased in fewer than :math:`\rho = 0.75` of the steps
  since the previous checkpoint, or (2) its step size was not reduced at the previous
  checkpoint and its best loss has not improved since;
* DLR loss :math:`-(z_y - \max_{i \ne y} z_i) / (z_{\pi_1} - z_{\pi_3} + 10^{-12})`
  (:math:`\pi` sorts the logits in decreasing order; needs at least 3 classes), invariant to
  shifting and rescaling the logits.

EOT (Athalye et al. 2018) for randomized defenses: with ``eot_iter`` > 1 every gradient is the
mean of ``eot_iter`` gradients of independent forward passes, and the loss and logits used for
the step-size rule and for success are their means.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from comdefend.attacks.base import check_bool, check_int, check_real
from comdefend.attacks.linf import _LinfAttack, check_restarts, project_linf, uniform_start
from comdefend.errors import UsageError

ApgdLoss = Literal["ce", "dlr"]


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step size: :math:`\\lceil p_j N \\rceil`, j >= 1.

    Example:
        >>> apgd_checkpoints(100)
        [22, 41, 57, 70, 80, 87, 93, 99]
    """
    points: list[int] = []
    previous, current = 0.0, 0.22
    while current <= 1.0:
        w = math.ceil(current * steps - 1e-9)
        if w >= 1 and (not points or w > points[-1]):
            points.append(w)
        previous, current = current, current + max(current - previous - 0.03, 0.06)
    return points


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example untargeted DLR loss (higher = closer to misclassification).

    Example:
        >>> dlr_loss(torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([0]))
        tensor([-0.6667])
    """
    if logits.shape[1] < 3:
        raise UsageError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    ranked = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y.view(-1, 1)).squeeze(1)
    other = logits.scatter(1, y.view(-1, 1), float("-inf")).amax(dim=1)
    return -(true - other) / (ranked[:, 0] - ranked[:, 2] + 1e-12)


class APGD(_LinfAttack):
    r"""APGD-CE: Auto-PGD on the cross-entropy loss, L-inf (Croce & Hein, 2020).

    A budget-aware PGD without a step size to tune: momentum 0.75, step size halved at
    checkpoints when progress stalls (see :mod:`comdefend.attacks.apgd`). Each run starts at a
    uniform random point of the ``eps`` ball (or at ``x`` with ``random_start=False``); with
    ``restarts`` > 1 the examples not yet misclassified are attacked again from a new random
    start. Per example it returns a misclassified iterate if one was found (the last one of the
    run that found it, or its first with ``stop_when_fooled``), else the iterate with the highest
    loss.

    Args:
        model: classifier mapping images in [0, 1] to logits (for a defended model: the
            attacker's view, e.g. ``make_threat_model_defense(defense, "bpda", classifier)``).
        eps: L-inf budget in [0, 1].
        steps: iterations per run, :math:`N_{iter}` (>= 1; 100 in AutoAttack).
        restarts: runs (>= 1); more than one needs ``random_start``.
        rho: the fraction of loss increases between checkpoints below which the step size is
            halved (0.75 in the paper).
        momentum: :math:`\alpha`, weight of the new step against the previous one (0.75).
        eot_iter: gradients averaged per step (EOT); > 1 only helps against randomized
            defenses and costs that many passes per step.
        random_start: start from a uniform random point of the ball instead of ``x``.
        stop_when_fooled: leave each image at its first misclassified iterate instead of
            running on (the run continues on the other images only, as it would without
            it). Only ever lowers the accuracy on the attacked
            model and saves the steps of images already fooled: use it when the attacked
            model is the evaluated one (a BPDA or EOT view of the defense), not to craft
            transfer examples on an undefended classifier.
        seed: seed of the random starts.

    Shape:
        - x: :math:`(N, C, H, W)` in [0, 1]; y: :math:`(N,)` int64
        - output: :math:`(N, C, H, W)` in [0, 1]

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> x_adv = APGD(model, eps=8 / 255, steps=10)(x, y)
        >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
        True
    """

    name = "apgd-ce"
    loss: ClassVar[ApgdLoss] = "ce"

    def __init__(
        self,
        model: nn.Module,
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        momentum: float = 0.75,
        eot_iter: int = 1,
        random_start: bool = True,
        stop_when_fooled: bool = False,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(model, eps, seed=seed)
        self.stop_when_fooled = check_bool("stop_when_fooled", stop_when_fooled)
        self.steps = check_int("steps", steps)
        self.random_start, self.restarts = check_restarts(random_start, restarts)
        self.rho = check_real("rho", rho, low=0.0, high=1.0)
        self.momentum = check_real("momentum", momentum, low=0.0, high=1.0)
        self.eot_iter = check_int("eot_iter", eot_iter)

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "eps": self.eps,
            "steps": self.steps,
            "restarts": self.restarts,
            "rho": self.rho,
            "momentum": self.momentum,
            "eot_iter": self.eot_iter,
            "random_start": self.random_start,
            "stop_when_fooled": self.stop_when_fooled,
            "loss": self.loss,
        }

    # ------------------------------------------------------------------------------ losses

    def _per_example_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "dlr":
            return dlr_loss(logits, y)
        return F.cross_entropy(logits, y, reduction="none")

    def _evaluate(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gradient, per-example loss, logits), each the mean over ``eot_iter`` draws."""
        leaf = x.detach().requires_grad_(True)
        grad = torch.zeros_like(leaf)
        loss_sum = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        logits_sum: torch.Tensor | None = None
        for _ in range(self.eot_iter):
            logits = self._forward(leaf)
            loss = self._per_example_loss(logits, y)
            grad += self._input_grad(loss.sum(), leaf)
            loss_sum += loss.detach().float()
            logits_sum = logits.detach() if logits_sum is None else logits_sum + logits.detach()
        assert logits_sum is not None
        grad /= self.eot_iter
        logits_mean = logits_sum / self.eot_iter
        self._check_first_gradient(grad, logits_mean, x.detach(), y)
        return grad, loss_sum / self.eot_iter, logits_mean

    # ------------------------------------------------------------------------------ attack

    def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        generator = self._generator()
        result = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for restart in range(self.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_run, fooled_run = self._one_run(x[todo], y[todo], generator)
            if restart == 0:
                result[todo] = x_run
            else:  # keep the earlier best-loss point unless this run fools the example
                take = todo[fooled_run]
                result[take] = x_run[fooled_run]
            fooled[todo] = fooled_run
        return result

    def _one_run(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        shape = (n, 1, 1, 1)
        step = torch.full(shape, 2.0 * self.eps, dtype=x.dtype, device=x.device)
        checkpoints = set(apgd_checkpoints(self.steps))

        x_cur = uniform_start(x, self.eps, generator) if self.random_start else x.clone()
        grad, loss, logits = self._evaluate(x_cur, y)
        fooled = logits.argmax(dim=1) != y
        x_adv = x_cur.clone()  # the latest misclassified iterate, where there is one
        x_best, grad_best, loss_best = x_cur.clone(), grad.clone(), loss.clone()
        x_prev = x_cur.clone()
        increases = torch.zeros(n, dtype=torch.long, device=x.device)
        last_checkpoint = 0
        best_at_checkpoint = loss_best.clone()
        reduced_at_checkpoint = torch.zeros(n, dtype=torch.bool, device=x.device)
        if self.stop_when_fooled:  # every image's result, filled in as it leaves the run
            out, out_fooled, rows = x.clone(), fooled.clone(), torch.arange(n, device=x.device)

        for k in range(self.steps):
            if self.stop_when_fooled and bool(fooled.any()):
                out[rows[fooled]] = x_adv[fooled]
                out_fooled[rows[fooled]] = True
                keep = ~fooled
                rows, x, y, step, x_cur, x_prev, grad, loss = (
                    t[keep] for t in (rows, x, y, step, x_cur, x_prev, grad, loss)
                )
                x_best, grad_best, loss_best, increases = (
                    t[keep] for t in (x_best, grad_best, loss_best, increases)
                )
                best_at_checkpoint, reduced_at_checkpoint = (
                    t[keep] for t in (best_at_checkpoint, reduced_at_checkpoint)
                )
                x_adv, fooled = x_adv[keep], fooled[keep]
                shape = (x.shape[0], 1, 1, 1)
                if rows.numel() == 0:
                    return out, out_fooled
            with torch.no_grad():
                z = project_linf(x_cur + step * grad.sign(), x, self.eps)
                if k == 0:
                    x_next = z
                else:
                    moved = self.momentum * (z - x_cur) + (1 - self.momentum) * (x_cur - x_prev)
                    x_next = project_linf(x_cur + moved, x, self.eps)
            x_prev = x_cur
            x_cur = x_next
            grad, loss_new, logits = self._evaluate(x_cur, y)
            with torch.no_grad():
                now_fooled = logits.argmax(dim=1) != y
                x_adv = torch.where(now_fooled.view(shape), x_cur, x_adv)
                fooled |= now_fooled
                increases += (loss_new > loss).long()
                loss = loss_new
                better = loss > loss_best
                x_best = torch.where(better.view(shape), x_cur, x_best)
                grad_best = torch.where(better.view(shape), grad, grad_best)
                loss_best = torch.where(better, loss, loss_best)
                iteration = k + 1
                if iteration in checkpoints:
                    span = iteration - last_checkpoint
                    oscillating = increases.float() < self.rho * span
                    stalled = ~reduced_at_checkpoint & (loss_best <= best_at_checkpoint)
                    reduce = oscillating | stalled
                    step = torch.where(reduce.view(shape), step / 2.0, step)
                    x_cur = torch.where(reduce.view(shape), x_best, x_cur)
                    grad = torch.where(reduce.view(shape), grad_best, grad)
                    # restarting from x_best: no momentum from the abandoned iterate
                    x_prev = torch.where(reduce.view(shape), x_cur, x_prev)
                    reduced_at_checkpoint = reduce
                    best_at_checkpoint = loss_best.clone()
                    increases.zero_()
                    last_checkpoint = iteration
        if self.stop_when_fooled:
            out[rows] = torch.where(fooled.view(shape), x_adv, x_best)
            out_fooled[rows] = fooled
            return out, out_fooled
        return torch.where(fooled.view(shape), x_adv, x_best), fooled


class APGDDLR(APGD):
    r"""APGD-DLR: :class:`APGD` on the Difference of Logits Ratio loss (needs >= 3 classes).

    The DLR loss :math:`-(z_y - \max_{i \ne y} z_i) / (z_{\pi_1} - z_{\pi_3})` does not change
    when the logits are shifted or rescaled, so it is not fooled by overconfident or
    temperature-scaled models whose cross-entropy gradient vanishes. Same arguments as
    :class:`APGD`.

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
        >>> APGDDLR(model, eps=8 / 255, steps=5).settings()["loss"]
        'dlr'
    """

    name = "apgd-dlr"
    loss: ClassVar[ApgdLoss] = "dlr"
