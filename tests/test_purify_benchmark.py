"""``benchmarks/purify.py``: a smoke run with the least it can measure, and its ceiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from support import load_module

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "purify.py"


def _benchmark() -> ModuleType:
    return load_module(BENCHMARK, "purify_benchmark")


def test_the_ceiling_times_every_convolution_of_the_pass() -> None:
    benchmark = _benchmark()
    model = benchmark.load_model("comdefend-cifar10")
    timings = benchmark.convolution_seconds_per_input(model, 8, repeats=1, batches=(2,))
    convolutions = benchmark._convolutions(model.encoder) + benchmark._convolutions(model.decoder)
    assert len(timings) == len(convolutions)
    assert timings[0][0].startswith("encoder.0 (3->")
    assert timings[-1][0].startswith("decoder.") and timings[-1][0].endswith("->3)")
    assert all(seconds > 0 for _, seconds in timings)


def test_a_smoke_run_reports_the_ratio_and_its_ceiling() -> None:
    command = [sys.executable, str(BENCHMARK), "--repeats", "1", "--case", "32"]
    command += ["--batch-32", "4", "--threads", "1", "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    (case,) = result["cases"]
    assert case["images"] == 4 and case["mode"] == "full"
    assert case["ceiling_seconds"] > 0
    assert case["ceiling_ratio"] == pytest.approx(
        case["reference_median_seconds"] / case["ceiling_seconds"]
    )
    assert result["ceiling_ratio_32x32"] == case["ceiling_ratio"]
    assert result["agreement_passed"] is True
