"""Adaptive-attack wrappers: BPDA, EOT and the threat-model helper (Athalye et al. 2018).

References:
    A. Athalye, N. Carlini, D. Wagner, "Obfuscated Gradients Give a False Sense of Security:
    Circumventing Defenses to Adversarial Examples", ICML 2018.

Threat models (:data:`THREAT_MODELS`), i.e. what the attacker differentiates through:

``oblivious``
    The undefended classifier only; the defense is applied at test time.
``bpda``
    The defense with every non-differentiable part replaced, on the backward pass only, by a
    differentiable substitute: identity for JPEG and bit-depth reduction, the straight-through
    binarizer for ComDefend (exactly BPDA of the threshold: forward hard, backward identity).
``bpda+eot``
    As ``bpda``, and for randomized defenses the classifier outputs are averaged over several
    noise draws (:class:`EOT`).
``relaxed``
    ComDefend's threshold replaced by its sigmoid (forward and backward); only for defenses that
    contain ComDefend. Other non-differentiable parts still get BPDA.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from comdefend.defenses.base import Defense
from comdefend.defenses.comdefend_defense import ComDefendDefense
from comdefend.defenses.purifiers import Compose, Identity
from comdefend.distributed import launch_environment
from comdefend.errors import UsageError
from comdefend.registry import Registry


@dataclass(frozen=True)
class ThreatModel:
    """What the attacker differentiates through (see the module docstring).

    Attributes:
        name: registry name (``--threat-model NAME``).
        meaning: one line for reports.
    """

    name: str
    meaning: str


#: The threat models of :func:`make_threat_model_defense`, in report order.
THREAT_MODELS: Registry[ThreatModel] = Registry("threat model")
for _threat_model in (
    ThreatModel(
        "oblivious",
        "attacker differentiates the undefended classifier only; the defense is applied at "
        "test time (adversarials shared by all defenses)",
    ),
    ThreatModel(
        "bpda",
        "attacker differentiates classifier(defense) with non-differentiable parts replaced by "
        "identity on the backward pass (ComDefend: straight-through binarizer)",
    ),
    ThreatModel(
        "bpda+eot",
        "as bpda, plus Expectation over Transformation (classifier outputs averaged over noise "
        "draws) for randomized defenses; identical to bpda for deterministic ones",
    ),
    ThreatModel(
        "relaxed",
        "ComDefend's hard threshold replaced by its sigmoid (forward and backward); only for "
        "defenses containing ComDefend",
    ),
):
    THREAT_MODELS.add(_threat_model.name, _threat_model)

Substitute = Callable[[torch.Tensor], torch.Tensor]


def _describe(module: Any) -> str:
    name = getattr(module, "name", None)
    if isinstance(name, str):
        return name
    return getattr(module, "__name__", type(module).__name__)


class BPDA(Defense):
    """Backward Pass Differentiable Approximation of a defense.

    Forward: ``defense(x)`` (computed without building a graph). Backward: the gradient of
    ``forward_substitute(x)`` (identity by default), through
    ``sub(x) + (defense(x) - sub(x)).detach()``.

    Args:
        defense: the defense (any module mapping images to images).
        forward_substitute: a differentiable callable approximating ``defense``; ``None`` means
            the identity, the usual choice for purifiers with ``defense(x) ~ x``.

    Shape:
        - Input: ``(N, C, H, W)``.
        - Output: ``defense(x)``'s shape (the substitute must return the same shape).

    Example:
        >>> from comdefend.defenses import JPEG
        >>> x = torch.rand(1, 3, 8, 8, requires_grad=True)
        >>> BPDA(JPEG(75))(x).sum().backward()
        >>> bool((x.grad == 1).all())
        True
    """

    differentiable = True

    def __init__(self, defense: nn.Module, forward_substitute: Substitute | None = None) -> None:
        super().__init__()
        self.defense = defense
        self.forward_substitute = forward_substitute

    @property
    def name(self) -> str:
        suffix = "" if self.forward_substitute is None else f",{_describe(self.forward_substitute)}"
        return f"bpda({_describe(self.defense)}{suffix})"

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.defense, "randomized", False))

    def params(self) -> dict[str, Any]:
        inner = self.defense.settings() if isinstance(self.defense, Defense) else {}
        substitute = (
            "identity" if self.forward_substitute is None else _describe(self.forward_substitute)
        )
        return {"defense": inner, "forward_substitute": substitute}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.defense(x)
        substitute = x if self.forward_substitute is None else self.forward_substitute(x)
        if substitute.shape != out.shape:
            raise UsageError(
                f"BPDA substitute output {tuple(substitute.shape)} does not match the defense "
                f"output {tuple(out.shape)}"
            )
        return substitute + (out.to(substitute.dtype) - substitute).detach()


class EOT(nn.Module):
    """Expectation over Transformation: average ``module(x)`` over ``samples`` random draws.

    Wrap the attacker's *whole* model (classifier after randomized defense) so that its output is
    the mean of ``samples`` logits draws. Back-propagating a loss through this mean gives the
    mean of the per-draw gradients exactly when the loss is linear in the logits (e.g. a logit
    margin with fixed classes); for a nonlinear loss such as cross-entropy it is the gradient of
    the loss of the averaged logits, a standard, slightly different approximation. For the exact
    average of loss gradients use :func:`eot_grad`.

    Wrapping only a purifier in EOT would average purified images, which is *not* EOT unless the
    classifier is linear: wrap the composite.

    Args:
        module: the randomized module (e.g. :class:`DefendedClassifier`).
        samples: number of draws K >= 1.
        batched: run the K draws as one batch of ``K * N`` (faster on GPU, K times the
            activation memory at once). The module must then draw its randomness per sample,
            as ComDefend does. Default: a loop of K calls.
        recompute: ``True``: keep no draw's activations from the forward pass; the backward
            pass runs the draws again one at a time, each on the random state its forward draw
            had (the global RNG, the CUDA RNG of the input's device and every ``generator``
            attribute of the wrapped modules): the memory of one draw for K more forward
            passes (about 4/3 of the time). ``"auto"``: keep the draws while all K fit in a
            share of the free memory (measured on the first draw of each call), else
            recompute; both give bit-identical outputs and gradients, so the choice never
            changes a result. With ``True`` or ``"auto"`` gradients reach the input only, not
            the module's parameters: for attacks (what :func:`make_threat_model_defense`
            builds), not for training. ``False`` (default): one autograd graph of all draws.
            Ignored with ``batched``.

    Shape:
        - Input: ``(N, ...)``.
        - Output: ``module(x)``'s shape.

    Example:
        >>> eot = EOT(DefendedClassifier(noisy_defense, classifier), samples=8)  # doctest: +SKIP
        >>> loss = F.cross_entropy(eot(x), y)  # doctest: +SKIP
    """

    def __init__(
        self,
        module: nn.Module,
        samples: int = 8,
        batched: bool = False,
        recompute: bool | Literal["auto"] = False,
    ) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise UsageError(f"EOT samples must be an integer >= 1, got {samples!r}")
        self.module = module
        self.samples = samples
        self.batched = bool(batched)
        if recompute not in (True, False, "auto"):
            raise UsageError(f"EOT recompute must be True, False or 'auto', got {recompute!r}")
        self.recompute: bool | Literal["auto"] = recompute

    @property
    def name(self) -> str:
        return f"eot({_describe(self.module)},{self.samples})"

    @property
    def randomized(self) -> bool:
        return bool(getattr(self.module, "randomized", False))

    def settings(self) -> dict[str, Any]:
        settings = getattr(self.module, "settings", None)
        inner = settings() if callable(settings) else {}
        return {
            "name": self.name,
            "samples": self.samples,
            "batched": self.batched,
            "recompute": self.recompute,
            "module": inner,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.samples
        if self.batched and k > 1:
            out = self.module(x.repeat(k, *([1] * (x.dim() - 1))))
            return out.reshape(k, x.shape[0], *out.shape[1:]).mean(0)
        if self.recompute is not False and k > 1 and torch.is_grad_enabled() and x.requires_grad:
            return cast(torch.Tensor, _DrawByDraw.apply(x, self))
        total = self.module(x)
        for _ in range(k - 1):
            total = total + self.module(x)
        return total / k


def _random_states(module: nn.Module, device: torch.device) -> list[tuple[Any, torch.Tensor]]:
    """Every random state ``module``'s forward pass may draw from: the global RNG, the CUDA RNG
    of ``device`` and each distinct ``torch.Generator`` held as a ``generator`` attribute."""
    states: list[tuple[Any, torch.Tensor]] = [("cpu", torch.get_rng_state())]
    if device.type == "cuda":
        states.append((device, torch.cuda.get_rng_state(device)))
    seen: set[int] = set()
    for part in module.modules():
        generator = getattr(part, "generator", None)
        if isinstance(generator, torch.Generator) and id(generator) not in seen:
            seen.add(id(generator))
            states.append((generator, generator.get_state()))
    return states


def _restore_random_states(states: list[tuple[Any, torch.Tensor]]) -> None:
    for owner, state in states:
        if isinstance(owner, torch.Generator):
            owner.set_state(state)
        elif owner == "cpu":
            torch.set_rng_state(state)
        else:
            torch.cuda.set_rng_state(state, owner)


#: ``EOT(recompute="auto")`` keeps the K draws' activations while they take at most this share
#: of the free memory (divided among the processes of a torchrun on this machine).
AUTO_RECOMPUTE_SHARE = 0.5


def _free_memory_bytes(device: torch.device) -> int | None:
    """Free memory for activations on ``device``: CUDA's free memory, else the host's
    ``MemAvailable`` (Linux); ``None`` where it cannot be read."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _keeps_all_draws(samples: int, one_draw_bytes: int, device: torch.device) -> bool:
    free = _free_memory_bytes(device)
    if free is None:
        return False
    try:  # the processes of a torchrun job on this machine share its memory
        processes = launch_environment().local_world_size
    except UsageError:  # not a torchrun job this package could join: assume one process
        processes = 1
    return samples * one_draw_bytes <= AUTO_RECOMPUTE_SHARE * free / processes


