"""Attacks by name: the :data:`ATTACKS` registry, :func:`register_attack`, :func:`make_attack`.

Every attack that ``comdefend evaluate --attack NAME`` and :func:`make_attack` know is an
:class:`~comdefend.attacks.Attack` subclass registered in :data:`ATTACKS` (a
:class:`comdefend.registry.Registry`). Register your own with :func:`register_attack`, or wrap
another library's attack (torchattacks, foolbox, ...) with :func:`adapt_attack` first. Installed
packages add attacks to every process, the ``comdefend`` command included, through the
``comdefend.attacks`` entry-point group (:func:`load_attack_plugins`).

Example:
    >>> from comdefend.attacks import FGSM, register_attack, make_attack
    >>> class HalfFGSM(FGSM):
    ...     '''FGSM with half the budget (a toy user attack).'''
    ...     def _run(self, x, y):
    ...         grad, _ = self._loss_grad(x, y)
    ...         return x + self.eps / 2 * grad.sign()
    >>> _ = register_attack("half-fgsm", HalfFGSM)
    >>> make_attack("half-fgsm", nn.Linear(2, 2), eps=0.1).settings()["name"]
    'half-fgsm'
    >>> ATTACKS.remove("half-fgsm")
"""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from comdefend.attacks.apgd import APGD, APGDDLR
from comdefend.attacks.base import Attack, Norm, check_l2_eps, check_linf_eps, restrict_l2
from comdefend.attacks.cw import CW
from comdefend.attacks.deepfool import DeepFool
from comdefend.attacks.linf import BIM, FGSM, MIFGSM, PGD, project_linf
from comdefend.errors import UsageError
from comdefend.registry import Registry, normalize_name

#: Every attack known by name (``fgsm, bim, pgd, mifgsm, deepfool, cw, apgd-ce, apgd-dlr`` and
#: whatever users register).
ATTACKS: Registry[type[Attack]] = Registry("attack")

AttackClass = TypeVar("AttackClass", bound=type[Attack])


def register_attack(
    name: str,
    attack: type[Attack] | None = None,
    *,
    aliases: tuple[str, ...] = (),
    replace: bool = False,
) -> Any:
    """Register an :class:`Attack` subclass under ``name`` (call or decorator form).

    The class's ``name`` attribute (what ``settings()`` and reports show) becomes ``name`` when
    the class does not set its own; a class that sets another name is refused. The class must
    take ``(model, ..., *, seed=...)`` like the built-in attacks; ``eps`` is passed when the user
    gives one. A ``norm`` of ``"l2"`` makes it a minimum-norm attack (no eps needed).

    Args:
        name: the name (case-insensitive) used by :func:`make_attack` and
            ``comdefend evaluate --attack``.
        attack: the class; omit it to use ``register_attack(name)`` as a decorator.
        aliases: other accepted names.
        replace: allow replacing an existing entry.

    Returns:
        The class (so the decorator form leaves it unchanged).

    Raises:
        UsageError: not an :class:`Attack` subclass, a name already taken, a class name that
            disagrees with ``name``.

    Example:
        >>> @register_attack("my-pgd")
        ... class MyPGD(PGD):
        ...     pass
        >>> make_attack("MY-PGD", nn.Linear(2, 2), eps=0.1).settings()["name"]
        'my-pgd'
        >>> ATTACKS.remove("my-pgd")
    """

    def decorate(cls: AttackClass) -> AttackClass:
        if not (isinstance(cls, type) and issubclass(cls, Attack)):
            raise UsageError(
                f"register_attack({name!r}) needs a subclass of comdefend.attacks.Attack, "
                f"got {cls!r}; wrap another library's attack with adapt_attack first"
            )
        key = normalize_name(name) if isinstance(name, str) else name
        if "name" not in vars(cls):
            cls.name = key
        elif normalize_name(cls.name) != key and key not in map(normalize_name, aliases):
            raise UsageError(
                f"attack class {cls.__name__} calls itself {cls.name!r}, not {name!r}; "
                "register it under its own name or remove its name attribute"
            )
        ATTACKS.add(name, cls, aliases=aliases, replace=replace)
        return cls

    return decorate if attack is None else decorate(attack)


