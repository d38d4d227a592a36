"""Classic input-transformation baselines: identity, JPEG, bit-depth reduction, median smoothing.

References:
    - N. Das et al., "Keeping the Bad Guys Out: Protecting and Vaccinating Deep Learning with JPEG
      Compression", 2017 (:class:`JPEG`).
    - W. Xu, D. Evans, Y. Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural
      Networks", NDSS 2018 (:class:`BitDepthReduction`, :class:`MedianSmoothing`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from comdefend.defenses.base import Defense
from comdefend.errors import InputError, UsageError
from comdefend.models.comdefend import check_images

PaddingMode = Literal["reflect", "symmetric", "replicate"]
EvenPadding = Literal["bottom_right", "top_left"]
PADDING_MODES: tuple[str, ...] = ("reflect", "symmetric", "replicate")
EVEN_PADDINGS: tuple[str, ...] = ("bottom_right", "top_left")


def _check_int(value: Any, what: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{what} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise UsageError(f"{what} must be in {bound}, got {value}")
    return int(value)


class Identity(Defense):
    """No defense: returns its input unchanged (the ``none`` spec).

    Shape:
        - Input: ``(N, C, H, W)``.
        - Output: the same tensor.

    Example:
        >>> Identity()(torch.rand(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """

    differentiable = True
    randomized = False

    @property
    def name(self) -> str:
        return "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, name="defense input")
        return x


class JPEG(Defense):
    """JPEG compression and decompression with Pillow (Das et al. 2017).

    Each image is rounded to 8 bits, encoded as JPEG at ``quality`` (RGB for 3 channels,
    grayscale ``L`` for 1 channel) and decoded. The output is float in [0, 1] on the input's
    device and dtype.

    The forward pass leaves PyTorch (uint8 + libjpeg), so it has **no useful gradient**: the
    output is detached from the input (``differentiable = False``). Attack it through
    :class:`comdefend.defenses.BPDA`.

    Args:
        quality: JPEG quality, 1 (worst) to 100.
        subsampling: Pillow's chroma subsampling (0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0); ``None``
            keeps Pillow's default (4:2:0). Ignored for grayscale.

    Shape:
        - Input: ``(N, C, H, W)`` with C = 1 or 3, float in [0, 1].
        - Output: same shape, dtype and device.

    Example:
        >>> JPEG(quality=75)(torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3, 16, 16])
    """

    differentiable = False
    randomized = False

    def __init__(self, quality: int = 75, subsampling: int | None = None) -> None:
        super().__init__()
        self.quality = _check_int(quality, "JPEG quality", 1, 100)
        if subsampling is not None:
            subsampling = _check_int(subsampling, "JPEG subsampling", 0, 2)
        self.subsampling = subsampling

    @property
    def name(self) -> str:
        return f"jpeg:{self.quality}"

    def params(self) -> dict[str, Any]:
        return {"quality": self.quality, "subsampling": self.subsampling}

    def _roundtrip(self, image: np.ndarray) -> np.ndarray:
        pil = Image.fromarray(image)
        buffer = io.BytesIO()
        options: dict[str, Any] = {"quality": self.quality}
        if self.subsampling is not None and pil.mode == "RGB":
            options["subsampling"] = self.subsampling
        pil.save(buffer, format="JPEG", **options)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            return np.asarray(decoded.convert(pil.mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, name="defense input")
        channels = x.shape[1]
        if channels not in (1, 3):
            raise InputError(f"JPEG needs 1 (grayscale) or 3 (RGB) channels, got {channels}")
        pixels = (x.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
        images = pixels.permute(0, 2, 3, 1).numpy()
        if channels == 1:
            images = images[..., 0]
        decoded = np.stack([self._roundtrip(np.ascontiguousarray(img)) for img in images])
        if channels == 1:
            decoded = decoded[..., None]
        out = torch.from_numpy(decoded).permute(0, 3, 1, 2).contiguous()
        return out.to(device=x.device, dtype=x.dtype) / 255


class BitDepthReduction(Defense):
    """Reduce the colour depth to ``bits`` bits per channel (feature squeezing, Xu et al. 2018).

    ``y = round(x * (2**bits - 1)) / (2**bits - 1)``. The rounding has zero gradient almost
    everywhere, hence ``differentiable = False``.

    Args:
        bits: bits per channel, 1 to 8.

    Shape:
        - Input: ``(N, C, H, W)`` float in [0, 1].
        - Output: same shape, values in ``{k / (2**bits - 1)}``.

    Example:
        >>> BitDepthReduction(1)(torch.tensor([[[[0.2, 0.7]]]])).tolist()
        [[[[0.0, 1.0]]]]
    """

    differentiable = False
    randomized = False

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        self.bits = _check_int(bits, "bit depth", 1, 8)

    @property
    def name(self) -> str:
        return f"bits:{self.bits}"

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, name="defense input")
        levels = float(2**self.bits - 1)
        return torch.round(x.clamp(0, 1) * levels) / levels


def pad2d(
    x: torch.Tensor, left: int, right: int, top: int, bottom: int, mode: PaddingMode
) -> torch.Tensor:
    """Pad the last two dimensions of ``x``.

    Modes: ``reflect`` mirrors without repeating the edge (``c b | a b c``, PyTorch's reflect,
    scipy's ``mirror``), ``symmetric`` mirrors with the edge (``b a | a b c``, scipy's
    ``reflect``), ``replicate`` repeats the edge. Images too small to mirror fall back to
    ``replicate``.
    """
    if not (left or right or top or bottom):
        return x
    h, w = x.shape[-2:]
    if mode == "reflect" and max(left, right) < w and max(top, bottom) < h:
        return F.pad(x, (left, right, top, bottom), mode="reflect")
    if mode == "symmetric" and max(left, right) <= w and max(top, bottom) <= h:
        x = torch.cat([x[..., :, :left].flip(-1), x, x[..., :, w - right :].flip(-1)], dim=-1)
        return torch.cat([x[..., :top, :].flip(-2), x, x[..., h - bottom :, :].flip(-2)], dim=-2)
    if mode not in PADDING_MODES:
        raise UsageError(f"unknown padding {mode!r}; valid: {', '.join(PADDING_MODES)}")
    return F.pad(x, (left, right, top, bottom), mode="replicate")


class MedianSmoothing(Defense):
    """Median filter over ``kernel_size`` x ``kernel_size`` windows (Xu et al. 2018).

    Implemented with ``unfold`` and ``kthvalue`` on each channel. For an even kernel (the paper's
    2 x 2 filter) the window has no centre: the image is padded one pixel more on one side
    (``even_padding``) and the *upper* median (the ``k*k // 2``-th of the sorted window, 0-based)
    is taken, as scipy's ``median_filter`` does.

    ``even_padding="top_left"`` with ``padding="symmetric"`` reproduces
    ``scipy.ndimage.median_filter(x, size=k, mode="reflect")`` exactly (the window of an even
    filter then covers the pixel and its top/left neighbours); the default pads right/bottom.

    The median is differentiable almost everywhere (its gradient goes to the selected pixel),
    hence ``differentiable = True``.

    Args:
        kernel_size: window side, >= 1 (2 or 3 in the paper).
        padding: ``reflect`` (default), ``symmetric`` or ``replicate`` (see :func:`pad2d`).
        even_padding: for even kernels, the side that gets the extra pixel: ``bottom_right``
            (default) or ``top_left``.

    Shape:
        - Input: ``(N, C, H, W)``.
        - Output: same shape.

    Example:
        >>> x = torch.zeros(1, 1, 5, 5); x[0, 0, 2, 2] = 1.0
        >>> MedianSmoothing(3)(x).max().item()
        0.0
    """

    differentiable = True
    randomized = False

    def __init__(
        self,
        kernel_size: int = 2,
        padding: PaddingMode = "reflect",
        even_padding: EvenPadding = "bottom_right",
    ) -> None:
        super().__init__()
        self.kernel_size = _check_int(kernel_size, "median kernel size", 1)
        if padding not in PADDING_MODES:
            raise UsageError(f"unknown padding {padding!r}; valid: {', '.join(PADDING_MODES)}")
        if even_padding not in EVEN_PADDINGS:
            valid = ", ".join(EVEN_PADDINGS)
            raise UsageError(f"unknown even_padding {even_padding!r}; valid: {valid}")
        self.padding: PaddingMode = padding
        self.even_padding: EvenPadding = even_padding

    @property
    def name(self) -> str:
        return f"median:{self.kernel_size}"

    def params(self) -> dict[str, Any]:
        return {
            "kernel_size": self.kernel_size,
            "padding": self.padding,
            "even_padding": self.even_padding,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, name="defense input")
        k = self.kernel_size
        if k == 1:
            return x
        n, c, h, w = x.shape
        small, large = (k - 1) // 2, k - 1 - (k - 1) // 2
        if self.even_padding == "bottom_right":
            left = top = small
            right = bottom = large
        else:
            left = top = large
            right = bottom = small
        padded = pad2d(x.reshape(n * c, 1, h, w), left, right, top, bottom, self.padding)
        windows = F.unfold(padded, kernel_size=k)  # (N*C, k*k, H*W)
        median = windows.kthvalue(k * k // 2 + 1, dim=1).values
        return median.reshape(n, c, h, w)


class Compose(Defense):
    """Apply defenses one after the other (``jpeg:75+median:2``: JPEG first).

    Nested compositions are flattened. ``differentiable`` is the AND of the parts,
    ``randomized`` the OR.

    Args:
        *defenses: at least one :class:`Defense`.

    Shape:
        - Input: ``(N, C, H, W)`` float in [0, 1].
        - Output: same shape.

    Example:
        >>> Compose(JPEG(75), MedianSmoothing(2)).name
        'jpeg:75+median:2'
    """

    def __init__(self, *defenses: Defense) -> None:
        super().__init__()
        parts: list[Defense] = []
        for defense in defenses:
            if isinstance(defense, Compose):
                parts.extend(defense.parts)
            elif isinstance(defense, Defense):
                parts.append(defense)
            else:
                raise UsageError(f"Compose takes Defense modules, got {type(defense).__name__}")
        if not parts:
            raise UsageError("Compose needs at least one defense")
        # an nn.ModuleList (registers the parts), typed as what it holds
        self.parts: Sequence[Defense] = torch.nn.ModuleList(parts)  # type: ignore[assignment]

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts)

    @property
    def differentiable(self) -> bool:  # type: ignore[override]
        return all(bool(part.differentiable) for part in self.parts)

    @property
    def randomized(self) -> bool:  # type: ignore[override]
        return any(bool(part.randomized) for part in self.parts)

    def params(self) -> dict[str, Any]:
        return {"parts": [part.settings() for part in self.parts]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            x = part(x)
        return x
