"""EfficientNet-Lite0: architecture facts, TensorFlow SAME padding, and the pretrained weights."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional

from comdefend.models.classifiers import build_classifier, count_parameters
from comdefend.models.efficientnet import (
    LITE0_STAGES,
    EfficientNetLite0,
    MBConvBlock,
    SameConv2d,
    same_padding,
)


def test_lite0_has_the_released_layout_and_parameter_count() -> None:
    model = EfficientNetLite0()
    # 4,652,008 parameters: what the released file's tensors add up to.
    assert count_parameters(model) == 4_652_008
    keys = set(model.state_dict())
    assert len(keys) == 296 + 2  # the file's 296 tensors + the normalization buffers
    assert {"_conv_stem.weight", "_bn0.running_var", "_conv_head.weight", "_bn1.weight"} <= keys
    assert {"_fc.weight", "_fc.bias", "normalize.mean", "normalize.std"} <= keys
    assert "_blocks.0._expand_conv.weight" not in keys  # expansion ratio 1: no expansion conv
    assert model.state_dict()["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert model.state_dict()["_blocks.3._depthwise_conv.weight"].shape == (144, 1, 5, 5)
    assert sum(stage.blocks for stage in LITE0_STAGES) == len(model._blocks) == 16
    assert not any("_se_" in key for key in keys)  # no squeeze-excitation


def test_lite0_runs_on_other_sizes_and_builds_by_name() -> None:
    model = build_classifier("efficientnet-lite0", num_classes=1000).eval()
    assert model.config is not None and model.config.mean == (0.498, 0.498, 0.498)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 224, 224)).shape == (2, 1000)
        assert model(torch.rand(1, 3, 97, 131)).shape == (1, 1000)


def test_same_padding_puts_the_odd_pixel_after_like_tensorflow() -> None:
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, 3, stride=2)
    x = torch.rand(1, 2, 8, 8)
    expected = functional.conv2d(functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected)
    symmetric = functional.conv2d(x, conv.weight, stride=2, padding=1)
    assert not torch.allclose(conv(x), symmetric)  # PyTorch's padding is a different model
    assert same_padding(7, 3, 2) == (1, 1) and same_padding(224, 1, 1) == (0, 0)


def test_mbconv_shortcut_only_when_shape_is_kept() -> None:
    keep = MBConvBlock(8, 8, 3, 1, 6).eval()
    change = MBConvBlock(8, 16, 3, 2, 6).eval()
    assert keep.has_shortcut and not change.has_shortcut
    x = torch.rand(2, 8, 10, 10)
    with torch.no_grad():
        assert change(x).shape == (2, 16, 5, 5)
        for module in keep.modules():  # zero the last BN: the block becomes the identity
            if module is keep._bn2:
                module.weight.zero_()
                module.bias.zero_()
        assert torch.equal(keep(x), x)


@pytest.mark.slow
def test_pretrained_lite0_classifies_imagenet_images(efficientnet_lite0, imagenet_dir) -> None:
    """The converted weights reproduce the top-1 of the first 50 sample images (center crop
    224) measured when they were registered."""
    from comdefend.data.images import read_image

    rows = (imagenet_dir / "labels.csv").read_text().splitlines()[1:51]
    images, labels = [], []
    for row in rows:
        file, label = row.split(",")[:2]
        image = read_image(imagenet_dir / "images" / file, channels=3)
        top = (image.shape[1] - 224) // 2
        left = (image.shape[2] - 224) // 2
        images.append(image[:, top : top + 224, left : left + 224])
        labels.append(int(label))
    with torch.no_grad():
        predictions = efficientnet_lite0(torch.stack(images)).argmax(1)
    correct = int((predictions == torch.tensor(labels)).sum())
    assert correct == pytest.approx(41, abs=1)  # 82%; the 1,000 give 88.1%
