"""The :class:`Attack` base class and the argument checks every attack shares.

An attack is built around a classifier (any ``nn.Module`` that maps NCHW float images in [0, 1]
to logits; input normalisation lives inside the model) and called on a batch of images and their
true labels. It returns detached adversarial images in [0, 1] of the same shape and dtype.

Conventions kept by every attack:

* the model's mode is left alone (no ``.eval()`` / ``.train()``): the caller decides;
* gradients are taken with :func:`torch.autograd.grad` w.r.t. the input only, so no ``.grad``
  ever appears on the model's parameters;
* the loss is summed over the batch, so each example's step does not depend on the batch size;
* randomness comes from a CPU :class:`torch.Generator` seeded afresh on every call, and the
  samples are moved to the input's device: equal seeds give equal outputs, on CPU and CUDA alike;
* an attack never fails silently on a model without gradients: when the gradient of the model's
  logit margin w.r.t. the input is exactly zero for every image of the call that the attack
  must still move, and the model is flat at random points around those images and on random
  noise images too (a hard threshold, JPEG, bit-depth reduction or any detached step inside the
  model: see :func:`flat_everywhere`), it raises :class:`ZeroGradientError`, which names the
  threat-model wrappers that make such a defense attackable. A differentiable model that is
  flat on some images only (black or saturated ones in front of a clamp or a ReLU) gets a
  :class:`ZeroGradientWarning` instead, whether the batch holds only such images or others
  too: the decision depends on the model, not on how the images were batched.

Attacking a defended model: give the attack what the attacker of your threat model
differentiates through, e.g. ``make_threat_model_defense(defense, "bpda", classifier)``
(straight-through / identity backward for the non-differentiable parts), ``"bpda+eot"`` for a
randomized defense or ``"relaxed"`` (ComDefend's sigmoid), not the defense itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from comdefend.errors import UsageError

Norm = Literal["linf", "l2"]

#: What to do about a model without input gradients; part of every :class:`ZeroGradientError`.
GRADIENT_HELP = (
    "attack what your threat model's attacker differentiates through, not the defense itself: "
    "make_threat_model_defense(defense, 'bpda', classifier) (identity / straight-through "
    "backward pass for non-differentiable parts), 'bpda+eot' for a randomized defense, "
    "'relaxed' for ComDefend's sigmoid, or BPDA(defense) by hand "
    "(comdefend.defenses); in `comdefend evaluate`, --threat-model bpda"
)


class ZeroGradientError(UsageError):
    """A gradient-based attack was given a model whose input gradient is exactly zero.

    Typical cause: a non-differentiable defense (ComDefend's hard threshold, JPEG, bit-depth
    reduction) inside the attacked model. Without this error the attack would return its input
    unchanged and the defense would look perfectly robust. Raised only for a model that is flat
    everywhere (:func:`flat_everywhere`), so it does not depend on which images a batch holds.
    """


class ZeroGradientWarning(UserWarning):
    """Some images have an exactly zero input gradient on a model that has one elsewhere.

    E.g. black or saturated images in front of a clamp or a ReLU: the attack cannot move them
    and keeps them as they are, and attacks the other images.
    """


#: Largest change per pixel of the images probed around by :func:`flat_everywhere`.
PROBE_RADIUS = 0.05
#: How many of the flat images :func:`flat_everywhere` probes around, and how many noise images.
NEAR_PROBES = 8
NOISE_PROBES = 8


def zero_input_jacobian(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    generator: torch.Generator,
) -> torch.Tensor:
    """Per image of ``x``: is the Jacobian of ``forward`` w.r.t. that image exactly zero?

    The gradient of a random Gaussian combination of the outputs is taken (one backward pass);
    it is zero, almost surely, only where every output's gradient is. Needs no labels.

    Args:
        forward: a model, images to ``(N, K)`` outputs.
        x: the images.
        generator: CPU generator of the combination's weights.

    Returns:
        A boolean ``(N,)`` tensor on ``x``'s device.

    Example:
        >>> flat = lambda x: torch.round(x).flatten(1)
        >>> zero_input_jacobian(flat, torch.rand(2, 1, 2, 2), generator=torch.Generator()).tolist()
        [True, True]
    """
    probe = x.detach().requires_grad_(True)
    with torch.enable_grad():
        output = forward(probe)
        flat = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return flat
        weights = torch.randn(output.shape, generator=generator).to(output)
        (grad,) = torch.autograd.grad((output * weights).sum(), probe, allow_unused=True)
    if grad is None:
        return flat
    return grad.flatten(1).abs().amax(dim=1) == 0


def flat_everywhere(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    generator: torch.Generator,
) -> bool:
    """Whether ``forward`` looks like a model whose input gradient is zero everywhere.

    Tells a non-differentiable model (a hard threshold, rounding, JPEG or a detached step inside
    it: its gradient is zero at every input) from a differentiable one that happens to be flat
    on the images ``x`` (black or saturated images in front of a clamp or a ReLU). It probes
    the input Jacobian (:func:`zero_input_jacobian`) at

    * up to :data:`NEAR_PROBES` of the images ``x``, each moved by uniform noise of at most
      :data:`PROBE_RADIUS` per pixel (clipped to [0, 1]), and
    * :data:`NOISE_PROBES` images of uniform noise in [0, 1] of the same shape,

    in one batch, and answers True only if it is exactly zero at all of them. Noise images are
    what makes it robust: a flat region that a small move cannot leave (an image far below a
    clamp's lower bound) is still left by them, while no probe can find a gradient in a model
    that has none. The cost is one forward and backward pass of at most 16 images; the attacks
    pay it only when every image of a call is flat.

    Args:
        forward: a model, images in [0, 1] to ``(N, K)`` outputs.
        x: flat images of the model, ``(N, C, H, W)`` with ``N >= 1``.
        generator: CPU generator of the probes (seeded by the caller: reproducible).

    Example:
        >>> x = torch.zeros(2, 1, 2, 2)  # black images, flat for both models below
        >>> clamped = lambda x: x.clamp(0.1, 0.9).flatten(1)
        >>> rounded = lambda x: torch.round(x).flatten(1)
        >>> flat_everywhere(clamped, x, generator=torch.Generator().manual_seed(0))
        False
        >>> flat_everywhere(rounded, x, generator=torch.Generator().manual_seed(0))
        True
    """
    near = x[:NEAR_PROBES].detach()
    shape = (near.shape[0] + NOISE_PROBES, *x.shape[1:])
    noise = torch.rand(shape, generator=generator).to(device=x.device, dtype=x.dtype)
    moved = (near + PROBE_RADIUS * (2 * noise[: near.shape[0]] - 1)).clamp(0.0, 1.0)
    probes = torch.cat([moved, noise[near.shape[0] :]])
    return bool(zero_input_jacobian(forward, probes, generator=generator).all())


def report_flat_images(
    forward: Callable[[torch.Tensor], torch.Tensor],
    flat_images: torch.Tensor,
    total: int,
    *,
    name: str,
    images: str,
    advice: str,
    generator: torch.Generator,
    stacklevel: int = 2,
) -> None:
    """Raise :class:`ZeroGradientError` or warn about images whose input gradient is zero.

    The one decision shared by every path into an attack (comdefend's attacks and the ART
    adapter): raise if every one of the ``total`` images that matter is flat *and* the model
    is flat everywhere (:func:`flat_everywhere`), i.e. no gradient-based attack can do anything
    on this model; otherwise warn (:class:`ZeroGradientWarning`): the model has a gradient,
    only these images sit where it is zero. Since a model flat everywhere makes every image
    flat, the outcome depends on the model, not on which images a batch holds.

    Args:
        forward: the attacked model (images to ``(N, K)`` outputs).
        flat_images: the flat images among those that matter, ``(S, C, H, W)``.
        total: how many images matter (``S <= total``).
        name: who speaks (the attack's name), first in the message.
        images: what the images are, e.g. ``"correctly classified image(s)"``.
        advice: what to do instead, ending the message (e.g. :data:`GRADIENT_HELP`).
        generator: CPU generator of the probes.
        stacklevel: passed to :func:`warnings.warn`.
    """
    stuck = flat_images.shape[0]
    if stuck == 0:
        return
    if stuck == total and flat_everywhere(forward, flat_images, generator=generator):
        raise ZeroGradientError(
            f"{name}: the model's input gradient is exactly zero for all {total} {images} of "
            f"the call, and also around them and on random noise images (a non-differentiable "
            f"model), so the attack cannot change them and would report the defense as robust; "
            f"{advice}"
        )
    where = f"all {total}" if stuck == total else f"{stuck} of {total}"
    warnings.warn(
        f"{name}: {where} {images} have an exactly zero input gradient, although the model has "
        f"one elsewhere (black or saturated images in front of a clamp, say); the attack cannot "
        f"move them and keeps them; if a non-differentiable defense is the cause: {advice}",
        ZeroGradientWarning,
        stacklevel=stacklevel + 1,
    )


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """Return ``value`` as a finite float, or raise :class:`UsageError` if it is out of range.

    Args:
        name: the argument's name, for the message.
        value: an ``int``, ``float`` or 0-d tensor (``bool`` is refused).
        low: smallest allowed value (``None``: no lower bound).
        high: largest allowed value (``None``: no upper bound).
        low_open: if True, ``low`` itself is not allowed.

    Example:
        >>> check_real("eps", 0.5, low=0.0, high=1.0)
        0.5
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise UsageError(f"{name} must be finite, got {number}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and number > high
    if too_low or too_high:
        left = "(" if low_open else "["
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}]"
        raise UsageError(f"{name} must be in {left}{lo}, {hi}, got {number:g}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is True or False, else raise :class:`UsageError`.

    Example:
        >>> check_bool("random_start", True)
        True
    """
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """Return ``value`` as an int, or raise :class:`UsageError` if it is not an int >= ``low``.

    Example:
        >>> check_int("steps", 10)
        10
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise UsageError(f"{name} must be >= {low}, got {value}")
    return value


def check_linf_eps(eps: Any) -> float:
    """Validate an L-inf budget: a number in [0, 1] (images live in [0, 1])."""
    return check_real("eps", eps, low=0.0, high=1.0)


def check_l2_eps(eps: Any) -> float | None:
    """Validate an optional L2 budget: ``None`` (unbounded) or a number >= 0."""
    if eps is None:
        return None
    return check_real("eps", eps, low=0.0)


def check_batch(x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Check an attack's inputs and return them detached, ``y`` on ``x``'s device.

    Args:
        x: images, a 4-D floating tensor with values in [0, 1].
        y: true labels, a 1-D int64 tensor with one non-negative entry per image.

    Raises:
        UsageError: on any violation, with a message that says which.

    Shape:
        - x: :math:`(N, C, H, W)`
        - y: :math:`(N,)`
    """
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise UsageError(f"x must be a 4-D (N, C, H, W) batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise UsageError(f"x must be a floating-point tensor in [0, 1], got dtype {x.dtype}")
    if not isinstance(y, torch.Tensor):
        raise UsageError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise UsageError(f"y must be an int64 (long) tensor of labels, got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(
            f"y must be 1-D with one label per image ({x.shape[0]}), got shape {tuple(y.shape)}"
        )
    x = x.detach()
    y = y.detach().to(x.device)
    if x.numel() > 0:
        if not bool(torch.isfinite(x).all()):
            raise UsageError("x contains NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise UsageError(f"x must be in [0, 1], got values in [{low:g}, {high:g}]")
    if y.numel() > 0 and int(y.min()) < 0:
        raise UsageError("y must hold non-negative class indices")
    return x, y


class Attack:
    """Base class of the untargeted evasion attacks (torchattacks-style API).

    Subclasses set :attr:`name` and :attr:`norm`, validate their hyper-parameters in
    ``__init__``, list them in :meth:`_hyperparameters` and implement :meth:`_attack`, which
    receives already checked inputs. Gradient-based subclasses get their gradients from
    :meth:`_loss_grad` (or call :meth:`_check_first_gradient` / :meth:`_require_gradient`
    themselves), so that a model without input gradient raises :class:`ZeroGradientError`.

    Args:
        model: classifier mapping NCHW float images in [0, 1] to logits of shape ``(N, K)``.
            To attack a defense, pass the attacker's view of classifier and defense
            (``make_threat_model_defense(defense, "bpda", classifier)``), not
            ``DefendedClassifier(defense, classifier)`` with a non-differentiable defense.
        seed: seed of the generator behind every random choice of the attack; re-applied on
            every call, so two calls on the same inputs give the same output.

    Shape:
        - x: :math:`(N, C, H, W)`, values in [0, 1]
        - y: :math:`(N,)`, int64 true labels
        - output: :math:`(N, C, H, W)`, detached, values in [0, 1], same dtype as ``x``

    Example:
        >>> from comdefend.attacks import FGSM
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
        >>> x, y = torch.rand(2, 3, 4, 4), torch.tensor([1, 7])
        >>> FGSM(model, eps=4 / 255)(x, y).shape
        torch.Size([2, 3, 4, 4])
    """

    name: ClassVar[str] = "attack"
    norm: ClassVar[Norm] = "linf"

    def __init__(self, model: nn.Module, *, seed: int = 0) -> None:
        if not callable(model):
            raise UsageError(f"model must be a callable nn.Module, got {type(model).__name__}")
        self.model = model
        self.seed = check_int("seed", seed, low=0)
        self._num_labels = 0
        self._gradient_checked = False

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial versions of ``x`` (true labels ``y``), detached and in [0, 1].

        Raises:
            UsageError: bad inputs (shape, dtype, range, labels) or model outputs.
            ZeroGradientError: the model's input gradient is exactly zero for every correctly
                classified image and at random probes too (a non-differentiable defense inside
                the model): attack ``make_threat_model_defense(defense, "bpda", classifier)``
                instead. A differentiable model flat on some images only warns
                (:class:`ZeroGradientWarning`), however the images are batched.
        """
        if torch.is_inference_mode_enabled():
            raise UsageError("attacks need autograd: do not call them under torch.inference_mode")
        x, y = check_batch(x, y)
        if x.shape[0] == 0:
            return x.clone()
        self._num_labels = int(y.max()) + 1
        self._gradient_checked = False
        with torch.enable_grad():
            x_adv = self._attack(x, y)
        return x_adv.detach().clamp(0.0, 1.0).to(x.dtype)

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _hyperparameters(self) -> dict[str, Any]:
        return {}

    def settings(self) -> dict[str, Any]:
        """Name, norm, seed and every hyper-parameter, as plain Python values (for reports).

        Example:
            >>> from comdefend.attacks import PGD
            >>> PGD(nn.Linear(2, 2), eps=0.1, steps=5).settings()["steps"]
            5
        """
        return {"name": self.name, "norm": self.norm, **self._hyperparameters(), "seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items() if k not in ("name",))
        return f"{type(self).__name__}({args})"

    # ----------------------------------------------------------------- helpers for subclasses

    def _generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with :attr:`seed` (one per call)."""
        generator = torch.Generator(device="cpu")
        generator.manual_seed(self.seed)
        return generator

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the model and check that it returned ``(N, K)`` logits covering the labels."""
        logits = self.model(x)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise UsageError(f"the model must return (N, K) logits, got {shape}")
        if logits.shape[0] != x.shape[0]:
            raise UsageError(
                f"the model returned {logits.shape[0]} rows of logits for {x.shape[0]} images"
            )
        if logits.shape[1] < self._num_labels:
            raise UsageError(
                f"label {self._num_labels - 1} is out of range for a model with "
                f"{logits.shape[1]} classes"
            )
        return logits

    def _input_grad(
        self, output: torch.Tensor, x: torch.Tensor, *, retain_graph: bool = False
    ) -> torch.Tensor:
        """Gradient of the scalar ``output`` w.r.t. ``x`` only (zeros where it does not depend)."""
        if not output.requires_grad:
            raise ZeroGradientError(
                f"{self.name}: the model's output does not depend differentiably on its input "
                f"(no gradient at all), so a gradient-based attack cannot move the images; "
                f"{GRADIENT_HELP}"
            )
        (grad,) = torch.autograd.grad(output, x, retain_graph=retain_graph, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad

    def _loss_grad(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradient of the batch-summed cross-entropy w.r.t. ``x``, and the (detached) logits.

        The first gradient of every call is checked (see :meth:`_check_first_gradient`).
        """
        x = x.detach().requires_grad_(True)
        logits = self._forward(x)
        loss = F.cross_entropy(logits, y, reduction="sum")
        grad = self._input_grad(loss, x)
        self._check_first_gradient(grad, logits.detach(), x.detach(), y)
        return grad, logits.detach()

    # ------------------------------------------------------------- the zero-gradient check

    def _check_first_gradient(
        self, grad: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Check the attack's first loss gradient of a call; free unless a row of it is zero.

        A row that is exactly zero may come from a saturated loss (cross-entropy of a very
        confident prediction underflows to 0) or from a model without gradient; only the
        second is a defect, so such rows are probed again with the logit margin, which does not
        saturate (:meth:`_require_gradient`).
        """
        if self._gradient_checked:
            return
        self._gradient_checked = True
        zero_rows = grad.detach().flatten(1).abs().amax(dim=1) == 0
        if bool(zero_rows.any()):
            self._require_gradient(x, y, suspect=zero_rows, correct=logits.argmax(dim=1) == y)

    def _require_gradient(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        suspect: torch.Tensor | None = None,
        correct: torch.Tensor | None = None,
    ) -> None:
        """Raise :class:`ZeroGradientError` if the model has no input gradient where it matters.

        The images that matter are those the model still classifies correctly (the others
        need no perturbation). For the ``suspect`` rows (default: all) the gradient of the
        logit margin :math:`Z_y - \\max_{i \\ne y} Z_i` w.r.t. the input is computed; a row where
        it is exactly zero is *flat*: no gradient step can move it. If every image that matters
        is flat and the model is flat everywhere (:func:`flat_everywhere`: a non-differentiable
        defense), the attack would silently return its input, so this raises; otherwise it
        warns with :class:`ZeroGradientWarning` (those images keep the attack's result, which
        for them is usually the clean image). See :func:`report_flat_images`.

        Args:
            x: the images the attack starts from (``(N, C, H, W)``).
            y: true labels ``(N,)``.
            suspect: boolean mask ``(N,)`` of the rows to probe; rows outside it are known to
                have a non-zero gradient. ``None``: probe every row.
            correct: boolean mask ``(N,)`` of the rows the model classifies correctly; ``None``:
                taken from the probe's logits (then ``suspect`` must be ``None``).
        """
        n = x.shape[0]
        if suspect is None:
            suspect = torch.ones(n, dtype=torch.bool, device=x.device)
        rows = suspect.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        probe = x[rows].detach().requires_grad_(True)
        labels = y[rows]
        logits = self._forward(probe)
        flat_probed = torch.ones(rows.numel(), dtype=torch.bool, device=x.device)
        if logits.requires_grad:
            true = logits.gather(1, labels.view(-1, 1)).squeeze(1)
            other = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
            (grad,) = torch.autograd.grad((true - other).sum(), probe, allow_unused=True)
            if grad is not None:
                flat_probed = grad.flatten(1).abs().amax(dim=1) == 0
        if correct is None:
            correct = torch.zeros(n, dtype=torch.bool, device=x.device)
            correct[rows] = logits.detach().argmax(dim=1) == labels
        flat = torch.zeros(n, dtype=torch.bool, device=x.device)
        flat[rows] = flat_probed
        report_flat_images(
            self._forward,
            x[flat & correct].detach(),
            int(correct.sum()),
            name=self.name,
            images="correctly classified image(s)",
            advice=GRADIENT_HELP,
            generator=self._generator(),
            stacklevel=4,
        )


def restrict_l2(x: torch.Tensor, x_adv: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Return ``x`` in place of every example of ``x_adv`` that is farther than ``eps`` in L2.

    Minimum-norm attacks (DeepFool, C&W) use it to respect an optional budget: an example whose
    perturbation exceeds the budget counts as a failure and is returned unperturbed.

    Args:
        x: clean images.
        x_adv: adversarial images.
        eps: L2 budget (``None``: no budget, ``x_adv`` is returned as is).

    Shape:
        - x, x_adv, output: :math:`(N, C, H, W)`

    Example:
        >>> x = torch.zeros(2, 1, 1, 2)
        >>> x_adv = torch.tensor([0.3, 0.4, 0.6, 0.8]).view(2, 1, 1, 2)
        >>> restrict_l2(x, x_adv, 0.5).flatten().tolist()
        [0.30000001192092896, 0.4000000059604645, 0.0, 0.0]
    """
    if eps is None:
        return x_adv
    norms = (x_adv - x).flatten(1).norm(dim=1)
    return torch.where((norms > eps).view(-1, 1, 1, 1), x, x_adv)
