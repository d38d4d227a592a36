"""Benchmark: the training step on each path and precision, against the plain eager fp32 loop.

Run:  python benchmarks/train_step.py [--iterations 8] [--repeats 3] [--threads N]
      [--precisions fp32,bf16] [--paths minimal,trainer,channels-last,compile]
      [--cifar-dir DIR] [--peak-gflops G | --clock-ghz F] [--json]

For each training precision (fp32 always; ``--precisions`` adds others, and one this CPU lacks
is listed as skipped with the reason, never measured as fp32) it times the paths:

- ``minimal``: the plainest correct eager loop (no logging, no checkpoints), at bf16 with the
  same autocast around the encoder and the decoder as the trainer;
- ``trainer``: ``comdefend train``'s loop with its defaults (``TrainConfig(precision=...)``);
- ``channels-last``: the trainer with ``channels_last=True``;
- ``compile``: the trainer with ``compile=True``;
- ``channels-last+compile`` (not by default): both.

Every path is run ``--repeats`` times, in one process, alternately (forwards, then backwards, so
that a drift in the machine's load hits all alike), on CIFAR-10 batches of 20 32x32 images, and
reported as the median of its paired ratios to the plain eager fp32 loop of the same repeat: on
a shared machine absolute speed is noise, a ratio measured side by side is not. Each run does
one untimed warm-up iteration and ``--iterations`` timed ones: rates are steady-state. The
trainer's rate is its own measurement of its loop (``images_per_second_this_session`` less
``first_iteration_seconds_this_session``), start-up excluded, everything it does per iteration
included (batch sampling, seeded noise, the schedule, logging, its final checkpoint).

``torch.compile`` compiles at the first iteration of a process. Its time (the first iteration
less a steady one) is reported apart, ``compile_s``: first with an empty compilation cache
(``cold``; the benchmark uses a fresh ``TORCHINDUCTOR_CACHE_DIR``), then in later repeats
after ``torch._dynamo.reset()`` with the cache that the first one filled (``warm``, what a
second run on the same machine pays). ``break_even_iterations`` is the cold compile time over
the seconds it saves per iteration against the trainer's default; ``net_s_7500`` is what it
saves over a 7,500-iteration run (the ``residual-study`` recipe), compilation paid.

Arithmetic rate: a training step is counted as 3 x the forward pass's convolution FLOPs (2 per
multiply-accumulate, :func:`comdefend.models.presets.macs_per_pixel`): forward, input gradient
and weight gradient; ELU, batch norm, the loss and Adam are not counted. The fraction of peak
is of the peak of the cores used (``threads``) in the path's precision: cores x clock x FLOPs
per cycle, with the clock from ``/proc/cpuinfo`` (in a virtual machine often the base clock, so
turbo can exceed the "peak") unless ``--clock-ghz`` says otherwise, and the FLOPs per cycle from
the CPU's flags: fp32 with two FMA units, bf16 from AMX or AVX512-BF16 (``--peak-gflops`` gives
the fp32 peak instead). The assumptions are printed, and a measured fp32 matrix product gives a
ceiling that needs none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from comdefend.data.datasets import load_dataset
from comdefend.losses import comdefend_loss
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.models.presets import macs_per_pixel
from comdefend.training.engine import autocast, check_training_precision, precision_unavailable
from comdefend.training.trainer import TrainConfig, compile_unavailable, train

CPU = torch.device("cpu")
#: Trainer paths and the TrainConfig settings of each.
TRAINER_PATHS: dict[str, dict[str, bool]] = {
    "trainer": {},
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    "channels-last+compile": {"channels_last": True, "compile": True},
}
PATHS = ("minimal", *TRAINER_PATHS)
DEFAULT_PATHS = "minimal,trainer,channels-last,compile"
#: The residual-study recipe's length, against which compilation is counted.
RUN_ITERATIONS = 7500
#: FLOPs per cycle and core from the CPU's flags: (flag, fp32 FLOPs, what it assumes).
FP32_FLOPS_PER_CYCLE = (
    ("avx512f", 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2"),
    ("avx2", 32, "AVX2: 2 FMA units x 8 fp32 lanes x 2"),
)
#: The peak each precision's rate is a fraction of (fp16 and tf32: none is derived).
PEAK_OF = {"fp32": "fp32_gflops", "bf16": "bf16_gflops"}
BF16_FLOPS_PER_CYCLE = (
    ("amx_bf16", 1024, "AMX-BF16: one tile unit, 1,024 bf16 FLOPs per cycle"),
    ("avx512_bf16", 128, "AVX512-BF16: 2 units x 16 lanes x 2 products x 2"),
)


class Measurement:
    """One timed run: its steady rate (img/s) and its first iteration's seconds."""

    def __init__(self, rate: float, first_seconds: float, batch: int) -> None:
        self.rate, self.first_seconds, self.batch = rate, first_seconds, batch

    @property
    def step_seconds(self) -> float:
        return self.batch / self.rate

    @property
    def startup_seconds(self) -> float:
        """The first iteration's time beyond a steady one (compilation, for ``compile``)."""
        return max(self.first_seconds - self.step_seconds, 0.0)


