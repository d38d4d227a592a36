"""Reconstruction quality of a purifier on a dataset."""

from __future__ import annotations

import os

import torch

from comdefend.console import progress_bar
from comdefend.data.datasets import load_dataset
from comdefend.errors import UsageError
from comdefend.metrics import mse_per_image, psnr_from_mse
from comdefend.models.comdefend import ComDefend


@torch.no_grad()
def reconstruction_report(
    model: ComDefend,
    dataset: str,
    split: str = "test",
    n: int | None = None,
    data_dir: str | os.PathLike | None = None,
    batch_size: int = 250,
    progress: bool = False,
) -> dict:
    """PSNR, bits per pixel and bit density of ``model.purify`` on a dataset.

    ``psnr_db`` is the PSNR of the mean squared error over all images after 8-bit rounding of both
    images (CompressAI rounds the same way); ``psnr_mean_per_image_db`` averages per-image PSNRs.
    """
    images = load_dataset(dataset, split, data_dir).head(n)
    if images.channels != model.config.image_channels:
        raise UsageError(
            f"{dataset} has {images.channels} channel(s) but the model expects "
            f"{model.config.image_channels}"
        )
    model.eval()
    device = next(model.parameters()).device
    mses, ones, bits_total = [], 0.0, 0
    for start in progress_bar(
        range(0, len(images), batch_size), enabled=progress, desc="reconstruct"
    ):
        x = images.float_images(slice(start, start + batch_size)).to(device)
        purified = model.purify(x)
        bits = model.encode(x)
        quantized = [torch.round(t.clamp(0, 1) * 255) / 255 for t in (purified, x)]
        mses.append(mse_per_image(quantized[0].double(), quantized[1].double()).cpu())
        ones += float(bits.sum())
        bits_total += bits.numel()
    mse = torch.cat(mses)
    per_image = torch.where(mse > 0, -10 * torch.log10(mse), torch.full_like(mse, float("inf")))
    return {
        "dataset": dataset,
        "split": split,
        "images": len(images),
        "psnr_db": psnr_from_mse(float(mse.mean())),
        "psnr_mean_per_image_db": float(per_image[torch.isfinite(per_image)].mean()),
        "bits_per_pixel": model.config.bits_per_pixel,
        "compression_ratio": model.config.compression_ratio,
        "bit_density": ones / max(bits_total, 1),
        "purify_mode": model.config.purify_mode,
        "inference_noise_std": model.config.inference_noise_std,
    }


__all__ = ["reconstruction_report"]
