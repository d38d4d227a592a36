"""Building blocks of the ComDefend encoders and decoders.

``PlainCNN`` is the authors' ComCNN / RecCNN shape: 3x3 convolutions, stride 1, zero "same"
padding, ELU between layers. ``BottleneckBlock`` and ``ResidualStage`` are the residual variant's
projection and identity bottleneck blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PlainCNN(nn.Sequential):
    """A stack of 3x3 convolutions with ELU between them.

    Args:
        channels: ``[in, hidden..., out]``; ``len(channels) - 1`` convolutions.
        input_shift: added to the input first (the authors' ComCNN uses -0.5).
        final_activation: ``None`` or ``"sigmoid"`` after the last convolution.
    """

    def __init__(
        self,
        channels: Sequence[int],
        input_shift: float = 0.0,
        final_activation: str | None = None,
    ) -> None:
        layers: list[nn.Module] = []
        pairs = list(zip(channels[:-1], channels[1:], strict=True))
        for index, (c_in, c_out) in enumerate(pairs):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, stride=1, padding=1))
            if index < len(pairs) - 1:
                layers.append(nn.ELU())
        if final_activation == "sigmoid":
            layers.append(nn.Sigmoid())
        elif final_activation is not None:
            raise ValueError(f"unknown final activation {final_activation!r}")
        super().__init__(*layers)
        self.input_shift = float(input_shift)
        self.channels = list(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift:
            x = x + self.input_shift
        return super().forward(x)


def _conv_bn(c_in: int, c_out: int, kernel_size: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant (as in the residual study's TF layers).
    return [
        nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(c_out),
    ]


class BottleneckBlock(nn.Module):
    """Bottleneck residual block: 1x1 -> 3x3 -> 1x1 (BatchNorm, ReLU after the first two).

    With ``projection=True`` the shortcut is a 1x1 conv + BatchNorm to ``out_channels``;
    otherwise the shortcut is the input itself, which must already have ``out_channels``.

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(N, out_channels, H, W)``.
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, projection: bool
    ) -> None:
        super().__init__()
        if not projection and in_channels != out_channels:
            raise ValueError("an identity block needs in_channels == out_channels")
        self.body = nn.Sequential(
            *_conv_bn(in_channels, mid_channels, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(mid_channels, mid_channels, 3),
            nn.ReLU(inplace=True),
            *_conv_bn(mid_channels, out_channels, 1),
        )
        self.shortcut: nn.Module = (
            nn.Sequential(*_conv_bn(in_channels, out_channels, 1)) if projection else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResidualStage(nn.Sequential):
    """One projection bottleneck block followed by two identity blocks of the same widths."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__(
            BottleneckBlock(in_channels, mid_channels, out_channels, projection=True),
            BottleneckBlock(out_channels, mid_channels, out_channels, projection=False),
            BottleneckBlock(out_channels, mid_channels, out_channels, projection=False),
        )


def residual_widths(depth: int) -> tuple[list[int], list[int]]:
    """The residual study's stage widths for depth ``n``.

    ``f1 = [2^(6+i) for i < n] + [2^(6+n-1-i) for i < n]`` (bottleneck widths) and
    ``f2 = 4 * f1`` with its middle element (index n) removed and 32 appended (stage outputs).

    Example:
        >>> residual_widths(1)
        ([64, 64], [256, 32])
    """
    if depth < 1:
        raise ValueError(f"residual depth must be >= 1, got {depth}")
    f1 = [2 ** (6 + i) for i in range(depth)] + [2 ** (6 + depth - 1 - i) for i in range(depth)]
    f2 = [4 * width for width in f1]
    del f2[depth]
    f2.append(32)
    return f1, f2


class ResidualCNN(nn.Module):
    """2n residual stages followed by a 1x1 convolution (and optionally a sigmoid).

    Args:
        in_channels: image channels (encoder) or code channels (decoder).
        out_channels: code channels (encoder) or image channels (decoder).
        depth: n, the residual study's residual depth (1, 2 or 3 in the ten presets).
        final_activation: ``None`` (encoder) or ``"sigmoid"`` (decoder).
    """

    def __init__(
        self, in_channels: int, out_channels: int, depth: int, final_activation: str | None
    ) -> None:
        super().__init__()
        f1, f2 = residual_widths(depth)
        stages: list[nn.Module] = []
        c_in = in_channels
        for mid, out in zip(f1, f2, strict=True):
            stages.append(ResidualStage(c_in, mid, out))
            c_in = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(c_in, out_channels, kernel_size=1)
        if final_activation not in (None, "sigmoid"):
            raise ValueError(f"unknown final activation {final_activation!r}")
        self.final_activation = final_activation
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.stages(x))
        return torch.sigmoid(y) if self.final_activation == "sigmoid" else y
