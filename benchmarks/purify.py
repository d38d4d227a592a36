"""Benchmark: ``ComDefend.purify`` against the plainest correct eager forward pass, in one run.

Run:  python benchmarks/purify.py [--repeats 5] [--threads N] [--json] [--candidates] [--busy N]

Two cases, as in issue 12: 256 CIFAR-10 images of 32x32 (full mode), and 4 ImageNet images of
224x224 in the authors' patch mode (49 independent 32x32 patches each). The reference is the
plainest correct eager pass written from the model's own weights: conv, ELU, ..., conv,
threshold of the sigmoid, conv, ELU, ..., conv, sigmoid, under ``torch.no_grad()``, on the whole
batch at once (in patch mode: the batch of all patches, cut with one reshape). Both are run
alternately (A B, then B A, ...) in the same process on the same images, and each repetition
gives a paired ratio; the printed ratio is the median of those, because absolute times on a
shared machine are noise. The outputs must agree within 1/255 on at least 99.9% of the values.

``--candidates`` also times the alternatives considered for the default path (channels_last,
``torch.inference_mode``, chunk sizes, TorchScript freezing, one thread, a loop over patch
positions; ``--compile`` adds ``torch.compile``), each against the same reference.

Each case also reports a **ceiling**: the time of the pass's convolutions alone, each timed by
itself on batches of 4, 16 and 64 inputs of its own shape and counted at its fastest, with every
other operation free. The ceiling ratio (the reference's time over that time) is the most any
path could gain over the reference without computing the convolutions faster than this CPU's
kernels do; when it is below a target ratio, the target is out of reach on that CPU. It bounds
the quiet measurement only: under ``--busy`` its own kernels share the cores too.

``--busy N`` measures everything a second time while N single-threaded processes spin a
pure-Python loop (the cores shared with another job), and reports both: the loaded results follow
the quiet ones, in the same format (``loaded_cases`` and ``loaded_ratio_*`` in ``--json``). The
busy processes are killed when the measurement ends, however it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from comdefend.data.datasets import load_dataset
from comdefend.data.images import read_image
from comdefend.models.comdefend import ComDefend
from comdefend.models.presets import macs_per_pixel
from comdefend.zoo import load_pretrained, resolve_weights

Path_ = Callable[[torch.Tensor], torch.Tensor]
AGREEMENT_TOLERANCE = 1 / 255
AGREEMENT_FRACTION = 0.999


# -- the reference: the plainest correct eager pass ----------------------------------------
def _convolutions(network: nn.Module) -> list[nn.Conv2d]:
    layers = [layer for layer in network.modules() if isinstance(layer, nn.Conv2d)]
    if any(layer.kernel_size != (3, 3) for layer in layers):
        raise SystemExit("the reference pass is written for the plain preset (3x3 convolutions)")
    return layers


def plain_forward(model: ComDefend, x: torch.Tensor) -> torch.Tensor:
    """conv, ELU, ..., conv -> sigmoid > threshold -> conv, ELU, ..., conv, sigmoid."""
    config = model.config
    h = x.flip(1) if config.channel_order == "BGR" else x
    shift = getattr(model.encoder, "input_shift", 0.0)
    if not isinstance(shift, float):
        raise SystemExit("the reference pass is written for the plain preset (a float input shift)")
    h = h + shift
    encoder, decoder = _convolutions(model.encoder), _convolutions(model.decoder)
    for index, conv in enumerate(encoder):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        if index < len(encoder) - 1:
            h = F.elu(h)
    h = (torch.sigmoid(h) > config.threshold).to(h.dtype)
    for index, conv in enumerate(decoder):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        if index < len(decoder) - 1:
            h = F.elu(h)
    h = torch.sigmoid(h)
    return h.flip(1) if config.channel_order == "BGR" else h


def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    n, c, h, w = x.shape
    if h % patch or w % patch:
        raise SystemExit(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    rows, cols = h // patch, w // patch
    tiles = x.reshape(n, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    return tiles.reshape(n * rows * cols, c, patch, patch)


def from_patches(tiles: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    patch, c = tiles.shape[-1], tiles.shape[1]
    rows, cols = h // patch, w // patch
    grid = tiles.reshape(n, rows, cols, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(n, c, h, w)


def reference_path(model: ComDefend, patch: int | None) -> Path_:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if patch is None:
                return plain_forward(model, x)
            n, _, h, w = x.shape
            return from_patches(plain_forward(model, to_patches(x, patch)), n, h, w)

    return run


def library_path(model: ComDefend, patch: int | None) -> Path_:
    mode: Literal["full", "patch"] = "full" if patch is None else "patch"

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.purify(x, mode=mode)

    return run


# -- candidates for the default path (not used by the library unless chosen) ---------------
def _patched(model: ComDefend, patch: int | None, network: Path_) -> Path_:
    """Run ``network`` on the images (or on the batch of their patches)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if patch is None:
            return network(x)
        n, _, h, w = x.shape
        return from_patches(network(to_patches(x, patch)), n, h, w)

    return run


