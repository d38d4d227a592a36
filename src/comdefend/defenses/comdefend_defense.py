"""ComDefend as a :class:`~comdefend.defenses.base.Defense`, with attacker views of it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from comdefend.defenses.base import Defense
from comdefend.errors import UsageError
from comdefend.models.binarizer import BinarizerMode
from comdefend.models.comdefend import ComDefend

#: Binarizer modes a defense can run in (``noisy`` is training only).
DEFENSE_BINARIZER_MODES: tuple[str, ...] = ("hard", "relaxed", "straight_through")


def _check_mode(mode: str) -> BinarizerMode:
    if mode not in DEFENSE_BINARIZER_MODES:
        valid = ", ".join(DEFENSE_BINARIZER_MODES)
        raise UsageError(f"unknown binarizer mode {mode!r}; valid: {valid}")
    return mode  # type: ignore[return-value]


def _format_number(value: float) -> str:
    return f"{value:g}"


class ComDefendDefense(Defense):
    """A ComDefend purifier (``model.purify``) as a defense.

    The defense owns its binarizer settings (mode, test-time noise std, noise generator) and
    installs them on ``model.binarizer`` only for the duration of each forward call, restoring
    the previous values afterwards. Several defenses can therefore share one model, e.g. the
    evaluated defense (``hard``) and the attacker's view of it (``straight_through`` or
    ``relaxed``, see :meth:`with_mode`). This swap is not thread-safe. The model is kept in
    eval mode: ``train()`` on the defense does not reach it.

    Binarizer modes:
        ``hard``: the real defense; zero gradient almost everywhere (``differentiable`` False).
        ``straight_through``: same forward, identity backward through the threshold (exactly
        BPDA of the threshold).
        ``relaxed``: ``sigmoid`` instead of the threshold (a differentiable surrogate whose
        forward differs from the defense).

    Args:
        model: a :class:`~comdefend.models.ComDefend` (put in eval mode).
        noise_std: test-time noise std before the threshold; ``None`` keeps the model config's
            ``inference_noise_std``. The defense is ``randomized`` iff it is > 0.
        seed: seed of the defense's own noise generator (reproducible draws; see
            :meth:`reseed`); ``None`` uses PyTorch's global RNG.
        label: what follows ``comdefend:`` in :attr:`name`, normally the checkpoint path
            (default: the model's preset name).
        binarizer_mode: ``hard`` (default), ``straight_through`` or ``relaxed``.

    Shape:
        - Input: ``(N, C, H, W)`` with C = ``model.config.image_channels``, float in [0, 1].
        - Output: same shape, in [0, 1].

    Example:
        >>> from comdefend.models import ComDefend, ComDefendConfig
        >>> defense = ComDefendDefense(ComDefend(ComDefendConfig(image_channels=1)), 1.0, seed=3)
        >>> defense.randomized, defense(torch.rand(2, 1, 8, 8)).shape
        (True, torch.Size([2, 1, 8, 8]))
        >>> with defense.gradient_mode("relaxed"):
        ...     y = defense(torch.rand(2, 1, 8, 8, requires_grad=True))
    """

    def __init__(
        self,
        model: ComDefend,
        noise_std: float | None = None,
        seed: int | None = 0,
        *,
        label: str | None = None,
        binarizer_mode: str = "hard",
    ) -> None:
        super().__init__()
        if not isinstance(model, ComDefend):
            raise UsageError(
                f"ComDefendDefense wraps a ComDefend model, got {type(model).__name__}"
            )
        if noise_std is None:
            noise_std = float(model.config.inference_noise_std)
        noise_std = float(noise_std)
        if not math.isfinite(noise_std) or noise_std < 0:
            raise UsageError(f"noise std must be a finite number >= 0, got {noise_std}")
        self.model = model.eval()
        self.noise_std = noise_std
        self.label = label
        self.binarizer_mode: BinarizerMode = _check_mode(binarizer_mode)
        self.seed: int | None = None
        self.generator: torch.Generator | None = None
        self.reseed(seed)

    # -- flags and description ---------------------------------------------------------------
    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return self.binarizer_mode != "hard"

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return self.noise_std > 0

    def _loaded_config(self, key: str) -> Any:
        """A config value as the checkpoint stored it (before ``from_checkpoint`` overrides)."""
        metadata = getattr(self.model, "checkpoint_metadata", None)
        stored = metadata.get("config", {}) if isinstance(metadata, dict) else {}
        return stored.get(key, getattr(self.model.config, key))

    @property
    def name(self) -> str:
        """``comdefend:LABEL[@options]``, options only where they differ from the checkpoint's."""
        options = []
        if self.noise_std > 0 or self.noise_std != self._loaded_config("inference_noise_std"):
            options.append(f"noise={_format_number(self.noise_std)}")
        if self.randomized and self.seed != 0:
            options.append(f"seed={'none' if self.seed is None else self.seed}")
        if self.binarizer_mode != "hard":
            options.append(f"binarizer={self.binarizer_mode}")
        if self.model.config.purify_mode != self._loaded_config("purify_mode"):
            options.append(f"purify={self.model.config.purify_mode}")
        if self.model.config.precision != "fp32":
            options.append(f"precision={self.model.config.precision}")
        label = self.label if self.label is not None else self.model.config.preset
        return f"comdefend:{label}" + ("@" + ",".join(options) if options else "")

    def params(self) -> dict[str, Any]:
        config = self.model.config
        weights = getattr(self.model, "weights", None)
        return {
            "label": self.label,
            "weights": weights.to_dict() if weights is not None else None,
            "noise_std": self.noise_std,
            "seed": self.seed,
            "binarizer_mode": self.binarizer_mode,
            "preset": config.preset,
            "image_channels": config.image_channels,
            "code_channels": config.code_channels,
            "purify_mode": config.purify_mode,
            "precision": config.precision,
            "threshold": config.threshold,
            "source": config.source,
        }

    # -- randomness and modes ------------------------------------------------------------------
    def reseed(self, seed: int | None) -> None:
        """Restart the noise stream from ``seed`` (``None``: use PyTorch's global RNG)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise UsageError(f"seed must be an integer or None, got {seed!r}")
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)

    @contextmanager
    def gradient_mode(self, mode: str) -> Iterator[ComDefendDefense]:
        """Temporarily run the binarizer in ``mode`` (hard, relaxed or straight_through).

        Example:
            >>> with defense.gradient_mode("straight_through"):
            ...     loss = classifier(defense(x)).sum()  # doctest: +SKIP
        """
        previous = self.binarizer_mode
        self.binarizer_mode = _check_mode(mode)
        try:
            yield self
        finally:
            self.binarizer_mode = previous

    def with_mode(self, mode: str, seed: int | None | str = "same") -> ComDefendDefense:
        """A new defense sharing this model, with binarizer ``mode`` and the same noise std.

        Args:
            mode: hard, relaxed or straight_through.
            seed: seed of the new defense's generator; ``"same"`` (default) reuses this one's
                seed, giving the same noise stream from the start.
        """
        new_seed = self.seed if seed == "same" else seed
        return ComDefendDefense(
            self.model,
            self.noise_std,
            new_seed,  # type: ignore[arg-type]
            label=self.label,
            binarizer_mode=mode,
        )

    # -- module behaviour ---------------------------------------------------------------------
    def train(self, mode: bool = True) -> ComDefendDefense:
        """Set the defense's flag only: the wrapped purifier always stays in eval mode."""
        self.training = mode
        self.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        binarizer = self.model.binarizer
        saved = (binarizer.inference_mode, binarizer.inference_noise_std, binarizer.generator)
        binarizer.inference_mode = self.binarizer_mode
        binarizer.inference_noise_std = self.noise_std
        binarizer.generator = self.generator
        try:
            if self.model.training:
                self.model.eval()
            return self.model.purify(x)
        finally:
            (binarizer.inference_mode, binarizer.inference_noise_std, binarizer.generator) = saved
