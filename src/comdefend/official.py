"""Import the authors' released ComDefend checkpoints (TensorFlow/canton ``.npy`` files).

Each file is a NumPy ``.npz`` archive whose ``w`` entry is an object array of 18 arrays: for each
of the 9 convolutions a kernel in HWIO layout (height, width, in, out) then its bias. Object
arrays are stored as pickles, so they are read here with a restricted unpickler that can only
rebuild NumPy arrays: a file that asks for anything else is refused, never executed.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from comdefend.checkpoint import check_weights
from comdefend.errors import CheckpointError
from comdefend.limits import limit
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import PLAIN_DECODER_WIDTHS, PLAIN_ENCODER_WIDTHS

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("copyreg", "_reconstructor"),
    # Protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1"): harmless.
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to unpickle {module}.{name}: only NumPy arrays are allowed"
        )


#: The authors' files hold one object array of this many arrays (9 kernels, 9 biases).
EXPECTED_ARRAYS = 18
#: Largest single array (elements): their largest kernel, 3x3x256x128, has 294,912.
MAX_ARRAY_ELEMENTS = 1 << 24


def _check_size(size: int, source: str) -> None:
    ceiling = limit("official_bytes")
    if size > ceiling:
        raise CheckpointError(
            f"{source}: {size:,} bytes is more than the authors' files could hold ({ceiling:,}); "
            "raise $COMDEFEND_MAX_OFFICIAL_BYTES if this file is genuine"
        )


def _read_npy_bytes(raw: bytes, source: str) -> np.ndarray:
    """The object array of an authors' ``.npy``, with shape and dtype checked before any work."""
    stream = io.BytesIO(raw)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError as error:
        raise CheckpointError(f"{source}: not a NumPy array file ({error})") from error
    count = math.prod(shape)
    if not dtype.hasobject or count != EXPECTED_ARRAYS:
        raise CheckpointError(
            f"{source}: expected an object array of {EXPECTED_ARRAYS} weight arrays, found "
            f"dtype {dtype} and shape {tuple(shape)}"
        )
    try:
        array = _ArraysOnlyUnpickler(stream, encoding="latin1").load()
    except CheckpointError:
        raise
    except Exception as error:  # a corrupt pickle can raise almost anything
        raise CheckpointError(f"{source}: corrupt object array ({error})") from error
    # Never np.asarray() an unchecked object: nested lists sharing one list explode in size.
    if not isinstance(array, np.ndarray) or array.dtype != object or array.size != count:
        raise CheckpointError(
            f"{source}: the object array holds a {type(array).__name__}, not "
            f"{EXPECTED_ARRAYS} NumPy arrays"
        )
    return array.reshape(-1)