def _chunked(network: Path_, chunk: int) -> Path_:
    return lambda x: torch.cat([network(part) for part in x.split(chunk)])


def _no_grad(network: Path_) -> Path_:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(x)

    return run


class _PlainModule(nn.Module):
    def __init__(self, model: ComDefend) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return plain_forward(self.model, x)


def candidate_paths(
    model: ComDefend, patch: int | None, example: torch.Tensor, compile_too: bool, threads: int
) -> dict[str, tuple[Path_, float]]:
    """Name -> (path, seconds spent building it) for every alternative considered."""
    plain = lambda x: plain_forward(model, x)  # noqa: E731
    chunk = model.inference_chunk_size(example if patch is None else to_patches(example, patch))
    paths: dict[str, tuple[Path_, float]] = {}

    def inference_mode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return plain(x)

    paths["inference_mode"] = (_patched(model, patch, inference_mode), 0.0)

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return plain(x.contiguous(memory_format=torch.channels_last)).contiguous()

    paths["channels_last"] = (_no_grad(_patched(model, patch, channels_last)), 0.0)
    for size in sorted({1, 2, 4, 8, 16, chunk}):
        paths[f"chunks of {size}"] = (_no_grad(_patched(model, patch, _chunked(plain, size))), 0.0)
    paths[f"channels_last, chunks of {chunk}"] = (
        _no_grad(_patched(model, patch, _chunked(channels_last, chunk))),
        0.0,
    )
    if patch is not None:
        n_rows = example.shape[-2] // patch
        n_cols = example.shape[-1] // patch

        def patch_loop(x: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(x)
            for row in range(n_rows):
                for col in range(n_cols):
                    window = (
                        ...,
                        slice(row * patch, (row + 1) * patch),
                        slice(col * patch, (col + 1) * patch),
                    )
                    out[window] = plain(x[window])
            return out

        paths["loop over patch positions"] = (_no_grad(patch_loop), 0.0)
    if threads > 1:
        library = library_path(model, patch)

        def one_thread(x: torch.Tensor) -> torch.Tensor:
            torch.set_num_threads(1)
            try:
                return library(x)
            finally:
                torch.set_num_threads(threads)

        paths["library, 1 thread"] = (one_thread, 0.0)

    tile_batch = example[:chunk] if patch is None else to_patches(example, patch)[:chunk]
    started = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(_PlainModule(model).eval(), tile_batch)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        frozen(tile_batch)
    paths[f"TorchScript freeze + optimize_for_inference, chunks of {chunk}"] = (
        _no_grad(_patched(model, patch, _chunked(frozen, chunk))),
        time.perf_counter() - started,
    )
    if compile_too:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(_PlainModule(model).eval())
        started = time.perf_counter()
        with torch.no_grad():
            compiled(tile_batch)
        paths[f"torch.compile (inductor, freezing), chunks of {chunk}"] = (
            _no_grad(_patched(model, patch, _chunked(compiled, chunk))),
            time.perf_counter() - started,
        )
    return paths


# -- load: other processes on the same cores -----------------------------------------------
# One busy process: a pure-Python loop (one thread) that also stops once its parent is gone.
BUSY_LOOP = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` single-threaded processes spinning a pure-Python loop while the block runs.

    They are killed (and reaped) when the block ends, whether it returns or raises, Ctrl-C
    included; in the main thread a SIGTERM becomes ``SystemExit`` for the block, so it too
    reaches the cleanup. A busy process also exits by itself once this process is gone, so not
    even a SIGKILL leaves one spinning. They run in their own session: Ctrl-C in the terminal
    reaches only this process, which stops them.
    """
    processes: list[subprocess.Popen[bytes]] = []
    handles_sigterm = count > 0 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if handles_sigterm else None
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-I", "-c", BUSY_LOOP, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous)


# -- measurement -------------------------------------------------------------------------
@dataclass
class PathResult:
    """Timings of one path against the reference, paired repetition by repetition."""

    seconds: list[float]
    reference_seconds: list[float]
    build_seconds: float = 0.0
    max_abs_difference: float = 0.0
    fraction_within_tolerance: float = 1.0
    bit_identical: bool = True
    median_seconds: float = 0.0
    ratio: float = 0.0
    gflops_per_second: float = 0.0

    def finish(self, gflop: float) -> None:
        self.median_seconds = statistics.median(self.seconds)
        pairs = zip(self.reference_seconds, self.seconds, strict=True)
        self.ratio = statistics.median(ref / own for ref, own in pairs)
        self.gflops_per_second = gflop / self.median_seconds


@dataclass
class CaseResult:
    name: str
    images: int
    image_size: int
    mode: str
    gflop_per_call: float
    reference_median_seconds: float = 0.0
    reference_gflops_per_second: float = 0.0
    paths: dict[str, PathResult] = field(default_factory=dict)
    ceiling_seconds: float = 0.0
    ceiling_ratio: float = 0.0
    ceiling_gflops_per_second: float = 0.0


CEILING_BATCHES = (4, 16, 64)


def convolution_seconds_per_input(
    model: ComDefend, size: int, repeats: int = 3, batches: tuple[int, ...] = CEILING_BATCHES
) -> list[tuple[str, float]]:
    """Each convolution of ``model`` timed alone on ``size`` x ``size`` inputs of its own shape:
    ``(name, seconds per input)`` at the fastest of ``batches`` (best of ``repeats`` calls)."""
    timings = []
    encoder, decoder = _convolutions(model.encoder), _convolutions(model.decoder)
    with torch.no_grad():
        for part, convs in (("encoder", encoder), ("decoder", decoder)):
            for index, conv in enumerate(convs):
                fastest = float("inf")
                for batch in batches:
                    x = torch.rand(batch, conv.in_channels, size, size)
                    F.conv2d(x, conv.weight, conv.bias, padding=1)  # warm-up
                    for _ in range(repeats):
                        started = time.perf_counter()
                        F.conv2d(x, conv.weight, conv.bias, padding=1)
                        fastest = min(fastest, (time.perf_counter() - started) / batch)
                name = f"{part}.{index} ({conv.in_channels}->{conv.out_channels})"
                timings.append((name, fastest))
    return timings


def _ceiling(case: CaseResult, model: ComDefend, images: torch.Tensor, patch: int | None) -> None:
    """The convolutions alone, each at its fastest measured batch (see the module docstring)."""
    size = patch or images.shape[-1]
    inputs = images.shape[0] * (images.shape[-2] // size) * (images.shape[-1] // size)
    per_input = sum(seconds for _, seconds in convolution_seconds_per_input(model, size))
    case.ceiling_seconds = inputs * per_input
    case.ceiling_ratio = case.reference_median_seconds / case.ceiling_seconds
    case.ceiling_gflops_per_second = case.gflop_per_call / case.ceiling_seconds


def _agreement(result: PathResult, output: torch.Tensor, reference: torch.Tensor) -> None:
    difference = (output - reference).abs()
    result.max_abs_difference = float(difference.max())
    result.fraction_within_tolerance = float((difference <= AGREEMENT_TOLERANCE).float().mean())
    result.bit_identical = bool(torch.equal(output, reference))


def measure_case(
    name: str,
    model: ComDefend,
    images: torch.Tensor,
    patch: int | None,
    paths: dict[str, tuple[Path_, float]],
    repeats: int,
) -> CaseResult:
    reference = reference_path(model, patch)
    pixels = images.shape[0] * images.shape[-2] * images.shape[-1]
    macs = macs_per_pixel(model.encoder) + macs_per_pixel(model.decoder)
    case = CaseResult(
        name=name,
        images=images.shape[0],
        image_size=images.shape[-1],
        mode="full" if patch is None else f"patch {patch}",
        gflop_per_call=2 * macs * pixels / 1e9,
    )
    expected = reference(images)  # also the warm-up of the reference
    for label, (path, build) in paths.items():
        result = PathResult(seconds=[], reference_seconds=[], build_seconds=build)
        _agreement(result, path(images), expected)  # warm-up, and the agreement check
        for repeat in range(repeats):
            order = [("path", path), ("reference", reference)]
            for role, function in order if repeat % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                function(images)
                elapsed = time.perf_counter() - started
                (result.seconds if role == "path" else result.reference_seconds).append(elapsed)
        result.finish(case.gflop_per_call)
        case.paths[label] = result
        print(
            f"  {name}: {label}: {result.median_seconds:.3f} s, reference "
            f"{statistics.median(result.reference_seconds):.3f} s, ratio {result.ratio:.2f}",
            file=sys.stderr,
            flush=True,
        )
    all_reference = [t for result in case.paths.values() for t in result.reference_seconds]
    case.reference_median_seconds = statistics.median(all_reference)
    case.reference_gflops_per_second = case.gflop_per_call / case.reference_median_seconds
    _ceiling(case, model, images, patch)
    return case


def load_model(name_or_path: str) -> ComDefend:
    try:
        model = load_pretrained(name_or_path)
    except Exception:  # not a zoo name: a checkpoint path
        model = ComDefend.from_checkpoint(resolve_weights(name_or_path))
    if not isinstance(model, ComDefend):
        raise SystemExit(f"{name_or_path} is not a ComDefend purifier")
    return model.eval()


def imagenet_images(folder: Path | None, count: int) -> tuple[torch.Tensor, str]:
    """``count`` 224x224 center crops from the ImageNet sample, else upscaled CIFAR-10 images."""
    files = sorted(folder.glob("*.jpg"))[:count] if folder and folder.is_dir() else []
    if len(files) == count:
        crops = [read_image(path, channels=3)[..., 16:240, 16:240] for path in files]
        return torch.stack(crops), f"ImageNet sample ({folder})"
    cifar = load_dataset("cifar10", "sample").float_images()[:count]
    upscaled = F.interpolate(cifar, size=224, mode="bicubic", align_corners=False).clamp(0, 1)
    return upscaled, "CIFAR-10 sample upscaled to 224x224 (ImageNet sample not found)"


def print_cases(results: list[CaseResult]) -> None:
    """One table per case: every path's median time, ratio, speed and agreement."""
    for case in results:
        print(
            f"\n{case.name} ({case.images} images, {case.mode}, {case.gflop_per_call:.0f} GFLOP "
            f"per call): reference {case.reference_median_seconds:.3f} s "
            f"({case.reference_gflops_per_second:.0f} GFLOP/s)"
        )
        print(f"  {'path':62s} {'median s':>9s} {'ratio':>6s} {'GFLOP/s':>8s} {'<=1/255':>8s} same")
        for label, result in case.paths.items():
            print(
                f"  {label:62s} {result.median_seconds:9.3f} {result.ratio:6.2f} "
                f"{result.gflops_per_second:8.0f} {result.fraction_within_tolerance:8.4%} "
                f"{'yes' if result.bit_identical else 'no'}"
                + (f" (built in {result.build_seconds:.0f} s)" if result.build_seconds else "")
            )
        print(
            f"  {'ceiling: the convolutions alone, each at its fastest batch':62s} "
            f"{case.ceiling_seconds:9.3f} {case.ceiling_ratio:6.2f} "
            f"{case.ceiling_gflops_per_second:8.0f}"
        )


def print_verdict(label: str, results: list[CaseResult], agrees: bool) -> None:
    ratios = ", ".join(f"{case.name} {case.paths['library purify'].ratio:.2f}x" for case in results)
    ceilings = ", ".join(f"{case.name} {case.ceiling_ratio:.2f}x" for case in results)
    print(
        f"\n{label}: {ratios} (ceiling {ceilings}); agreement within 1/255 on >= 99.9%: "
        f"{'passed' if agrees else 'FAILED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="comdefend-cifar10", help="zoo name or checkpoint")
    parser.add_argument("--repeats", type=int, default=5, help="timed A/B pairs per path")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--batch-32", type=int, default=256, help="32x32 images per call")
    parser.add_argument("--batch-224", type=int, default=4, help="224x224 images per call")
    parser.add_argument(
        "--imagenet-dir",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "../shared/data/imagenet-sample/images",
    )
    parser.add_argument("--candidates", action="store_true", help="also time the alternatives")
    parser.add_argument("--compile", action="store_true", help="with --candidates: torch.compile")
    parser.add_argument("--case", choices=["32", "224", "both"], default="both")
    parser.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="measure again with N single-threaded busy processes running",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.busy < 0:
        parser.error("--busy must be 0 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    model = load_model(args.model)
    cifar = load_dataset("cifar10", "sample").float_images()[: args.batch_32]
    large, large_source = imagenet_images(args.imagenet_dir, args.batch_224)
    cases: list[tuple[str, torch.Tensor, int | None]] = []
    if args.case in ("32", "both"):
        cases.append(("32x32", cifar, None))
    if args.case in ("224", "both"):
        cases.append(("224x224", large, model.config.patch_size))

    def measure_all() -> list[CaseResult]:
        results = []
        for name, images, patch in cases:
            paths = {"library purify": (library_path(model, patch), 0.0)}
            if args.candidates:
                paths.update(candidate_paths(model, patch, images, args.compile, threads))
            results.append(measure_case(name, model, images, patch, paths, args.repeats))
        return results

    results = measure_all()
    loaded: list[CaseResult] = []
    if args.busy:
        print(f"with {args.busy} busy process(es):", file=sys.stderr, flush=True)
        with busy_processes(args.busy):
            loaded = measure_all()

    summary = {
        "command": "python benchmarks/purify.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "threads": threads,
        "machine": platform.processor() or platform.machine(),
        "model": args.model,
        "images_224": large_source,
        "repeats": args.repeats,
        "busy": args.busy,
        "cases": [asdict(case) for case in results],
    }
    if args.busy:
        summary["loaded_cases"] = [asdict(case) for case in loaded]
    agreement = {"ratio": True, "loaded_ratio": True}
    for prefix, measured in (("ratio", results), ("loaded_ratio", loaded)):
        for case in measured:
            library = case.paths["library purify"]
            agrees = library.fraction_within_tolerance >= AGREEMENT_FRACTION
            agreement[prefix] = agreement[prefix] and agrees
            summary[f"{prefix}_{case.name}"] = library.ratio
            summary[f"ceiling_{prefix}_{case.name}"] = case.ceiling_ratio
    ok = agreement["ratio"] and agreement["loaded_ratio"]
    summary["agreement_passed"] = ok
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"torch {torch.__version__}, {threads} threads, model {args.model}; "
        f"224x224 images: {large_source}"
    )
    print_cases(results)
    print_verdict("library purify / plain eager pass", results, agreement["ratio"])
    if args.busy:
        load = f"with {args.busy} single-threaded busy process(es) on the same cores"
        print(f"\n{load}:")
        print_cases(loaded)
        print_verdict(
            f"library purify / plain eager pass {load}", loaded, agreement["loaded_ratio"]
        )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
