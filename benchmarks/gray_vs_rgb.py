"""Why would the Fashion-MNIST model train slower than the RGB one? Measure, don't guess.

Run:  python benchmarks/gray_vs_rgb.py [--iterations 6] [--threads 2] [--official DIR]

Times one training step (batch 20, forward + backward + Adam) of the grayscale 1x28x28 model and
the RGB 3x32x32 model under several conditions that a "minimal eager loop" may silently differ
in, interleaved in one process, and prints seconds per step and the gray/RGB ratio for each:

- ``baseline``: float32, contiguous NCHW, subnormals kept (PyTorch's default);
- ``flush_denormal``: subnormal floats flushed to zero (what our trainer does);
- ``float64``: the data left as float64 (``numpy / 255.0``) and the model converted to match;
- ``channels_last``: NHWC memory format, which propagates through every layer;
- ``trained_weights``: the authors' released weights (saturated units late in training), if
  ``--official`` points at them; ``trained_weights_flush``: the same with subnormals flushed.

Multiply-accumulates per image: gray 2 x 812,448 x 784 = 1.27 G, RGB 2 x 782,640 x 1,024 =
1.60 G, so the gray step should be about 0.8x the RGB step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from comdefend.losses import comdefend_loss
from comdefend.models.comdefend import ComDefend, ComDefendConfig


def step_seconds(model: ComDefend, x: torch.Tensor, iterations: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(iterations + 1):
        started = time.perf_counter()
        logits = model.encoder(x)
        code = torch.sigmoid(logits - 20 * torch.randn_like(logits))
        loss, _, _ = comdefend_loss(model.decoder(code), x, code)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])  # the first step pays for allocations


def make(channels: int, condition: str, official: Path | None) -> tuple[ComDefend, torch.Tensor]:
    torch.manual_seed(0)
    size = 28 if channels == 1 else 32
    model = ComDefend(ComDefendConfig(image_channels=channels)).train()
    if condition.startswith("trained_weights") and official is not None:
        from comdefend.official import import_official

        names = ("enc_mnist", "dec_mnist") if channels == 1 else ("enc20_0.0001", "dec20_0.0001")
        model = import_official(*(official / f"{n}.npy" for n in names)).train()
    x = torch.rand(20, channels, size, size)
    if channels == 1:  # Fashion-MNIST-like: most pixels exactly 0
        x = torch.where(x < 0.5, torch.zeros_like(x), x)
    if condition == "float64":
        model, x = model.double(), x.double()
    if condition == "channels_last":
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--official", type=Path, default=None)
    parser.add_argument("--conditions", default=None, help="comma-separated subset to run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    conditions = ["baseline", "flush_denormal", "float64", "channels_last"]
    if args.official is not None:
        conditions += ["trained_weights", "trained_weights_flush"]
    if args.conditions:
        conditions = [c for c in conditions if c in args.conditions.split(",")]
    result: dict = {"threads": torch.get_num_threads(), "seconds_per_step": {}}
    for condition in conditions:
        torch.set_flush_denormal(
            condition.endswith("flush_denormal") or condition.endswith("flush")
        )
        gray = step_seconds(*make(1, condition, args.official), args.iterations)
        rgb = step_seconds(*make(3, condition, args.official), args.iterations)
        result["seconds_per_step"][condition] = {
            "gray_1x28x28": round(gray, 3),
            "rgb_3x32x32": round(rgb, 3),
            "gray_over_rgb": round(gray / rgb, 2),
        }
    torch.set_flush_denormal(False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