class ForeignAttack(Attack):
    """An attack from another library behind the :class:`Attack` interface.

    Subclasses are made by :func:`adapt_attack`; they run ``build(model, eps=eps, **kwargs)``
    once per call and apply the callable it returns to ``(x, y)``. Around it they keep the
    package's guarantees: the inputs are checked, a model without input gradient raises
    :class:`~comdefend.attacks.ZeroGradientError` (one extra forward and backward pass per
    call), the global RNG is seeded with ``seed`` inside a forked RNG state (so equal seeds give
    equal outputs and the caller's RNG is untouched), and the output is checked: same shape,
    finite, clipped to [0, 1] and within the budget (L-inf: more than 1e-5 outside it is an
    error; L2 with a budget: an example outside it is returned unperturbed, as the built-in
    minimum-norm attacks do).
    """

    build: ClassVar[Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]
    default_eps: ClassVar[float | None] = None
    check_gradient: ClassVar[bool] = True

    def __init__(
        self, model: nn.Module, eps: float | None = None, *, seed: int = 0, **kwargs: Any
    ) -> None:
        super().__init__(model, seed=seed)
        if eps is None:
            eps = self.default_eps
        if self.norm == "linf":
            if eps is None:
                raise UsageError(f"{self.name} is an L-inf attack: give eps")
            self.eps: float | None = check_linf_eps(eps)
        else:
            self.eps = check_l2_eps(eps)
        self.kwargs = dict(kwargs)

    def _hyperparameters(self) -> dict[str, Any]:
        plain = (bool, int, float, str, type(None))
        extra = {k: (v if isinstance(v, plain) else repr(v)) for k, v in self.kwargs.items()}
        return {"eps": self.eps, **extra}

    def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.check_gradient:
            self._require_gradient(x, y)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            foreign = type(self).build(self.model, eps=self.eps, **self.kwargs)
            out = foreign(x, y)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(
                f"{self.name}: the adapted attack returned {shape}, expected {tuple(x.shape)}"
            )
        out = out.detach().to(device=x.device, dtype=x.dtype)
        if not bool(torch.isfinite(out).all()):
            raise UsageError(f"{self.name}: the adapted attack returned NaN or infinite values")
        out = out.clamp(0.0, 1.0)
        if self.norm == "linf":
            assert self.eps is not None
            excess = float((out - x).abs().max()) - self.eps
            if excess > 1e-5:
                raise UsageError(
                    f"{self.name}: the adapted attack left its L-inf budget {self.eps:g} by "
                    f"{excess:.3g}; check how its eps is passed"
                )
            return project_linf(out, x, self.eps)
        return restrict_l2(x, out, self.eps)


