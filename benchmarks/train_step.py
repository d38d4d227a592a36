"""Benchmark: img/s of the ComDefend trainer versus a minimal eager PyTorch loop, in one run.

Run:  python benchmarks/train_step.py [--iterations 20] [--repeats 2] [--threads 2]
      [--precisions fp32,bf16]

The two are measured alternately (A B A B ...) on the same machine in the same process, and the
result is reported as a ratio, since absolute speed on a shared machine is noise. The trainer's
rate is its own measurement of the training loop (``images_per_second_this_session``), which
excludes start-up (dataset loading, model construction) but includes everything it does per
iteration: batch sampling, seeded noise, the learning-rate schedule, logging and checkpoints.

Each training precision in ``--precisions`` (fp32 always among them) is timed the same way,
the trainer with ``TrainConfig(precision=...)`` and the minimal loop with the same autocast
around its encoder and decoder; ``precisions`` reports each one's rates and its ratio to fp32
(``over_fp32``: the trainer's, ``minimal_over_fp32``: the minimal loop's). A precision this CPU
lacks is listed under ``skipped`` with the reason, never measured as fp32.

It also times the grayscale (Fashion-MNIST) model against the RGB one, with and without flushing
subnormal floats to zero, to show where the grayscale slowdown reported in issue 2 comes from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from comdefend.data.datasets import load_dataset
from comdefend.losses import comdefend_loss
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.training.engine import autocast, check_training_precision, precision_unavailable
from comdefend.training.trainer import TrainConfig, train

CPU = torch.device("cpu")


def minimal_loop(
    images: torch.Tensor, channels: int, iterations: int, batch: int, precision: str = "fp32"
) -> float:
    """The plainest correct training loop: no logging, no checkpoints; returns img/s. At bf16
    the encoder and decoder run under autocast, the noise, sigmoid and loss in float32."""
    torch.manual_seed(0)
    model = ComDefend(ComDefendConfig(image_channels=channels)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for step in range(iterations):
        x = images[(step * batch) % (len(images) - batch) :][:batch]
        with autocast(precision, CPU):
            logits = model.encoder(x).float()
        code = torch.sigmoid(logits - 20 * torch.randn_like(logits))
        with autocast(precision, CPU):
            reconstruction = model.decoder(code).float()
        loss, _, _ = comdefend_loss(reconstruction, x, code, 1e-4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return iterations * batch / (time.perf_counter() - started)


def trainer_rate(
    dataset: str, data_dir: str | None, iterations: int, batch: int, precision: str = "fp32"
) -> float:
    with tempfile.TemporaryDirectory() as folder:
        summary = train(
            TrainConfig(
                dataset=dataset,
                out=str(Path(folder) / "run"),
                iterations=iterations,
                batch_size=batch,
                eval_images=0,
                data_dir=data_dir,
                checkpoint_every=max(iterations // 2, 1),
                device="cpu",
                precision=precision,
            ),
            progress=False,
        )
    return float(summary["images_per_second_this_session"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cifar-dir", default=None, help="folder holding cifar-10-batches-py")
    parser.add_argument("--skip-gray", action="store_true")
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated training precisions to time against fp32 (fp32, bf16, fp16, tf32)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # the trainer does this too

    asked = [check_training_precision(p) for p in args.precisions.split(",") if p.strip()]
    asked = ["fp32", *(p for p in dict.fromkeys(asked) if p != "fp32")]
    skipped = {p: why for p in asked if (why := precision_unavailable(p, CPU)) is not None}
    measured = [p for p in asked if p not in skipped]
    cifar = load_dataset("cifar10", "train", args.cifar_dir).head(2000).float_images()
    trainer: dict[str, list[float]] = {p: [] for p in measured}
    baseline: dict[str, list[float]] = {p: [] for p in measured}
    for _ in range(args.repeats):
        for precision in measured:  # alternated, so drifts in machine load hit all alike
            baseline[precision].append(
                minimal_loop(cifar, 3, args.iterations, args.batch_size, precision)
            )
            trainer[precision].append(
                trainer_rate("cifar10", args.cifar_dir, args.iterations, args.batch_size, precision)
            )
    median = {p: statistics.median(trainer[p]) for p in measured}
    median_baseline = {p: statistics.median(baseline[p]) for p in measured}
    result: dict = {
        "threads": torch.get_num_threads(),
        "rgb_trainer_img_s": trainer["fp32"],
        "rgb_minimal_loop_img_s": baseline["fp32"],
        "trainer_over_minimal": median["fp32"] / median_baseline["fp32"],
        "precisions": {
            p: {
                "trainer_img_s": trainer[p],
                "minimal_loop_img_s": baseline[p],
                "over_fp32": median[p] / median["fp32"],
                "minimal_over_fp32": median_baseline[p] / median_baseline["fp32"],
            }
            for p in measured
        },
        "skipped": skipped,
    }
    if not args.skip_gray:
        gray = load_dataset("fashion-mnist", "train").head(2000).float_images()
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            rate_gray = minimal_loop(gray, 1, args.iterations, args.batch_size)
            rate_rgb = minimal_loop(cifar, 3, args.iterations, args.batch_size)
            result[f"flush_denormal={flush}"] = {
                "gray_28_img_s": rate_gray,
                "rgb_32_img_s": rate_rgb,
                "gray_over_rgb": rate_gray / rate_rgb,
            }
        torch.set_flush_denormal(True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
