"""Parse defense specs such as ``jpeg:75``, ``bits:4+median:2`` or ``comdefend:w.safetensors``.

Grammar::

    spec      := part ("+" part)*            parts applied left to right
    part      := "none"
               | "jpeg:" Q                   Q in 1..100   (JPEG quality)
               | "bits:" B                   B in 1..8     (bits per channel)
               | "median:" K                 K in 2..5     (median window side)
               | "comdefend:" PATH ["@" option ("," option)*]     PATH: file or zoo name
    option    := "noise=" FLOAT              test-time noise std (default: the checkpoint's)
               | "seed=" INT | "seed=none"   noise generator seed (default 0)
               | "binarizer=" MODE           hard (default), straight_through or relaxed
               | "purify=" MODE              patch or full (default: the checkpoint's)

Names are case-insensitive; the ``@`` options start at the *last* ``@`` of a ``comdefend`` part
(when what follows it contains ``=``), so paths may contain ``@``, but not ``+``.
Every defense's ``name`` parses back to an equivalent defense.

Each kind is a :class:`DefenseKind` in the :data:`DEFENSES` registry; a user's own defense
enters every spec (and ``comdefend evaluate --defense``) with :func:`register_defense`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from comdefend.defenses.base import Defense
from comdefend.defenses.comdefend_defense import DEFENSE_BINARIZER_MODES, ComDefendDefense
from comdefend.defenses.purifiers import JPEG, BitDepthReduction, Compose, Identity, MedianSmoothing
from comdefend.errors import UsageError
from comdefend.models.comdefend import ComDefend
from comdefend.models.precision import check_precision
from comdefend.registry import Registry

COMDEFEND_OPTIONS: tuple[str, ...] = ("noise", "seed", "binarizer", "purify", "precision")


@dataclass(frozen=True)
class DefenseKind:
    """One kind of defense spec part (``KIND`` or ``KIND:ARGUMENT``).

    Attributes:
        name: the kind, written before the ``:``.
        usage: one line for messages and ``--help``, e.g. ``jpeg:Q (JPEG quality Q in 1..100)``.
        build: ``build(argument, device)`` makes the defense from the text after ``:`` (``""``
            when there is none); raises :class:`UsageError` for a bad argument.
    """

    name: str
    usage: str
    build: Callable[[str, str | torch.device], Defense]


#: Every defense kind a spec may name. Add one with :func:`register_defense`.
DEFENSES: Registry[DefenseKind] = Registry("defense")


def register_defense(
    kind: DefenseKind, *, aliases: tuple[str, ...] = (), replace: bool = False
) -> DefenseKind:
    """Make ``kind`` usable in defense specs (``parse_defense``, ``--defense``).

    Example:
        >>> blur = DefenseKind("mine", "mine (my defense)", lambda argument, device: Identity())
        >>> _ = register_defense(blur)
        >>> parse_defense("mine+jpeg:75").name
        'none+jpeg:75'
        >>> DEFENSES.remove("mine")
    """
    return DEFENSES.add(kind.name, kind, aliases=aliases, replace=replace)


def _valid_specs() -> str:
    return "; ".join(kind.usage for kind in DEFENSES.values())


def _int_argument(kind: str, argument: str, low: int, high: int, what: str) -> int:
    usage = DEFENSES.get(kind).usage
    if not argument:
        raise UsageError(f"{kind} needs {what}: {usage}, e.g. {kind}:{low + 1}")
    try:
        value = int(argument)
    except ValueError:
        raise UsageError(
            f"{kind}: {what} must be an integer, got {argument!r}; expected {usage}"
        ) from None
    if not low <= value <= high:
        raise UsageError(f"{kind}: {what} {value} is out of range; expected {usage}")
    return value


def _parse_comdefend(argument: str, device: str | torch.device) -> ComDefendDefense:
    path, options_text = argument, ""
    if "@" in argument:
        head, _, tail = argument.rpartition("@")
        if "=" in tail:
            path, options_text = head, tail
        else:
            named = [item.strip().lower() for item in tail.split(",")]
            given = [item for item in named if item in COMDEFEND_OPTIONS]
            if (
                given and not Path(argument).exists()
            ):  # "@noise" reads as an option without its value, not as part of a path
                raise UsageError(
                    f"comdefend: option {given[0]!r} needs a value ({given[0]}=...), e.g. "
                    f"comdefend:{head}@noise=1.0; valid options: "
                    f"{', '.join(k + '=' for k in COMDEFEND_OPTIONS)}"
                )
    if not path:
        raise UsageError(f"comdefend needs a checkpoint path: {DEFENSES.get('comdefend').usage}")
    options: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in options_text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in COMDEFEND_OPTIONS:
            raise UsageError(
                f"comdefend: unknown option {item!r}; valid options: "
                f"{', '.join(k + '=' for k in COMDEFEND_OPTIONS)}"
            )
        options[key] = value.strip()

    noise: float | None = None
    if "noise" in options:
        try:
            noise = float(options["noise"])
        except ValueError:
            noise = -1.0
        if not math.isfinite(noise) or noise < 0:
            raise UsageError(f"comdefend: noise must be a number >= 0, got {options['noise']!r}")
    seed: int | None = 0
    if "seed" in options:
        text = options["seed"].lower()
        try:
            seed = None if text == "none" else int(text)
        except ValueError:
            raise UsageError(
                f"comdefend: seed must be an integer or 'none', got {options['seed']!r}"
            ) from None
    binarizer = options.get("binarizer", "hard").lower()
    if binarizer not in DEFENSE_BINARIZER_MODES:
        raise UsageError(
            f"comdefend: binarizer must be one of {', '.join(DEFENSE_BINARIZER_MODES)}, "
            f"got {binarizer!r}"
        )
    overrides: dict[str, str] = {}
    if "purify" in options:
        purify = options["purify"].lower()
        if purify not in ("patch", "full"):
            raise UsageError(f"comdefend: purify must be patch or full, got {purify!r}")
        overrides["purify_mode"] = purify
    if "precision" in options:
        overrides["precision"] = check_precision(options["precision"], device)

    from comdefend.zoo import resolve_weights

    weights = resolve_weights(path)
    model = ComDefend.from_checkpoint(weights, map_location=device, **overrides)
    return ComDefendDefense(model, noise, seed, label=path, binarizer_mode=binarizer)


def _no_argument(argument: str, device: str | torch.device) -> Defense:
    if argument:
        raise UsageError(f"'none' takes no argument, got 'none:{argument}'")
    return Identity()


for _kind in (
    DefenseKind("none", "none (no defense)", _no_argument),
    DefenseKind(
        "jpeg",
        "jpeg:Q (JPEG quality Q in 1..100)",
        lambda argument, device: JPEG(_int_argument("jpeg", argument, 1, 100, "a quality")),
    ),
    DefenseKind(
        "bits",
        "bits:B (bit depth B in 1..8)",
        lambda argument, device: BitDepthReduction(
            _int_argument("bits", argument, 1, 8, "a bit depth")
        ),
    ),
    DefenseKind(
        "median",
        "median:K (median filter K x K, K in 2..5)",
        lambda argument, device: MedianSmoothing(
            _int_argument("median", argument, 2, 5, "a kernel size")
        ),
    ),
    DefenseKind(
        "comdefend",
        "comdefend:PATH[@noise=S,seed=N,binarizer=hard|straight_through|relaxed,purify=patch|full,"
        "precision=fp32|tf32|bf16]",
        _parse_comdefend,
    ),
):
    register_defense(_kind, aliases=("identity",) if _kind.name == "none" else ())


def _parse_part(part: str, device: str | torch.device) -> Defense:
    kind, _, argument = part.partition(":")
    if kind.strip() not in DEFENSES:
        raise UsageError(f"unknown defense {kind.strip()!r} in {part!r}; valid: {_valid_specs()}")
    return DEFENSES.get(kind).build(argument.strip(), device)


def parse_defense(spec: str, device: str | torch.device = "cpu") -> Defense:
    """Build the defense that ``spec`` describes (see the module docstring for the grammar).

    Args:
        spec: e.g. ``none``, ``jpeg:75``, ``bits:4+median:2``,
            ``comdefend:runs/cifar.safetensors@noise=1.0,seed=3``.
        device: where to put model weights (ComDefend checkpoints).

    Returns:
        A :class:`~comdefend.defenses.base.Defense`; a :class:`Compose` for ``a+b``.

    Raises:
        UsageError: unknown defense, missing or out-of-range argument, bad option; the message
            lists the valid choices.
        CheckpointError: a ComDefend checkpoint that cannot be loaded.

    Example:
        >>> parse_defense("jpeg:75+median:2").name
        'jpeg:75+median:2'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty defense spec; valid: {_valid_specs()}")
    parts = [part.strip() for part in spec.split("+")]
    if any(not part for part in parts):
        raise UsageError(f"empty part in defense spec {spec!r} (stray '+'?)")
    defenses = [_parse_part(part, device) for part in parts]
    defense = defenses[0] if len(defenses) == 1 else Compose(*defenses)
    return defense.to(device)