def minimal_loop(
    images: torch.Tensor, iterations: int, batch: int, precision: str = "fp32"
) -> Measurement:
    """The plainest correct training loop: one warm-up iteration, then ``iterations`` timed.
    At bf16 the encoder and decoder run under autocast, the noise, sigmoid and loss in float32."""
    torch.manual_seed(0)
    model = ComDefend(ComDefendConfig(image_channels=images.shape[1])).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    first = 0.0
    for step in range(iterations + 1):
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
        if step == 0:
            first = time.perf_counter() - started
    steady = time.perf_counter() - started - first
    return Measurement(iterations * batch / steady, first, batch)


def trainer_run(
    data_dir: str | None, iterations: int, batch: int, precision: str, options: dict[str, Any]
) -> Measurement:
    """``comdefend train``'s loop: one warm-up iteration and ``iterations`` more, rated by the
    trainer's own clock without its first iteration."""
    with tempfile.TemporaryDirectory() as folder:
        summary = train(
            TrainConfig(
                dataset="cifar10",
                out=str(Path(folder) / "run"),
                iterations=iterations + 1,
                batch_size=batch,
                eval_images=0,
                data_dir=data_dir,
                checkpoint_every=iterations + 1,
                device="cpu",
                precision=precision,
                **options,
            ),
            progress=False,
        )
    seconds = (iterations + 1) * batch / float(summary["images_per_second_this_session"])
    first = float(summary["first_iteration_seconds_this_session"])
    return Measurement(iterations * batch / (seconds - first), first, batch)


