"""The evaluation engine gives the numbers the single-loop engine gave: cells, clean rows, worst
case, detectors.

``tests/evaluation/golden/*.json`` were recorded on main at c3fb463 (the engine before its
refactoring into crafting, scoring and records) with ``python
tests/evaluation/test_engine_regression.py [CASE...]``, which rewrites them from the code on
``PYTHONPATH``. :func:`comparable` keeps what must not change between engines: the config, the
clean rows, every cell without its timing, the worst case, the detectors and the checkpoint
hashes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from comdefend.evaluation.harness import EvaluationConfig, evaluate

FASHION = Path("/usr/share/datasets/fashion-mnist")
GOLDEN = Path(__file__).parent / "golden"

#: name -> EvaluationConfig keywords (zoo models: their weights ship with the package).
CASES: dict[str, dict[str, Any]] = {
    # every threat model, a randomized ComDefend, a composite defense, uneven batches
    "sample-threat-models": {
        "dataset": "fashion-mnist",
        "split": "sample",
        "classifier": "fashion-cnn",
        "defenses": [
            "none",
            "bits:3+median:2",
            "comdefend:comdefend-fashion-mnist",
            "comdefend:comdefend-fashion-mnist@noise=2",
        ],
        "attacks": ["fgsm", "pgd", "deepfool"],
        "eps": [0, 8, 25],
        "threat_models": ["oblivious", "bpda", "bpda+eot", "relaxed"],
        "n": 7,
        "batch_size": 3,
        "eot_samples": 2,
        "eot_draws": 2,
        "attack_params": {"pgd": {"steps": 2}, "deepfool": {"steps": 5}},
        "progress": False,
    },
    # a randomized defense attacked through its noise, one batch (seeds of batch 0 unchanged)
    "sample-randomized-one-batch": {
        "dataset": "fashion-mnist",
        "split": "sample",
        "classifier": "fashion-cnn",
        "defenses": ["comdefend:comdefend-fashion-mnist@noise=2"],
        "attacks": ["pgd"],
        "eps": [8],
        "threat_models": ["bpda", "bpda+eot", "relaxed"],
        "n": 4,
        "batch_size": 4,
        "eot_samples": 2,
        "eot_draws": 2,
        "attack_params": {"pgd": {"steps": 2}},
        "progress": False,
    },
    # detectors (need the Fashion-MNIST training images)
    "test-detectors": {
        "dataset": "fashion-mnist",
        "split": "test",
        "data_dir": str(FASHION),
        "classifier": "fashion-cnn",
        "defenses": ["none", "jpeg:75", "comdefend:comdefend-fashion-mnist"],
        "attacks": ["bim", "cw"],
        "eps": [8],
        "threat_models": ["oblivious"],
        "n": 6,
        "batch_size": 4,
        "detectors": ["pca", "squeeze"],
        "detector_holdout": 20,
        # lr 0.01: C&W's default when the golden file was recorded (written into its config)
        "attack_params": {
            "bim": {"steps": 2},
            "cw": {"steps": 5, "binary_search_steps": 2, "lr": 0.01},
        },
        "progress": False,
    },
}


#: torch's CPU capability on the machine that recorded the golden files. Float results depend on
#: the instruction set (another one rounds sums differently, and FGSM's sign of a near-zero
#: gradient flips): on other kernels, PSNRs and norms move by up to a few 1e-3 relative (0.1 dB
#: at 23 dB measured on an AVX2 CPU), so floats are compared more loosely there; accuracies,
#: counts and everything else stay exact.
GOLDEN_CPU_CAPABILITY = "AVX512"
FLOAT_REL_TOL = 1e-4 if torch.backends.cpu.get_cpu_capability() == GOLDEN_CPU_CAPABILITY else 1e-2

#: Settings results.json gained after the golden files were recorded, at the value every golden
#: run had (a run that differs from it must not compare equal).
ADDED_CONFIG = {"precision": None, "image_size": None}
ADDED_DEFENSE_SETTINGS = {"precision": "fp32"}
ADDED_ATTACK_SETTINGS = {"stop_when_fooled": False}


def _without_added(values: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not (k in added and v == added[k])}


def comparable(results: dict[str, Any]) -> dict[str, Any]:
    """The parts of ``results`` an engine change must leave identical (JSON round trip)."""
    cells = [
        {
            k: _without_added(v, ADDED_ATTACK_SETTINGS) if k == "attack_settings" else v
            for k, v in cell.items()
            if k != "seconds"
        }
        for cell in results["cells"]
    ]
    config = {k: v for k, v in results["config"].items() if k not in ("out", "force", "resume")}
    kept = {
        "config": _without_added(config, ADDED_CONFIG),
        "dataset": results["dataset"],
        # without the weights reference that results.json gained after the golden files
        "defenses": [
            {
                **d,
                "settings": _without_added(
                    {k: v for k, v in d["settings"].items() if k != "weights"},
                    ADDED_DEFENSE_SETTINGS,
                ),
            }
            for d in results["defenses"]
        ],
        "clean": results["clean"],
        "cells": cells,
        "worst_case": results["worst_case"],
        "detectors": results["detectors"],
        "checkpoint_hashes": sorted(results["checkpoints"].values()),
        "threat_models": results["threat_models"],
    }
    return json.loads(json.dumps(kept, default=str))


#: Cells whose adversarials come from a randomized defense's noise under an attacker threat
#: model: that noise is now seeded per batch (so that any process can craft any batch), which
#: changes batches after the first; the one-batch case checks they are otherwise unchanged.
NOISY = "comdefend:comdefend-fashion-mnist@noise=2"
ATTACKER_TMS = ("bpda", "bpda+eot", "relaxed")


def same(new: Any, old: Any) -> bool:
    """Equal, floats up to float32 rounding noise (a different thread count sums in another
    order: norms and detector thresholds move by 1e-9 to a few 1e-6 relative, most after
    DeepFool's iterations through a relaxed ComDefend; other CPU kernels more, see
    :data:`FLOAT_REL_TOL`); everything else exactly. An accuracy changes by at least one image
    (1/n), far outside the tolerance.

    Example:
        >>> same({"l2": 0.5, "n": 3}, {"l2": 0.5 + 1e-6, "n": 3}), same([0.5], [0.51])
        (True, False)
    """
    if isinstance(new, float) and isinstance(old, float):
        return math.isclose(new, old, rel_tol=FLOAT_REL_TOL, abs_tol=1e-9)
    if isinstance(new, dict) and isinstance(old, dict):
        return new.keys() == old.keys() and all(same(new[k], old[k]) for k in new)
    if isinstance(new, list) and isinstance(old, list):
        return len(new) == len(old) and all(same(a, b) for a, b in zip(new, old, strict=True))
    return bool(new == old)


def _run(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    golden = json.loads((GOLDEN / f"{name}.json").read_text())
    return comparable(evaluate(EvaluationConfig(**CASES[name])).to_dict()), golden


def _noisy_attacked(row: dict[str, Any]) -> bool:
    return row["defense"] == NOISY and row["threat_model"] in ATTACKER_TMS


@pytest.mark.slow
def test_threat_models_and_randomized_defense_match_the_previous_engine() -> None:
    got, golden = _run("sample-threat-models")
    for part in ("config", "dataset", "defenses", "clean", "checkpoint_hashes", "threat_models"):
        assert got[part] == golden[part], part
    assert len(got["cells"]) == len(golden["cells"])
    compared = 0
    for new, old in zip(got["cells"], golden["cells"], strict=True):
        if _noisy_attacked(old):
            assert {k: new[k] for k in ("attack", "eps", "defense", "status")} == {
                k: old[k] for k in ("attack", "eps", "defense", "status")
            }
            continue
        assert same(new, old), (new, old)
        compared += 1
    assert compared >= 40
    worst = [w for w in got["worst_case"] if not _noisy_attacked(w)]
    assert same(worst, [w for w in golden["worst_case"] if not _noisy_attacked(w)])


def test_randomized_defense_attacked_in_one_batch_matches_the_previous_engine() -> None:
    got, golden = _run("sample-randomized-one-batch")
    assert same(got, golden)


@pytest.mark.skipif(not FASHION.exists(), reason=f"{FASHION} is not available")
def test_detectors_match_the_previous_engine() -> None:
    got, golden = _run("test-detectors")
    assert same(got, golden)


def record() -> None:
    torch.set_num_threads(1)
    GOLDEN.mkdir(exist_ok=True)
    for name in sys.argv[1:] or list(CASES):
        result = evaluate(EvaluationConfig(**CASES[name]))
        path = GOLDEN / f"{name}.json"
        path.write_text(json.dumps(comparable(result.to_dict()), indent=1, sort_keys=True) + "\n")
        print(f"wrote {path} ({result.elapsed_s} s)")


if __name__ == "__main__":
    record()
