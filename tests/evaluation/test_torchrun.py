"""``torchrun -m comdefend evaluate``: two CPU processes (gloo) write the single-process report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from comdefend.evaluation.harness import EvaluationConfig, evaluate

SETTINGS: dict[str, Any] = {
    "dataset": "fashion-mnist",
    "split": "sample",
    "classifier": "fashion-cnn",
    # a randomized defense attacked through its noise: seeds must not depend on the process
    "defenses": ["none", "bits:3", "comdefend:comdefend-fashion-mnist@noise=2"],
    "attacks": ["fgsm", "pgd"],
    "eps": [8],
    "threat_models": ["oblivious", "bpda"],
    "n": 10,
    "batch_size": 3,  # 4 batches: 2 per process, the last one short
    "eot_draws": 2,
    "attack_params": {"pgd": {"steps": 2}},
    "progress": False,
}
ARGS = [
    "--dataset", "fashion-mnist", "--split", "sample", "--classifier", "fashion-cnn",
    "--defense", "none", "--defense", "bits:3",
    "--defense", "comdefend:comdefend-fashion-mnist@noise=2",
    "--attack", "fgsm,pgd", "--eps", "8", "--threat-model", "oblivious,bpda", "--images", "10",
    "--batch-size", "3", "--eot-draws", "2", "--attack-param", "pgd.steps=2", "--no-progress",
]  # fmt: skip


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "comdefend", "evaluate", *ARGS, *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def _same_parts(results: dict[str, Any]) -> dict[str, Any]:
    cells = [{k: v for k, v in c.items() if k != "seconds"} for c in results["cells"]]
    keep = ("clean", "worst_case", "detectors", "defenses", "dataset", "checkpoints")
    return json.loads(json.dumps({"cells": cells, **{k: results[k] for k in keep}}))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("one") / "report"
    return evaluate(EvaluationConfig(**SETTINGS, out=str(out))).to_dict()


@pytest.mark.slow
def test_two_processes_write_the_single_process_report(
    reference: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "two"
    done = _torchrun("--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2 and reference["processes"] == 1
    assert _same_parts(results) == _same_parts(reference)
    assert (out / "report.md").read_text().split("## Threat model")[1:] == (
        Path(reference["config"]["out"]) / "report.md"
    ).read_text().split("## Threat model")[1:]
    assert done.stdout.count("evaluated 12 cells") + done.stderr.count("evaluated 12 cells") == 1


@pytest.mark.slow
def test_two_processes_resume_a_single_process_run(
    reference: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import comdefend.evaluation.harness as harness

    real = harness._craft_and_score_group
    calls = []

    def interrupted_after_one(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[6])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "_craft_and_score_group", interrupted_after_one)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        evaluate(EvaluationConfig(**SETTINGS, out=str(out)))
    assert calls == ["fgsm", "pgd"]

    done = _torchrun("--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["resumed_groups"] == 1
    assert _same_parts(results) == _same_parts(reference)


def _a_group_saved(path: Path) -> bool:
    """The progress file lists a finished group (it is first written with the clean scores)."""
    from comdefend.checkpoint import load_checkpoint

    try:
        return bool(load_checkpoint(path, "evaluation-progress")[1]["groups"])
    except Exception:  # noqa: BLE001 (not there yet)
        return False


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in found.stdout.split()]


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank", "launcher"])
def test_a_killed_rank_or_launcher_resumes_to_the_single_process_report(
    reference: dict[str, Any], tmp_path: Path, victim: str
) -> None:
    """SIGKILL of one worker, or of torchrun itself, once a group is saved: the same command
    with --resume (here in one process) gives the uninterrupted single-process cells."""
    import signal
    import time

    from comdefend.evaluation.progress import PROGRESS_FILE

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "comdefend",
        "evaluate",
        *ARGS,
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not _a_group_saved(out / PROGRESS_FILE) and launcher.poll() is None:
            assert time.monotonic() < deadline, "no group was saved"
            time.sleep(0.05)
        killed = launcher.poll() is None
        if killed:  # still running: kill it mid-run
            workers = _children(launcher.pid)
            os.kill(workers[-1] if victim == "rank" and workers else launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=120)
    finally:
        try:  # the launcher's process group: a worker orphaned by a killed launcher too
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    if killed:
        assert not (out / "results.json").exists()  # it was stopped before the end
    resumed = evaluate(EvaluationConfig(**SETTINGS, out=str(out), resume=True)).to_dict()
    assert resumed["resumed_groups"] >= 1
    assert _same_parts(resumed) == _same_parts(reference)
