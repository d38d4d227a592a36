"""DeepFool (Moosavi-Dezfooli et al., 2016), L2, multi-class, untargeted."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from comdefend.attacks.base import Attack, check_int, check_l2_eps, check_real, restrict_l2
from comdefend.errors import UsageError


class DeepFool(Attack):
    r"""DeepFool, L2: walk to the nearest linearised decision boundary until the label flips.

    At each step the model is linearised at the current point; for every candidate class
    :math:`k` the distance to the boundary between :math:`k` and the true class :math:`y` is
    :math:`|f_k - f_y| / \|\nabla f_k - \nabla f_y\|_2`. The closest boundary :math:`l` gives
    the step :math:`r = (|f_l - f_y| + 10^{-4}) / \|w_l\|_2^2 \cdot w_l` with
    :math:`w_l = \nabla f_l - \nabla f_y`; steps accumulate in :math:`r_{tot}` and the iterate is
    :math:`\mathrm{clip}_{[0,1]}(x + (1 + \text{overshoot}) \, r_{tot})`. An example stops as soon
    as it is misclassified.

    The candidate classes are the ``num_classes - 1`` classes with the highest logits on the
    clean image, other than the true class. Examples already misclassified are returned as they
    are (a success with a zero perturbation); examples still correctly classified after
    ``steps`` iterations are failures and are returned unperturbed, as are, when ``eps`` is
    given, examples whose perturbation's L2 norm exceeds ``eps``. So every returned example is
    either ``x`` itself or an adversarial example within the budget. A model whose gradient is
    exactly zero at every correctly classified image (a non-differentiable defense inside it)
    raises :class:`~comdefend.attacks.ZeroGradientError` instead of failing silently.

    Args:
        model: classifier mapping images in [0, 1] to logits.
        steps: maximum number of linearisation steps (>= 1).
        overshoot: relative overshoot of the accumulated step (>= 0), so that the iterate lands
            just past the boundary.
        num_classes: number of classes considered, true class included (>= 2; capped at the
            model's number of classes). Each step costs one backward pass per class considered.
        eps: optional L2 budget (>= 0).
        seed: unused (DeepFool is deterministic); kept for a uniform API.

    Shape:
        - x: :math:`(N, C, H, W)` in [0, 1]; y: :math:`(N,)` int64
        - output: :math:`(N, C, H, W)` in [0, 1]

    Example:
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        >>> x = torch.rand(4, 3, 2, 2)
        >>> y = model(x).argmax(1)
        >>> x_adv = DeepFool(model, steps=20)(x, y)
        >>> x_adv.shape
        torch.Size([4, 3, 2, 2])
    """

    name = "deepfool"
    norm = "l2"

    def __init__(
        self,
        model: nn.Module,
        steps: int = 50,
        overshoot: float = 0.02,
        num_classes: int = 10,
        eps: float | None = None,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__(model, seed=seed)
        self.steps = check_int("steps", steps)
        self.overshoot = check_real("overshoot", overshoot, low=0.0)
        self.num_classes = check_int("num_classes", num_classes, low=2)
        self.eps = check_l2_eps(eps)

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "overshoot": self.overshoot,
            "num_classes": self.num_classes,
            "eps": self.eps,
        }

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x_adv = x.clone()
        r_tot = torch.zeros_like(x)
        active = torch.ones(n, dtype=torch.bool, device=x.device)
        classes = torch.empty(0)
        for step in range(self.steps + 1):
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa = x_adv[idx].requires_grad_(True)
            logits = self._forward(xa)
            if step == 0:
                classes = self._candidates(logits.detach(), y)
            still = logits.detach().argmax(dim=1) == y[idx]
            active[idx] = still
            if step == self.steps or not bool(still.any()):
                continue
            r = self._step(xa, logits, classes[idx], still)
            keep = idx[still]
            if step == 0:  # a row with a zero step has a zero gradient for every class pair
                suspect = torch.zeros(n, dtype=torch.bool, device=x.device)
                suspect[keep] = r.flatten(1).abs().amax(dim=1) == 0
                correct = torch.zeros_like(suspect)
                correct[keep] = True
                self._require_gradient(x, y, suspect=suspect, correct=correct)
            r_tot[keep] += r
            x_adv[keep] = (x[keep] + (1.0 + self.overshoot) * r_tot[keep]).clamp(0.0, 1.0)
        x_adv = torch.where(active.view(-1, 1, 1, 1), x, x_adv)
        return restrict_l2(x, x_adv, self.eps)

    def _candidates(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Class indices, true class first, then the top others by clean logit: ``(N, k)``."""
        k = min(self.num_classes, logits.shape[1])
        if k < 2:
            raise UsageError("DeepFool needs a model with at least 2 classes")
        ranked = logits.float().scatter(1, y.view(-1, 1), float("inf"))
        return ranked.topk(k, dim=1).indices

    def _step(
        self, xa: torch.Tensor, logits: torch.Tensor, classes: torch.Tensor, still: torch.Tensor
    ) -> torch.Tensor:
        """The minimal step to the closest linearised boundary, for the rows where ``still``."""
        chosen = logits.gather(1, classes)[still]  # (m, k); column 0 is the true class
        k = chosen.shape[1]
        grad_true = self._input_grad(chosen[:, 0].sum(), xa, retain_graph=True)[still].flatten(1)
        m = chosen.shape[0]
        best_dist = torch.full((m,), float("inf"), device=xa.device)
        best_w = torch.zeros_like(grad_true)
        best_f = torch.zeros(m, dtype=grad_true.dtype, device=xa.device)
        for j in range(1, k):
            grad = self._input_grad(chosen[:, j].sum(), xa, retain_graph=j < k - 1)[still]
            w = grad.flatten(1) - grad_true
            f = (chosen[:, j] - chosen[:, 0]).detach().abs().to(w.dtype)
            w_norm = w.norm(dim=1)
            dist = (f / w_norm.clamp_min(1e-12)).float()
            closer = dist < best_dist
            best_dist = torch.where(closer, dist, best_dist)
            best_w = torch.where(closer.view(-1, 1), w, best_w)
            best_f = torch.where(closer, f, best_f)
        scale = (best_f + 1e-4) / best_w.square().sum(dim=1).clamp_min(1e-24)
        return (scale.view(-1, 1) * best_w).view(m, *xa.shape[1:])