class _DrawByDraw(torch.autograd.Function):
    """:class:`EOT` with ``recompute``: the mean of K draws, each its own graph; the backward
    pass sums the K input gradients in draw order, from the kept graphs or from the draws run
    again on their recorded random states (the same operations either way: bit-identical)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eot: EOT) -> torch.Tensor:
        parameters = {p.data_ptr() for p in eot.module.parameters()}
        states, graphs = [], []
        keep = eot.recompute == "auto"
        total: torch.Tensor | None = None
        for draw in range(eot.samples):
            states.append(_random_states(eot.module, x.device))
            if keep:
                leaf = x.detach().requires_grad_(True)
                saved = 0

                def count(t: torch.Tensor) -> torch.Tensor:
                    nonlocal saved
                    if t.data_ptr() not in parameters:
                        saved += t.numel() * t.element_size()
                    return t

                with (
                    torch.enable_grad(),
                    torch.autograd.graph.saved_tensors_hooks(count, lambda t: t),
                ):
                    out = eot.module(leaf)
                graphs.append((leaf, out))
                if draw == 0 and not _keeps_all_draws(eot.samples, saved, x.device):
                    keep, graphs = False, []
                out = out.detach()
            else:
                out = eot.module(x)
            total = out if total is None else total + out
        assert total is not None
        ctx.eot, ctx.states, ctx.graphs = eot, states, graphs if keep else None
        ctx.save_for_backward(x)
        return total / eot.samples

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        eot: EOT = ctx.eot
        graphs, ctx.graphs = ctx.graphs, None
        grad = torch.zeros_like(x)
        share = grad_out / eot.samples
        if graphs is not None:
            for leaf, out in graphs:
                grad += torch.autograd.grad(out, leaf, share)[0]
            return grad, None
        now = _random_states(eot.module, x.device)
        try:
            for states in ctx.states:
                _restore_random_states(states)
                leaf = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    out = eot.module(leaf)
                grad += torch.autograd.grad(out, leaf, share)[0]
        finally:  # the streams continue as if the draws had not been run again
            _restore_random_states(now)
        return grad, None


def eot_grad(
    module: nn.Module,
    x: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    samples: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact EOT: the mean over ``samples`` draws of ``grad_x loss_fn(module(x))``.

    One forward and backward per draw; each graph is freed before the next draw, so memory stays
    that of a single draw.

    Args:
        module: the attacker's model (e.g. :class:`DefendedClassifier` of a randomized defense).
        x: the input (not modified; its gradient is not accumulated).
        loss_fn: maps ``module(x)`` to a scalar loss (sum over the batch to get per-sample
            gradients).
        samples: number of draws K >= 1.

    Returns:
        ``(gradient, loss)``: the mean gradient (shaped like ``x``) and the mean loss (detached).

    Example:
        >>> grad, loss = eot_grad(model, x, lambda z: F.cross_entropy(z, y, reduction="sum"))
        ...     # doctest: +SKIP
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise UsageError(f"EOT samples must be an integer >= 1, got {samples!r}")
    leaf = x.detach().requires_grad_(True)
    grad_sum = torch.zeros_like(leaf)
    loss_sum = torch.zeros((), dtype=leaf.dtype, device=leaf.device)
    for _ in range(samples):
        loss = loss_fn(module(leaf))
        if loss.dim() != 0:
            raise UsageError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, leaf)
        grad_sum += grad
        loss_sum += loss.detach()
    return grad_sum / samples, loss_sum / samples


class DefendedClassifier(nn.Module):
    """``classifier(defense(x))`` as one module.

    Args:
        defense: a purifier (or an attacker's view of one).
        classifier: maps images to logits.

    Shape:
        - Input: ``(N, C, H, W)`` float in [0, 1].
        - Output: ``(N, num_classes)`` logits.

    Example:
        >>> model = DefendedClassifier(JPEG(75), classifier)  # doctest: +SKIP
    """

    def __init__(self, defense: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.defense = defense
        self.classifier = classifier

    @property
    def randomized(self) -> bool:
        return bool(getattr(self.defense, "randomized", False))

    @property
    def name(self) -> str:
        return _describe(self.defense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.defense(x))


def _contains_comdefend(defense: nn.Module) -> bool:
    return any(isinstance(module, ComDefendDefense) for module in defense.modules())


def _attacker_seed(part: ComDefendDefense) -> int | None:
    # The attacker's noise stream is independent of the evaluated defense's.
    return None if part.seed is None else part.seed + 1


def _attacker_part(part: nn.Module, relaxed: bool) -> nn.Module:
    if isinstance(part, ComDefendDefense):
        mode = "relaxed" if relaxed else "straight_through"
        return part.with_mode(mode, seed=_attacker_seed(part))
    if isinstance(part, Compose):
        return Compose(*(cast(Defense, _attacker_part(p, relaxed)) for p in part.parts))
    if isinstance(part, (BPDA, Identity)) or getattr(part, "differentiable", True):
        return part
    return BPDA(part)


def make_threat_model_defense(
    defense: nn.Module,
    threat_model: str,
    classifier: nn.Module | None = None,
    *,
    eot_samples: int = 8,
) -> nn.Module | None:
    """What the attacker differentiates through under ``threat_model``.

    Without ``classifier``, returns the attacker's view of the purifier (``None`` for
    ``oblivious``: attack the undefended classifier). With ``classifier``, returns the attacker's
    complete model mapping images to logits: the classifier alone for ``oblivious``, else a
    :class:`DefendedClassifier` of the view, wrapped in :class:`EOT` for ``bpda+eot`` when the
    defense is randomized (``recompute="auto"``: draw by draw in the backward pass where the
    draws would not fit in memory, the same result either way; gradients for the input
    only). Since EOT must average classifier outputs, ``bpda+eot`` on a randomized defense
    requires ``classifier``.

    Views: ComDefend runs its binarizer ``straight_through`` (``bpda``, ``bpda+eot``) or
    ``relaxed`` (``relaxed``) on a noise stream independent of the defense's (seed + 1);
    non-differentiable parts (JPEG, bit depth) are wrapped in :class:`BPDA` with an identity
    backward; differentiable parts (median, identity) are kept; compositions are mapped part by
    part. The views share the defense's weights.

    Args:
        defense: the evaluated defense.
        threat_model: one of :data:`THREAT_MODELS`.
        classifier: optional classifier (images to logits).
        eot_samples: EOT draws for ``bpda+eot`` on randomized defenses.

    Returns:
        A module, or ``None`` for ``oblivious`` without a classifier.

    Raises:
        UsageError: unknown threat model; ``relaxed`` on a defense without ComDefend;
            ``bpda+eot`` on a randomized defense without ``classifier``.

    Example:
        >>> from comdefend.defenses import parse_defense
        >>> view = make_threat_model_defense(parse_defense("jpeg:75+median:2"), "bpda")
        >>> view.name
        'bpda(jpeg:75)+median:2'
    """
    key = THREAT_MODELS.canonical(threat_model)  # UsageError listing the valid names
    if key == "oblivious":
        return classifier
    if key == "relaxed" and not _contains_comdefend(defense):
        raise UsageError(
            f"threat model 'relaxed' needs a defense containing ComDefend, got "
            f"{_describe(defense)!r}; use 'bpda' or 'bpda+eot' instead"
        )
    view = _attacker_part(defense, relaxed=key == "relaxed")
    needs_eot = key == "bpda+eot" and bool(getattr(view, "randomized", False))
    if classifier is None:
        if needs_eot:
            raise UsageError(
                "threat model 'bpda+eot' on a randomized defense needs the classifier: EOT "
                "averages classifier outputs, not purified images"
            )
        return view
    model: nn.Module = DefendedClassifier(view, classifier)
    if needs_eot:
        model = EOT(model, eot_samples, recompute="auto")
    return model