def peak(threads: int, clock_ghz: float | None, peak_gflops: float | None) -> dict[str, Any]:
    """The fp32 (and bf16) peak of ``threads`` cores, with the assumptions it rests on."""
    flags: set[str] = set()
    mhz: float | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "cpu MHz" and mhz is None:
                mhz = float(value)
    except (OSError, ValueError):
        pass
    clock = clock_ghz or (mhz / 1000 if mhz else None)
    clock_source = "--clock-ghz" if clock_ghz else "cpu MHz of /proc/cpuinfo, maybe the base clock"
    result: dict[str, Any] = {"threads": threads, "clock_ghz": clock}
    if peak_gflops:
        result.update(fp32_gflops=peak_gflops, assumption="--peak-gflops")
        return result
    fp32 = next(((n, why) for flag, n, why in FP32_FLOPS_PER_CYCLE if flag in flags), None)
    if clock is None or fp32 is None:
        result.update(
            fp32_gflops=None, assumption="clock or vector width unknown: pass --peak-gflops"
        )
        return result
    result["fp32_gflops"] = threads * clock * fp32[0]
    result["assumption"] = (
        f"{threads} cores x {clock:.2f} GHz ({clock_source}) x {fp32[0]} FLOP/cycle ({fp32[1]}, "
        "assumed)"
    )
    bf16 = next(((n, why) for flag, n, why in BF16_FLOPS_PER_CYCLE if flag in flags), None)
    if bf16 is not None:
        result["bf16_gflops"] = threads * clock * bf16[0]
        result["bf16_assumption"] = f"{bf16[0]} FLOP/cycle ({bf16[1]}, assumed)"
    return result


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> float:
    """fp32 matrix-product rate of this machine with the current threads: a measured ceiling."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - started) / 1e9


def step_gflop(batch: int, image_size: int = 32, channels: int = 3) -> float:
    """FLOPs of one training step of the plain model (3 x forward convolutions, 2 per MAC)."""
    model = ComDefend(ComDefendConfig(image_channels=channels))
    macs = macs_per_pixel(model.encoder) + macs_per_pixel(model.decoder)
    return 3 * 2 * macs * batch * image_size**2 / 1e9


def run_all(
    args: argparse.Namespace, measured: list[str], paths: list[str]
) -> dict[tuple[str, str], list[Measurement]]:
    """Every (precision, path) ``args.repeats`` times, alternately: their measurements."""
    cifar = load_dataset("cifar10", "train", args.cifar_dir).head(2000).float_images()
    runs = [(p, path) for p in measured for path in paths]
    if ("fp32", "minimal") not in runs:
        runs.insert(0, ("fp32", "minimal"))  # the baseline of every ratio
    raw: dict[tuple[str, str], list[Measurement]] = {run: [] for run in runs}
    for repeat in range(args.repeats):
        if repeat:
            torch._dynamo.reset()  # compile again, now with the cache the first one filled
        for precision, path in runs if repeat % 2 == 0 else runs[::-1]:
            if path == "minimal":
                result = minimal_loop(cifar, args.iterations, args.batch_size, precision)
            else:
                options = TRAINER_PATHS[path]
                result = trainer_run(
                    args.cifar_dir, args.iterations, args.batch_size, precision, options
                )
            raw[(precision, path)].append(result)
    return raw


def report(
    raw: dict[tuple[str, str], list[Measurement]], gflop: float, peaks: dict[str, Any]
) -> dict[str, Any]:
    baseline = raw[("fp32", "minimal")]
    rows: dict[str, dict[str, Any]] = {}
    for (precision, path), results in raw.items():
        ratios = [r.rate / b.rate for r, b in zip(results, baseline, strict=True)]
        rate = statistics.median(r.rate for r in results)
        row: dict[str, Any] = {
            "img_s": [round(r.rate, 2) for r in results],
            "over_eager_fp32": statistics.median(ratios),
            "gflops": gflop / statistics.median(r.step_seconds for r in results),
        }
        precision_peak = peaks.get(PEAK_OF.get(precision, ""))
        if precision_peak:
            row["fraction_of_peak"] = row["gflops"] / precision_peak
        if "compile" in path:
            compile_s = [r.startup_seconds for r in results]
            row["compile_s"] = {
                "cold": compile_s[0],
                "warm": statistics.median(compile_s[1:]) if len(compile_s) > 1 else None,
            }
            default = raw.get((precision, "channels-last" if "channels" in path else "trainer"))
            if default is not None:
                saved = statistics.median(r.step_seconds for r in default) - results[0].batch / rate
                row["saved_s_per_iteration"] = saved
                row["break_even_iterations"] = compile_s[0] / saved if saved > 0 else None
                row["net_s_7500"] = RUN_ITERATIONS * saved - compile_s[0]
        rows[f"{precision} {path}"] = row
    return rows


def print_table(result: dict[str, Any]) -> None:
    peaks = result["peak"]
    print(
        f"threads {result['threads']}, batch {result['batch_size']} of 3x32x32, "
        f"{result['iterations']} timed iterations (after 1 warm-up) x {result['repeats']} "
        f"repeats, {result['seconds']:.0f} s in all"
    )
    print(f"step: {result['step_gflop']:.1f} GFLOP ({result['flop_convention']})")
    fp32_peak = peaks.get("fp32_gflops")
    print(
        f"fp32 peak: {fp32_peak:.0f} GFLOP/s = {peaks['assumption']}"
        if fp32_peak
        else f"fp32 peak: unknown ({peaks['assumption']})"
    )
    if peaks.get("bf16_gflops"):
        print(f"bf16 peak: {peaks['bf16_gflops']:.0f} GFLOP/s, {peaks['bf16_assumption']}")
    print(f"measured fp32 matmul (1024^2): {result['matmul_gflops']:.0f} GFLOP/s")
    print(
        f"\n{'precision path':<28}{'img/s':>8}{'x eager fp32':>14}{'GFLOP/s':>9}"
        f"{'of peak':>10}{'compile s':>14}{'break-even it':>15}{'net s/7500 it':>15}"
    )
    for name, row in result["paths"].items():
        compiled = row.get("compile_s")
        cold_warm = ""
        if compiled:
            warm = compiled["warm"]
            cold_warm = f"{compiled['cold']:.0f}" + (f"/{warm:.0f}" if warm is not None else "")
        even = row.get("break_even_iterations")
        net = row.get("net_s_7500")
        fraction = row.get("fraction_of_peak")
        print(
            f"{name:<28}{statistics.median(row['img_s']):>8.1f}{row['over_eager_fp32']:>13.2f}x"
            f"{row['gflops']:>9.0f}{(f'{fraction:.0%}' if fraction else '-'):>10}"
            f"{cold_warm or '-':>14}"
            f"{(f'{even:.0f}' if even else ('never' if net is not None else '-')):>15}"
            f"{(f'{net:+.0f}' if net is not None else '-'):>15}"
        )
    print("compile s: cold (empty cache) / warm (its cache filled); net: seconds saved, paid")
    for precision, why in result["skipped"].items():
        print(f"skipped {precision}: {why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8, help="timed iterations per run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cifar-dir", default=None, help="folder holding cifar-10-batches-py")
    parser.add_argument(
        "--precisions",
        default="fp32,bf16",
        help="comma-separated training precisions (fp32, bf16, fp16, tf32); fp32 always",
    )
    parser.add_argument(
        "--paths", default=DEFAULT_PATHS, help=f"comma-separated, of: {', '.join(PATHS)}"
    )
    parser.add_argument("--peak-gflops", type=float, default=None, help="fp32 peak to compare")
    parser.add_argument("--clock-ghz", type=float, default=None, help="clock for the peak")
    parser.add_argument("--keep-compile-cache", action="store_true", help="no fresh cache")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    if args.iterations < 1 or args.repeats < 1:
        parser.error("--iterations and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # the trainer does this too
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if unknown := sorted(set(paths) - set(PATHS)):
        parser.error(f"unknown path(s) {', '.join(unknown)}; valid: {', '.join(PATHS)}")
    skipped: dict[str, str] = {}
    if any("compile" in p for p in paths) and (why := compile_unavailable()) is not None:
        skipped["compile"] = why
        paths = [p for p in paths if "compile" not in p]
    cache = None
    if any("compile" in p for p in paths) and not args.keep_compile_cache:
        cache = tempfile.mkdtemp(prefix="train-step-inductor-")  # a cold compilation
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        measure(args, paths, skipped)
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


def measure(args: argparse.Namespace, paths: list[str], skipped: dict[str, str]) -> None:
    """Time every precision and path and print the result."""
    asked = [check_training_precision(p) for p in args.precisions.split(",") if p.strip()]
    asked = ["fp32", *(p for p in dict.fromkeys(asked) if p != "fp32")]
    skipped |= {p: why for p in asked if (why := precision_unavailable(p, CPU)) is not None}
    measured = [p for p in asked if p not in skipped]

    started = time.perf_counter()
    threads = torch.get_num_threads()
    peaks = peak(threads, args.clock_ghz, args.peak_gflops)
    matmul = matmul_gflops()
    raw = run_all(args, measured, paths)
    gflop = step_gflop(args.batch_size)
    result: dict[str, Any] = {
        "threads": threads,
        "batch_size": args.batch_size,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "step_gflop": gflop,
        "flop_convention": "3 x the forward convolutions' FLOPs, 2 per MAC; ELU, batch norm, "
        "loss and Adam not counted",
        "peak": peaks,
        "matmul_gflops": matmul,
        "paths": report(raw, gflop, peaks),
        "skipped": skipped,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
