"""Presets: names, aliases, exact widths, parameter and MAC counts (computed independently)."""

from __future__ import annotations

import numpy as np
import pytest

from comdefend.errors import UsageError
from comdefend.models.layers import residual_widths
from comdefend.models.presets import (
    PRESETS,
    build_decoder,
    build_encoder,
    count_parameters,
    get_preset,
    macs_per_pixel,
    preset_summary,
)

SEED_NAMES = [
    "normal",
    "1_on_off",
    "2_on_off",
    "3_on_off",
    "off_on_1",
    "off_on_2",
    "off_on_3",
    "1_1",
    "2_2",
    "3_3",
]


def test_ten_presets_with_seed_aliases() -> None:
    assert len(PRESETS) == 10
    assert sorted(p.study_name for p in PRESETS.values()) == sorted(SEED_NAMES)
    for study_name in SEED_NAMES:
        preset = get_preset(study_name)
        assert get_preset(preset.name) is preset


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(UsageError, match="1_on_off"):
        get_preset("resnet")


def test_seed_width_formula() -> None:
    assert residual_widths(1) == ([64, 64], [256, 32])
    assert residual_widths(2) == ([64, 128, 128, 64], [256, 512, 256, 32])
    assert residual_widths(3) == ([64, 128, 256, 256, 128, 64], [256, 512, 1024, 512, 256, 32])


def _plain_counts(channels: list[int]) -> tuple[int, int]:
    params = sum(9 * a * b + b for a, b in zip(channels[:-1], channels[1:], strict=True))
    macs = sum(9 * a * b for a, b in zip(channels[:-1], channels[1:], strict=True))
    return params, macs


def _bottleneck(c_in: int, mid: int, out: int, projection: bool) -> tuple[int, int]:
    conv_macs = c_in * mid + 9 * mid * mid + mid * out + (c_in * out if projection else 0)
    bn_params = 2 * (mid + mid + out + (out if projection else 0))
    return conv_macs + bn_params, conv_macs


def _residual_counts(c_in: int, c_out: int, depth: int) -> tuple[int, int]:
    f1, f2 = residual_widths(depth)
    params = macs = 0
    for mid, out in zip(f1, f2, strict=True):
        for block in range(3):
            p, m = _bottleneck(c_in if block == 0 else out, mid, out, projection=block == 0)
            params, macs = params + p, macs + m
        c_in = out
    return params + c_in * c_out + c_out, macs + c_in * c_out


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("channels", [3, 1])
def test_counts_match_independent_formula(name: str, channels: int) -> None:
    preset = PRESETS[name]
    code = {3: 12, 1: 4}[channels]
    plain_enc = {
        3: [3, 16, 32, 64, 128, 256, 128, 64, 32, 12],
        1: [1, 32, 64, 128, 256, 128, 64, 64, 32, 4],
    }[channels]
    plain_dec = {
        3: [12, 32, 64, 128, 256, 128, 64, 32, 16, 3],
        1: [4, 32, 64, 128, 256, 128, 64, 64, 32, 1],
    }[channels]
    enc = (
        _plain_counts(plain_enc)
        if preset.encoder_depth == 0
        else _residual_counts(channels, code, preset.encoder_depth)
    )
    dec = (
        _plain_counts(plain_dec)
        if preset.decoder_depth == 0
        else _residual_counts(code, channels, preset.decoder_depth)
    )
    summary = preset_summary(preset, channels)
    assert (summary["encoder_parameters"], summary["encoder_macs_per_pixel"]) == enc
    assert (summary["decoder_parameters"], summary["decoder_macs_per_pixel"]) == dec


def test_residual_encoder_1_is_cheaper_than_plain() -> None:
    plain, residual = preset_summary(get_preset("normal")), preset_summary(get_preset("1_on_off"))
    assert residual["encoder_macs_per_pixel"] < plain["encoder_macs_per_pixel"]


@pytest.mark.parametrize("stem,channels", [("20_0.0001", 3), ("_mnist", 1)])
def test_plain_counts_match_official_checkpoints(official_dir, stem: str, channels: int) -> None:
    from comdefend.official import read_official_arrays

    preset = get_preset("normal")
    code = {3: 12, 1: 4}[channels]
    for prefix, build in (("enc", build_encoder), ("dec", build_decoder)):
        arrays = read_official_arrays(official_dir / f"{prefix}{stem}.npy")
        module = build(preset, channels, code)
        assert count_parameters(module) == sum(int(np.prod(a.shape)) for a in arrays)
        kernel_macs = sum(int(np.prod(a.shape)) for a in arrays[0::2])
        assert macs_per_pixel(module) == kernel_macs