def read_official_arrays(path: str | os.PathLike) -> list[np.ndarray]:
    """The 18 weight arrays of one authors' ``.npy`` file, safely.

    Sizes are bounded before anything is allocated (the file: ``official_bytes`` in
    :mod:`comdefend.limits`; each array: :data:`MAX_ARRAY_ELEMENTS`); every array must be
    floating point and finite.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"file not found: {file}")
    _check_size(file.stat().st_size, str(file))
    raw = file.read_bytes()
    if raw.startswith(b"PK"):
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                if "w.npy" not in archive.namelist():
                    raise CheckpointError(
                        f"{file}: archive has no 'w' entry (found {archive.namelist()})"
                    )
                _check_size(archive.getinfo("w.npy").file_size, f"{file} (w.npy unpacked)")
                array = _read_npy_bytes(archive.read("w.npy"), str(file))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as error:
            raise CheckpointError(f"{file}: corrupt archive ({error})") from error
    else:
        array = _read_npy_bytes(raw, str(file))
    arrays = []
    for index, item in enumerate(array):
        name = f"array {index} (layer {index // 2} {'bias' if index % 2 else 'kernel'})"
        if not isinstance(item, np.ndarray) or item.dtype.kind != "f":
            kind = item.dtype if isinstance(item, np.ndarray) else type(item).__name__
            raise CheckpointError(f"{file}: {name} is {kind}; weights must be floating point")
        if item.size > MAX_ARRAY_ELEMENTS:
            raise CheckpointError(
                f"{file}: {name} has {item.size:,} elements, more than any ComDefend layer "
                f"({MAX_ARRAY_ELEMENTS:,})"
            )
        arrays.append(np.asarray(item, dtype=np.float32))
    for index in range(0, EXPECTED_ARRAYS, 2):
        kernel, bias = arrays[index], arrays[index + 1]
        if kernel.ndim != 4 or kernel.shape[:2] != (3, 3) or bias.shape != (kernel.shape[3],):
            raise CheckpointError(
                f"{file}: layer {index // 2} has kernel {kernel.shape} and bias {bias.shape}; "
                "expected a 3x3 HWIO kernel and a matching bias"
            )
    check_weights(
        {f"array {i}": torch.from_numpy(a) for i, a in enumerate(arrays)}, file
    )  # NaN / inf
    return arrays


def _channels(arrays: list[np.ndarray]) -> list[int]:
    return [arrays[0].shape[2]] + [arrays[index].shape[3] for index in range(0, 18, 2)]


def _detect(encoder: list[int], decoder: list[int]) -> int:
    for image_channels in (3, 1):
        code = encoder[-1]
        expected_encoder = [image_channels, *PLAIN_ENCODER_WIDTHS[image_channels], code]
        expected_decoder = [code, *PLAIN_DECODER_WIDTHS[image_channels], image_channels]
        if encoder == expected_encoder and decoder == expected_decoder:
            return image_channels
    raise CheckpointError(
        f"these files do not hold the authors' ComCNN/RecCNN: encoder channels {encoder}, "
        f"decoder channels {decoder} (expected e.g. {[3, *PLAIN_ENCODER_WIDTHS[3], 12]} and "
        f"{[12, *PLAIN_DECODER_WIDTHS[3], 3]}); did you swap the encoder and decoder files?"
    )


def _copy_into(sequential: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    convs = [layer for layer in sequential.modules() if isinstance(layer, torch.nn.Conv2d)]
    for conv, index in zip(convs, range(0, 18, 2), strict=True):
        kernel = torch.from_numpy(arrays[index].copy()).permute(3, 2, 0, 1)  # HWIO -> OIHW
        conv.weight.data.copy_(kernel)
        assert conv.bias is not None
        conv.bias.data.copy_(torch.from_numpy(arrays[index + 1].copy()))


def import_official(encoder_path: str | os.PathLike, decoder_path: str | os.PathLike) -> ComDefend:
    """Build a :class:`ComDefend` from the authors' encoder and decoder ``.npy`` files.

    RGB or grayscale is detected from the shapes. The config records the authors' pipeline:
    BGR channel order for RGB (OpenCV), 32x32 non-overlapping patches, no test-time noise, and
    their ``(x * 255).astype(uint8)`` output quantisation.
    """
    encoder_arrays = read_official_arrays(encoder_path)
    decoder_arrays = read_official_arrays(decoder_path)
    image_channels = _detect(_channels(encoder_arrays), _channels(decoder_arrays))
    rgb = image_channels == 3
    config = ComDefendConfig(
        preset="plain",
        image_channels=image_channels,
        code_channels=int(encoder_arrays[-1].shape[0]),
        inference_noise_std=0.0,
        purify_mode="patch" if rgb else "full",
        patch_size=32,
        channel_order="BGR" if rgb else "RGB",
        output_quantization="floor",
        source=f"official:{Path(encoder_path).name}+{Path(decoder_path).name}",
    )
    model = ComDefend(config)
    _copy_into(model.encoder, encoder_arrays)
    _copy_into(model.decoder, decoder_arrays)
    return model.eval()
