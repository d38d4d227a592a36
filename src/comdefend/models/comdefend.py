"""ComDefend: ComCNN -> binarizer -> RecCNN, as one ``nn.Module`` purifier."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from comdefend.checkpoint import (
    check_config_fields,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from comdefend.errors import CheckpointError, InputError, UsageError
from comdefend.limits import check_choice, check_int, check_number
from comdefend.models.binarizer import BINARIZER_MODES, Binarizer, BinarizerMode
from comdefend.models.parallel import run_chunks
from comdefend.models.precision import Precision, check_precision, precision_context
from comdefend.models.presets import (
    DEFAULT_CODE_CHANNELS,
    build_decoder,
    build_encoder,
    get_preset,
    receptive_radius,
)
from comdefend.models.tiling import run_overlapping, run_patches

if TYPE_CHECKING:
    from comdefend.zoo import WeightsRef

PurifyMode = Literal["patch", "full"]
PURIFIER_KIND = "purifier"
#: Binarizer modes valid outside training.
INFERENCE_MODES = tuple(mode for mode in BINARIZER_MODES if mode != "noisy")

# Inference on the CPU runs the batch in chunks whose widest activation fits in this many bytes.
# A batch of 256 CIFAR-10 images has 268 MB activations in the 256-channel layers, far beyond
# the caches; chunks of about 4 MB stay in L3 (L2 on larger CPUs), which makes the whole pass
# about 1.5-2x faster on the development CPU (docs/PERFORMANCE.md, benchmarks/purify.py).
# The chunks are spread over threads with one intra-op thread each (comdefend.models.parallel),
# so that a core taken by another process delays one chunk, not every convolution's barrier.
# Convolutions treat each image independently, so the result does not depend on the chunking.
CPU_CHUNK_BYTES = 4 * 2**20


@dataclass
class ComDefendConfig:
    """Everything needed to rebuild a ComDefend model; travels inside every checkpoint.

    Attributes:
        preset: architecture preset (canonical name or study alias, see ``comdefend presets``).
        image_channels: 3 (RGB) or 1 (grayscale).
        code_channels: binary code channels = bits per pixel (12 for RGB, 4 for grayscale).
        noise_std: std of the training noise before the sigmoid (20).
        inference_noise_std: std of test-time noise before thresholding (0; authors' scripts 1.0).
        threshold: threshold on the sigmoid output at inference (0.5).
        inference_mode: binarizer mode in eval mode: hard, relaxed or straight_through.
        purify_mode: ``patch`` (independent P x P tiles) or ``full`` (whole image).
        patch_size: P for ``patch`` mode.
        max_tile: in ``full`` mode, larger images are processed in overlapping tiles this size.
        channel_order: order the network expects (``BGR`` for the authors' OpenCV pipeline);
            inputs and outputs of the Python API are always RGB.
        output_quantization: how ``comdefend purify`` turns [0, 1] into 8 bits: ``round`` or
            ``floor`` (the authors' ``(x * 255).astype(uint8)``).
        source: free text: where the weights came from.
        precision: numeric precision of purification: ``fp32`` (default), ``tf32`` (CUDA) or
            ``bf16`` (:mod:`comdefend.models.precision`; training is always fp32).
    """

    preset: str = "plain"
    image_channels: int = 3
    code_channels: int | None = None
    noise_std: float = 20.0
    inference_noise_std: float = 0.0
    threshold: float = 0.5
    inference_mode: BinarizerMode = "hard"
    purify_mode: PurifyMode = "full"
    patch_size: int = 32
    max_tile: int = 512
    channel_order: Literal["RGB", "BGR"] = "RGB"
    output_quantization: Literal["round", "floor"] = "round"
    source: str = ""
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        # Every field may come from a file's metadata: check types and bound sizes here, before
        # a network of that size is built.
        if not isinstance(self.preset, str):
            raise UsageError(f"preset must be a name, got {self.preset!r}")
        self.preset = get_preset(self.preset).name
        check_int("image_channels", self.image_channels, 1, 3)
        if self.image_channels not in DEFAULT_CODE_CHANNELS:
            raise UsageError(f"image_channels must be 1 or 3, got {self.image_channels}")
        if self.code_channels is None:
            self.code_channels = DEFAULT_CODE_CHANNELS[self.image_channels]
        check_int("code_channels", self.code_channels, 1, limit="code_channels")
        for name in ("noise_std", "inference_noise_std"):
            setattr(self, name, check_number(name, getattr(self, name), 0.0))
        self.threshold = check_number("threshold", self.threshold, 0.0, 1.0)
        check_choice("inference_mode", self.inference_mode, INFERENCE_MODES)
        check_choice("purify_mode", self.purify_mode, ("patch", "full"))
        check_int("patch_size", self.patch_size, 1, limit="patch_size")
        check_int("max_tile", self.max_tile, 1, limit="max_tile")
        check_choice("channel_order", self.channel_order, ("RGB", "BGR"))
        check_choice("output_quantization", self.output_quantization, ("round", "floor"))
        if not isinstance(self.source, str):
            raise UsageError(f"source must be a string, got {self.source!r}")
        self.precision = check_precision(self.precision)

    @property
    def bits_per_pixel(self) -> int:
        """Code bits per pixel: one per code channel, the code being binary."""
        return int(self.code_channels or 0)

    @property
    def compression_ratio(self) -> float:
        """Input bits (8 per channel) over code bits, per pixel."""
        return 8 * self.image_channels / self.bits_per_pixel

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComDefendConfig:
        check_config_fields(cls, data, "ComDefend")
        return cls(**data)


def check_batch(x: torch.Tensor, channels: int | None = None, name: str = "input") -> None:
    """Cheap structural check (no device synchronisation): a 4-D float tensor, right channels."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{name} must be NCHW (4 dimensions), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a float tensor in [0, 1], got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
        raise InputError(
            f"{name} has {x.shape[1]} channels but this model expects {channels} ({kind})"
        )
    if x.numel() == 0:
        raise InputError(f"{name} is empty: shape {tuple(x.shape)}")


def check_images(x: torch.Tensor, channels: int | None = None, name: str = "input") -> None:
    """Raise :class:`InputError` unless ``x`` is a finite NCHW float tensor in [0, 1]."""
    check_batch(x, channels, name)
    x = x.detach()  # the checks below must not warn inside an attack's autograd graph
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{name} contains NaN or infinite values")
    low, high = float(x.min()), float(x.max())
    if low < -1e-6 or high > 1 + 1e-6:
        hint = " (8-bit values? divide by 255)" if high > 2 else ""
        raise InputError(f"{name} must lie in [0, 1], found [{low:.4g}, {high:.4g}]{hint}")


class ComDefend(nn.Module):
    """The ComDefend purifier: ``purify(x)`` maps NCHW images in [0, 1] to [0, 1].

    Args:
        config: a :class:`ComDefendConfig` (architecture, binarizer and purification settings).

    Shape:
        - Input: ``(N, C, H, W)`` with C = ``config.image_channels``, any H and W.
        - Output: same shape.

    Example:
        >>> model = ComDefend(ComDefendConfig(preset="normal")).eval()
        >>> model.purify(torch.rand(2, 3, 40, 50)).shape
        torch.Size([2, 3, 40, 50])
    """

    def __init__(self, config: ComDefendConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = config or ComDefendConfig()
        if overrides:
            config = ComDefendConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        preset = get_preset(config.preset)
        code_channels = int(config.code_channels or 0)
        self.encoder = build_encoder(preset, config.image_channels, code_channels)
        self.binarizer = Binarizer(
            noise_std=config.noise_std,
            inference_mode=config.inference_mode,
            inference_noise_std=config.inference_noise_std,
            threshold=config.threshold,
        )
        self.decoder = build_decoder(preset, config.image_channels, code_channels)
        self.receptive_radius = receptive_radius(self.encoder) + receptive_radius(self.decoder)
        self.weights: WeightsRef | None = None  # set by from_checkpoint
        self.checkpoint_metadata: dict[str, Any] | None = None  # set by from_checkpoint
        self.widest_channels = max(
            layer.out_channels for layer in self.modules() if isinstance(layer, nn.Conv2d)
        )

    @property
    def weights_dtype(self) -> torch.dtype:
        """The dtype the network computes in (its parameters')."""
        return next(self.parameters()).dtype

    # -- the network, image-sized input, no tiling ------------------------------------------
    def _to_model_order(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) if self.config.channel_order == "BGR" else x

    def code_logits(self, x: torch.Tensor) -> torch.Tensor:
        """ComCNN's real-valued output (before noise and sigmoid)."""
        return self._in_chunks(lambda part: self.encoder(self._to_model_order(part)), x)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> code: {0, 1} in eval mode, noisy sigmoid in training mode.

        Input of another float dtype (float64, float16, bfloat16) is computed in the weights'
        dtype and the code returned in the input's dtype.
        """
        check_images(x, self.config.image_channels, "encode input")
        if x.dtype != self.weights_dtype:
            return self.encode(x.to(self.weights_dtype), generator).to(x.dtype)
        # The binarizer sees the whole batch's code at once, so a noisy binarizer draws exactly
        # the noise of an unchunked pass (same generator state afterwards).
        return self.binarizer(self.code_logits(x), generator=generator)

    def decode(self, bits: torch.Tensor) -> torch.Tensor:
        """Code -> images in [0, 1] (RGB order for RGB models)."""
        return self._in_chunks(lambda part: self._to_model_order(self.decoder(part)), bits)

    def reconstruct(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over image-sized input: returns ``(reconstruction, code)``."""
        bits = self.encode(x, generator=generator)
        return self.decode(bits), bits

    # -- inference speed -----------------------------------------------------------------
    def _records_autograd(self, x: torch.Tensor) -> bool:
        """Whether autograd would record a pass (an attack differentiating the defense)."""
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or any(p.requires_grad for p in self.parameters())

    def inference_chunk_size(self, x: torch.Tensor) -> int:
        """Images per chunk for inference on ``x`` (CPU only; elsewhere the whole batch).

        The widest activation of a chunk fits in :data:`CPU_CHUNK_BYTES`, with at least 2
        images: oneDNN runs a batch of one image with other kernels (last bits differ), so no
        chunk holds a single image unless the whole batch is one.
        """
        if x.device.type != "cpu":
            return x.shape[0]
        widest_bytes = self.widest_channels * x.shape[-2] * x.shape[-1] * x.element_size()
        return max(2, CPU_CHUNK_BYTES // widest_bytes)

    def _in_chunks(
        self, network: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """``network(x)``, run chunk by chunk at inference on the CPU (same result, faster).

        Only in eval mode (BatchNorm in training mode would see other batch statistics) and
        when autograd records nothing: gradients through the defense take the plain path. The
        chunks are computed by ``torch.get_num_threads()`` worker threads, one chunk at a time
        each with one intra-op thread (:func:`~comdefend.models.parallel.run_chunks`), so the
        encoder's and decoder's forward hooks run in those threads, in no fixed order.
        """
        if self.training or self._records_autograd(x):
            return network(x)
        chunk, n = self.inference_chunk_size(x), x.shape[0]
        if chunk >= n:
            return network(x)
        sizes = [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
        if sizes[-1] == 1:  # no lone image (see inference_chunk_size): join the previous chunk
            sizes.pop()
            sizes[-1] += 1
        return torch.cat(run_chunks(network, x.split(sizes)))

    # -- purification of any image size -----------------------------------------------------
    def purify(self, x: torch.Tensor, mode: PurifyMode | None = None) -> torch.Tensor:
        """Purify NCHW images in [0, 1] of any size (``mode`` overrides the configured one).

        Input of another float dtype (float64, float16, bfloat16) is purified in the weights'
        dtype and returned in its own.

        At inference on the CPU (eval mode, no autograd recording) the networks run on chunks of
        the batch that fit in the caches, spread over ``torch.get_num_threads()`` worker threads
        with one intra-op thread each (the result is that of the chunks computed one after
        another; the calling thread's torch thread count is left as it was); with autograd
        recording (BPDA, relaxed attacks) it is one plain pass, so gradients flow as usual.

        The networks run at ``config.precision`` (``fp32``, ``tf32`` on CUDA, ``bf16``); the
        result is returned in float32 (or the input's dtype) whatever the precision.
        """
        check_images(x, self.config.image_channels)
        if x.dtype != self.weights_dtype:  # float64/16, bfloat16: computed in the weights' dtype
            return self.purify(x.to(self.weights_dtype), mode).to(x.dtype)
        mode = mode or self.config.purify_mode
        if mode == "patch":
            return run_patches(self._reconstruction_only, x, self.config.patch_size)
        if mode == "full":
            return run_overlapping(
                self._reconstruction_only, x, self.config.max_tile, self.receptive_radius
            )
        raise UsageError(f"purify mode must be 'patch' or 'full', got {mode!r}")

    def _reconstruction_only(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.precision == "fp32" and x.device.type != "cuda":
            return self.reconstruct(x)[0]
        with precision_context(self.config.precision, x.device):
            reconstruction = self.reconstruct(x)[0]
        return reconstruction.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.purify(x)

    # -- persistence ---------------------------------------------------------------------
    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write weights and config as a safetensors checkpoint (atomically)."""
        metadata = {"kind": PURIFIER_KIND, "config": self.config.to_dict(), **(extra or {})}
        save_checkpoint(path, self.state_dict(), metadata)

    @classmethod
    def from_checkpoint(
        cls,
        weights: WeightsRef | str | os.PathLike,
        map_location: str | torch.device = "cpu",
        **overrides: Any,
    ) -> ComDefend:
        """Load a purifier checkpoint (safetensors only; nothing is unpickled) in eval mode.

        Args:
            weights: a :class:`~comdefend.zoo.WeightsRef`, a file path or a shipped model's name
                (resolved with :func:`~comdefend.zoo.resolve_weights`); the resolved reference
                is kept as ``model.weights``.
            map_location: device of the returned model.
            overrides: config fields to replace, e.g. ``purify_mode="patch"`` or
                ``inference_noise_std=1.0``.
        """
        from comdefend.zoo import weights_file

        ref, path = weights_file(weights)
        tensors, metadata = load_checkpoint(path, expected_kind=PURIFIER_KIND)
        stored = metadata.get("config")
        if not isinstance(stored, dict):
            raise CheckpointError(f"{path} has no ComDefend config in its metadata")
        try:
            ComDefendConfig.from_dict(stored)  # the file's own settings, checked first
        except UsageError as error:
            raise CheckpointError(
                f"{path}: bad ComDefend config in its metadata: {error}"
            ) from error
        config = ComDefendConfig.from_dict({**stored, **overrides})  # UsageError: bad override
        model = cls(config)
        load_weights(
            model,
            tensors,
            path,
            f"the architecture its config describes (preset {config.preset}, "
            f"{config.image_channels} image channels, {config.code_channels} code channels)",
        )
        model.checkpoint_metadata = metadata
        model.weights = ref
        return model.to(map_location).eval()
