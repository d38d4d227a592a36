"""``benchmarks/train_step.py``: a smoke run with the least it can measure, and its arithmetic
(ratios, compile break-even, peak) on made-up measurements."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from support import load_module

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def _benchmark() -> ModuleType:
    return load_module(BENCHMARK, "train_step_benchmark")


def test_a_smoke_run_reports_every_path_against_the_eager_fp32_loop(cifar_dir: Path) -> None:
    command = [sys.executable, str(BENCHMARK), "--iterations", "1", "--repeats", "1"]
    command += ["--precisions", "fp32", "--paths", "minimal,trainer,channels-last", "--json"]
    command += ["--threads", "1", "--cifar-dir", str(cifar_dir.parent)]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert set(result["paths"]) == {"fp32 minimal", "fp32 trainer", "fp32 channels-last"}
    assert result["paths"]["fp32 minimal"]["over_eager_fp32"] == 1.0
    for row in result["paths"].values():
        assert row["gflops"] > 0 and len(row["img_s"]) == 1
    assert result["step_gflop"] == pytest.approx(192.34, abs=0.01)  # the plain model, batch 20
    assert result["peak"]["assumption"] and result["matmul_gflops"] > 0


def test_unknown_paths_are_refused() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--paths", "minimal,jit"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown path(s) jit" in done.stderr


def test_ratios_and_the_compile_break_even() -> None:
    bench = _benchmark()
    measure = bench.Measurement
    raw = {
        ("fp32", "minimal"): [measure(10.0, 2.0, 20), measure(20.0, 1.0, 20)],
        ("fp32", "trainer"): [measure(10.0, 2.0, 20), measure(20.0, 1.0, 20)],
        # steps of 1 s against the trainer's 1.5 s (median); 61 s first iteration: 60 s compile
        ("fp32", "compile"): [measure(20.0, 61.0, 20), measure(40.0, 5.5, 20)],
    }
    rows = bench.report(raw, 100.0, {"fp32_gflops": 200.0})
    assert rows["fp32 trainer"]["over_eager_fp32"] == 1.0
    compiled = rows["fp32 compile"]
    assert compiled["over_eager_fp32"] == 2.0
    assert compiled["compile_s"] == {"cold": 60.0, "warm": 5.0}
    saved = compiled["saved_s_per_iteration"]
    assert saved == pytest.approx(1.5 - 20 / 30)  # median steps: 1.5 s and 20 / 30 img/s
    assert compiled["break_even_iterations"] == pytest.approx(60.0 / saved)
    assert compiled["net_s_7500"] == pytest.approx(7500 * saved - 60.0)
    assert rows["fp32 minimal"]["fraction_of_peak"] == pytest.approx(
        rows["fp32 minimal"]["gflops"] / 200.0
    )


def test_the_peak_states_its_assumption() -> None:
    bench = _benchmark()
    given = bench.peak(2, None, 250.0)
    assert given["fp32_gflops"] == 250.0 and given["assumption"] == "--peak-gflops"
    derived = bench.peak(2, 3.0, None)
    if derived["fp32_gflops"] is not None:  # a CPU whose vector width the flags tell
        assert "2 cores x 3.00 GHz (--clock-ghz)" in derived["assumption"]
