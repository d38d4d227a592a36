"""The ten ComDefend architecture presets, declared once.

Training, checkpoint loading, the CLI (``comdefend presets``) and the docs all read
:data:`PRESETS`. Each preset has a readable canonical name and the study's name as an alias.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from comdefend.errors import UsageError
from comdefend.models.layers import PlainCNN, ResidualCNN
from comdefend.registry import Registry
from comdefend.validation import positive_int

# The authors' plain widths (hidden layers only), per image channel count.
PLAIN_ENCODER_WIDTHS = {
    3: [16, 32, 64, 128, 256, 128, 64, 32],
    1: [32, 64, 128, 256, 128, 64, 64, 32],
}
PLAIN_DECODER_WIDTHS = {
    3: [32, 64, 128, 256, 128, 64, 32, 16],
    1: [32, 64, 128, 256, 128, 64, 64, 32],
}
DEFAULT_CODE_CHANNELS = {3: 12, 1: 4}
ENCODER_INPUT_SHIFT = -0.5


@dataclass(frozen=True)
class Preset:
    """One encoder/decoder configuration.

    ``encoder_depth`` / ``decoder_depth`` are 0 for the plain (authors') network and n for the
    residual network of depth n.
    """

    name: str
    study_name: str
    encoder_depth: int
    decoder_depth: int
    description: str

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, self.study_name)

    def to_dict(self) -> dict:
        return asdict(self)


#: The presets, registered under their canonical names with the residual study's names as aliases.
PRESETS: Registry[Preset] = Registry("preset")


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Register ``preset`` under its name and study name (alias)."""
    return PRESETS.add(preset.name, preset, aliases=(preset.study_name,), replace=replace)


def _declare() -> list[Preset]:
    presets = [Preset("plain", "normal", 0, 0, "the authors' ComCNN + RecCNN")]
    for n in (1, 2, 3):
        presets.append(
            Preset(
                f"residual-encoder-{n}",
                f"{n}_on_off",
                n,
                0,
                f"residual encoder (depth {n}), plain decoder",
            )
        )
    for n in (1, 2, 3):
        presets.append(
            Preset(
                f"residual-decoder-{n}",
                f"off_on_{n}",
                0,
                n,
                f"plain encoder, residual decoder (depth {n})",
            )
        )
    for n in (1, 2, 3):
        presets.append(
            Preset(
                f"residual-both-{n}", f"{n}_{n}", n, n, f"residual encoder and decoder (depth {n})"
            )
        )
    return presets


for _preset in _declare():
    register_preset(_preset)


def list_presets() -> list[str]:
    """Canonical preset names, in the residual study's order."""
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by canonical name or study alias (e.g. ``"normal"`` or ``"1_on_off"``)."""
    if name == "all":
        raise UsageError("'all' names every preset; pass one preset here")
    if name in PRESETS:
        return PRESETS.get(name)
    valid = ", ".join(f"{p.name} ({p.study_name})" for p in PRESETS.values())
    raise UsageError(f"unknown preset {name!r}; valid presets: {valid}")


def _check_channels(image_channels: int) -> None:
    if image_channels not in PLAIN_ENCODER_WIDTHS:
        raise UsageError(f"image_channels must be 1 (grayscale) or 3 (RGB), got {image_channels}")


def build_encoder(preset: Preset, image_channels: int, code_channels: int) -> nn.Module:
    """ComCNN for ``preset``: image in [0, 1] -> real-valued code (before the binarizer)."""
    _check_channels(image_channels)
    if preset.encoder_depth == 0:
        widths = [image_channels, *PLAIN_ENCODER_WIDTHS[image_channels], code_channels]
        return PlainCNN(widths, input_shift=ENCODER_INPUT_SHIFT)
    return ResidualCNN(image_channels, code_channels, preset.encoder_depth, final_activation=None)


def build_decoder(preset: Preset, image_channels: int, code_channels: int) -> nn.Module:
    """RecCNN for ``preset``: binary code -> image in [0, 1]."""
    _check_channels(image_channels)
    if preset.decoder_depth == 0:
        widths = [code_channels, *PLAIN_DECODER_WIDTHS[image_channels], image_channels]
        return PlainCNN(widths, final_activation="sigmoid")
    return ResidualCNN(code_channels, image_channels, preset.decoder_depth, "sigmoid")


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def macs_per_pixel(module: nn.Module) -> int:
    """Multiply-accumulates per pixel of every convolution (all are stride 1, same size).

    BatchNorm, activations and bias additions are not counted (the CompressAI/fvcore convention).
    """
    total = 0
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            k_h, k_w = layer.kernel_size
            total += k_h * k_w * (layer.in_channels // layer.groups) * layer.out_channels
    return total


def receptive_radius(module: nn.Module) -> int:
    """How many pixels away an output pixel can see: sum of (k - 1) / 2 over the convolutions."""
    radius = 0
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            radius += (layer.kernel_size[0] - 1) // 2 * layer.dilation[0]
    return radius


def preset_summary(
    preset: Preset, image_channels: int = 3, code_channels: int | None = None
) -> dict:
    """Names, parameter counts and MACs/pixel of encoder and decoder for one preset."""
    if code_channels is None:
        code = DEFAULT_CODE_CHANNELS[image_channels]
    else:  # 0 is an error, not "the default" (as ``code_channels or default`` made it)
        code = positive_int(code_channels, "code_channels")
    encoder = build_encoder(preset, image_channels, code)
    decoder = build_decoder(preset, image_channels, code)
    return {
        **preset.to_dict(),
        "image_channels": image_channels,
        "code_channels": code,
        "bits_per_pixel": code,
        "encoder_parameters": count_parameters(encoder),
        "decoder_parameters": count_parameters(decoder),
        "encoder_macs_per_pixel": macs_per_pixel(encoder),
        "decoder_macs_per_pixel": macs_per_pixel(decoder),
    }