def adapt_attack(
    name: str,
    build: Callable[..., Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    *,
    norm: Norm = "linf",
    default_eps: float | None = None,
    check_gradient: bool = True,
    register: bool = True,
    replace: bool = False,
) -> type[ForeignAttack]:
    """Wrap another library's attack as an :class:`Attack` (and register it under ``name``).

    Args:
        name: the name for :func:`make_attack` and ``comdefend evaluate --attack``.
        build: ``build(model, eps=eps, **kwargs)`` returns a callable ``(x, y) -> x_adv`` on
            NCHW float images in [0, 1] (torchattacks' attacks are such callables; for foolbox
            return ``lambda x, y: attack(fmodel, x, y, epsilons=eps)[1]``). ``kwargs`` are
            the hyper-parameters given to :func:`make_attack` (``--attack-param`` in the CLI).
        norm: ``"linf"`` (eps required) or ``"l2"`` (minimum-norm; eps optional).
        default_eps: eps used when none is given.
        check_gradient: probe the model's input gradient before each call and raise
            :class:`~comdefend.attacks.ZeroGradientError` if it is zero (set False for a
            gradient-free attack).
        register: also register it in :data:`ATTACKS`.
        replace: allow replacing an existing registration.

    Returns:
        The new :class:`ForeignAttack` subclass.

    Example:
        >>> import torchattacks  # doctest: +SKIP
        >>> adapt_attack("ta-pgd", lambda model, eps, **kw: torchattacks.PGD(model, eps=eps, **kw))
        ...     # doctest: +SKIP
        >>> make_attack("ta-pgd", classifier, eps=8 / 255, steps=10)(x, y)  # doctest: +SKIP
    """
    if not callable(build):
        raise UsageError(f"adapt_attack({name!r}): build must be callable, got {build!r}")
    if norm not in ("linf", "l2"):
        raise UsageError(f"norm must be 'linf' or 'l2', got {norm!r}")
    key = normalize_name(name)
    cls = type(
        f"Adapted_{key.replace('-', '_')}",
        (ForeignAttack,),
        {
            "name": key,
            "norm": norm,
            "build": staticmethod(build),
            "default_eps": default_eps,
            "check_gradient": bool(check_gradient),
            "__doc__": f"{key}: an adapted attack ({getattr(build, '__name__', 'build')}).",
        },
    )
    if register:
        register_attack(key, cls, replace=replace)
    return cls


for _cls in (FGSM, BIM, PGD, MIFGSM, DeepFool, CW, APGD, APGDDLR):
    register_attack(_cls.name, _cls)

#: Entry-point group through which installed packages add attacks to every process, the
#: ``comdefend`` command included.
PLUGIN_GROUP = "comdefend.attacks"


def load_attack_plugins() -> list[str]:
    """Register the attacks that installed packages declare in the ``comdefend.attacks`` group.

    An entry point ``NAME = module:Object`` whose object is an :class:`Attack` subclass is
    registered under ``NAME``; any other object is only imported (a module that calls
    :func:`register_attack` or :func:`adapt_attack` itself). A plugin that fails to import is
    skipped with a warning, so one broken package cannot break the command. Called once when
    :mod:`comdefend.attacks` is imported.

    In a package's ``pyproject.toml``::

        [project.entry-points."comdefend.attacks"]
        ta-pgd = "my_package.attacks:TorchattacksPGD"

    Returns:
        The names registered.
    """
    registered = []
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            loaded = entry.load()
        except Exception as error:  # a user's package: never let it break the command
            warnings.warn(
                f"attack plugin {entry.name!r} ({entry.value}) could not be loaded: {error}",
                stacklevel=2,
            )
            continue
        if isinstance(loaded, type) and issubclass(loaded, Attack) and entry.name not in ATTACKS:
            register_attack(entry.name, loaded)
            registered.append(normalize_name(entry.name))
    return registered


load_attack_plugins()


def make_attack(
    name: str, model: nn.Module, eps: float | None = None, seed: int = 0, **kwargs: Any
) -> Attack:
    """Build the attack called ``name`` (case-insensitive) around ``model``.

    Args:
        name: a name in :data:`ATTACKS`: ``fgsm, bim, pgd, mifgsm, deepfool, cw, apgd-ce,
            apgd-dlr`` or one registered with :func:`register_attack`.
        model: classifier mapping images in [0, 1] to logits. For a defended model, pass the
            attacker's view of it (:func:`comdefend.defenses.make_threat_model_defense`);
            a model without input gradient raises :class:`~comdefend.attacks.ZeroGradientError`
            when the attack runs.
        eps: budget (L-inf for ``fgsm/bim/pgd/mifgsm/apgd-*``, optional L2 for
            ``deepfool/cw``); ``None`` keeps the attack's default.
        seed: seed of the attack's random choices.
        **kwargs: other hyper-parameters of the attack (e.g. ``steps``, ``alpha``).

    Raises:
        UsageError: unknown name or hyper-parameter, or a value out of range.

    Example:
        >>> attack = make_attack("PGD", nn.Linear(2, 2), eps=4 / 255, steps=3)
        >>> attack.settings()["name"], attack.settings()["steps"]
        ('pgd', 3)
    """
    if not isinstance(name, str) or name not in ATTACKS:
        raise UsageError(f"unknown attack {name!r}; valid names: {', '.join(ATTACKS.names())}")
    key = ATTACKS.canonical(name)
    cls = ATTACKS.get(key)
    parameters = inspect.signature(cls.__init__).parameters
    accepted = [p for p in parameters if p not in ("self", "model")]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown and not takes_any:
        raise UsageError(
            f"{key} does not take {', '.join(unknown)}; its parameters: {', '.join(accepted)}"
        )
    if eps is not None:
        kwargs["eps"] = eps
    return cls(model, seed=seed, **kwargs)
