"""The offline quick-start job: train a small ComDefend on Fashion-MNIST and report.

Until pretrained weights ship with the package, this is what README's main command runs: about a
hundred iterations of the paper's training on 2 CPU cores, then a reconstruction report
(PSNR, bits per pixel, bit density) and an image grid on held-out test images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from comdefend.checkpoint import atomic_write_text
from comdefend.data.datasets import load_dataset
from comdefend.evaluation.grids import save_grid
from comdefend.evaluation.reconstruction import reconstruction_report
from comdefend.models.comdefend import ComDefend
from comdefend.training.trainer import TrainConfig, train


def run_quickstart(
    out: str | os.PathLike,
    iterations: int = 100,
    eval_images: int = 1000,
    data_dir: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, evaluate and write ``report.json``, ``report.md`` and ``reconstructions.png``."""
    folder = Path(out)
    run_folder = folder / "run"
    if run_folder.exists():
        if not force:
            from comdefend.errors import UsageError

            raise UsageError(f"{folder} already holds a quick-start run; pass --force to redo it")
        shutil.rmtree(run_folder)
    config = TrainConfig(
        dataset="fashion-mnist",
        out=str(run_folder),
        preset="plain",
        iterations=iterations,
        batch_size=20,
        seed=seed,
        data_dir=data_dir,
        eval_every=max(iterations // 2, 1),
        eval_images=min(200, eval_images),
        checkpoint_every=max(iterations // 4, 1),
    )
    summary = train(config, progress=progress)
    model = ComDefend.from_checkpoint(run_folder / "model.safetensors")
    report = reconstruction_report(
        model, "fashion-mnist", "test", eval_images, data_dir, progress=progress
    )
    test = load_dataset("fashion-mnist", "test", data_dir).head(12).float_images()
    with torch.no_grad():
        purified = model.purify(test)
    grid = save_grid(
        folder / "reconstructions.png",
        [test, purified],
        labels=["test image", "ComDefend"],
        scale=3,
    )
    result = {
        "training": {
            "iterations": summary["iterations"],
            "config": summary["config"],
            "device": summary["device"],
        },
        "reconstruction": report,
        "model": str(run_folder / "model.safetensors"),
        "grid": str(grid),
    }
    atomic_write_text(folder / "report.json", json.dumps(result, indent=2) + "\n")
    markdown = (
        "# ComDefend quick start (Fashion-MNIST)\n\n"
        f"Trained `plain` ComDefend for {summary['iterations']} iterations of batch 20 "
        "(Adam 1e-3, noise std 20, lambda 1e-4).\n\n"
        "| test images | PSNR (dB) | bits/pixel | compression | bit density |\n"
        "|---|---|---|---|---|\n"
        f"| {report['images']} | {report['psnr_db']:.2f} | {report['bits_per_pixel']} | "
        f"{report['compression_ratio']:.1f}x | {report['bit_density']:.3f} |\n\n"
        "![reconstructions](reconstructions.png)\n"
    )
    atomic_write_text(folder / "report.md", markdown)
    return result
