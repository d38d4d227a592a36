"""scripts/compare_precision.py on small made-up residual studies: fp32 and bf16, seeds 0 and 1,
two presets, with known PSNR curves and points measured on one fooling set."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from comdefend.errors import UsageError
from comdefend.evaluation.snapshots import PointsFile, SnapshotPoint

REPO = Path(__file__).resolve().parents[1]
FOOLING = "ab" * 32
UNTIL = 500
# Seed-dependent, sign-alternating offsets: |fp32 - bf16| is 0.5 dB at every evaluation of
# plain (the signed mean is not), the seeds are 1.0 dB apart.
SIGN = {100: -1, 200: 1, 300: -1, 400: 1, 500: -1}


def plain_psnr(precision: str, seed: int) -> dict[int, float]:
    return {
        i: 20.0 + i / 400 + 1.0 * seed + (0.5 * SIGN[i] if precision == "bf16" else 0.0)
        for i in SIGN
    }


def decoder_psnr(precision: str, seed: int) -> dict[int, float]:
    return {i: 22.0 + i / 400 + 2.0 * seed - (0.25 if precision == "bf16" else 0.0) for i in SIGN}


def write_log(run: Path, preset: str, precision: str, seed: int, psnr: dict[int, float],
              trained: int, seconds: list[float]) -> None:  # fmt: skip
    """A log.jsonl as the engine writes it: the start record with the run's config, a record
    per 50-iteration window (with the held-out PSNR every 100), ``paused`` events."""
    config = {
        "dataset": "cifar10", "out": str(run), "preset": preset, "iterations": 7500,
        "batch_size": 20, "lr": 0.001, "seed": seed, "eval_every": 100, "eval_images": 500,
        "recipe": "residual-study", "snapshot_every": 100, "precision": precision,
    }  # fmt: skip
    records: list[dict] = [
        {"event": "start", "iteration": 0, "task": "purifier", "device": "cpu", "config": config}
    ]
    for iteration in range(50, trained + 1, 50):
        record = {"iteration": iteration, "lr": 0.001, "loss": 0.01, "max_abs_code_logit": 9.0}
        if iteration in psnr:
            record["heldout_psnr_db"] = psnr[iteration]
        records.append(record)
    records += [
        {"event": "paused", "iteration": trained, "session_seconds": value} for value in seconds
    ]
    run.mkdir(parents=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def write_points(study: Path, preset: str, psnr: dict[int, float], ends: dict[int, tuple],
                 fooling: str = FOOLING) -> None:  # fmt: skip
    """Points measured as the study measures them: (adversarial, clean) outcomes per iteration."""
    identity = {
        "fooling_set_sha256": fooling, "classifier_sha256": "cd" * 32, "clean_every": 500,
        "eval_images": 500, "heldout_images_sha256": "ef" * 32, "image_size": None,
    }  # fmt: skip
    points = PointsFile(study / "points" / f"{preset}.json", identity)
    for iteration, (adversarial, clean) in ends.items():
        points.add(
            SnapshotPoint(
                iteration=iteration,
                snapshot_sha256=f"{iteration:064d}",
                adversarial_correct=adversarial,
                clean_correct=clean,
                heldout_psnr_db=psnr[iteration],
                seconds=1.0,
            )  # fmt: skip
        )


def early(iterations: int = 400) -> dict[int, tuple]:
    return {i: ("1000000000", None) for i in range(100, iterations + 1, 100)}


def make_studies(root: Path) -> list[Path]:
    """Four studies (fp32/bf16 x seed 0/1), each with plain and residual-decoder-1."""
    end = {
        ("fp32", 0): ("1100000000", "1111111100"),  # 2/10, clean 8/10
        ("bf16", 0): ("1110000000", "1111111000"),  # 3/10, clean 7/10
        ("bf16", 1): ("1000000000", None),  # 1/10
    }
    studies = []
    for precision in ("fp32", "bf16"):
        for seed in (0, 1):
            study = root / f"study-{precision}-s{seed}"
            psnr = plain_psnr(precision, seed)
            seconds = [180.0, 180.0] if (precision, seed) == ("fp32", 0) else []
            write_log(study / "runs" / "plain", "plain", precision, seed, psnr, 500, seconds)
            ends = early() | ({500: end[precision, seed]} if (precision, seed) in end else {})
            write_points(study, "plain", psnr, ends)
            trained = 300 if (precision, seed) == ("bf16", 1) else 500
            psnr = {i: v for i, v in decoder_psnr(precision, seed).items() if i <= trained}
            run = study / "runs" / "residual-decoder-1"
            write_log(run, "residual-decoder-1", precision, seed, psnr, trained, [])
            if (precision, seed) == ("fp32", 0):  # the only measured residual-decoder-1 run
                write_points(study, "residual-decoder-1", psnr, early(500))
            studies.append(study)
    return studies


@pytest.fixture
def script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # as when run from the command line
    return importlib.import_module("compare_precision")


def arguments(studies: list[Path], out: Path, *more: str) -> list[str]:
    return [*map(str, studies), "--presets", "plain,residual-decoder-1",
            "--until", str(UNTIL), "--out", str(out), *more]  # fmt: skip


def test_compares_precision_with_seed_spread(script: ModuleType, tmp_path: Path) -> None:
    studies = make_studies(tmp_path)
    out = tmp_path / "out"
    script.main(arguments(studies, out, "--command", "comdefend residual-study ...",
                          "--hardware", "a test machine"))  # fmt: skip
    results = json.loads((out / "results.json").read_text())

    plain = results["comparisons"]["plain"]
    summary = plain["summary"]
    assert summary["iterations"] == [100, 200, 300, 400, 500]
    assert summary["precision_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(0.5)
    assert summary["precision_gap"]["max_abs_psnr_difference_db"] == pytest.approx(0.5)
    assert summary["seed_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(1.0)
    assert summary["precision_gap_over_seed_gap"] == pytest.approx(0.5)
    # end accuracy: |2/10 - 3/10| for the precisions, |3/10 - 1/10| for the bf16 seeds (the
    # fp32 seed-1 run is not measured at 500)
    assert summary["precision_gap"]["end_pairs_measured"] == 1
    assert summary["precision_gap"]["mean_abs_end_accuracy_difference"] == pytest.approx(0.1)
    assert summary["seed_gap"]["mean_abs_end_accuracy_difference"] == pytest.approx(0.2)
    pairs = {(p["a"], p["b"]): p for p in plain["pairs"]}
    assert [p["differs_in"] for p in plain["pairs"]] == [
        "seed", "precision", "both", "both", "precision", "seed",
    ]  # fmt: skip
    both = pairs["fp32 seed 0", "bf16 seed 1"]  # |1 + 0.5 sign|: 0.5, 1.5, 0.5, 1.5, 0.5
    assert both["mean_abs_psnr_difference_db"] == pytest.approx(0.9)
    assert both["max_abs_psnr_difference_db"] == pytest.approx(1.5)
    assert both["common_evaluations"] == 5 and both["up_to"] == 500
    assert pairs["fp32 seed 0", "bf16 seed 0"]["end_accuracy"]["difference"] == pytest.approx(-0.1)

    decoder = results["comparisons"]["residual-decoder-1"]["summary"]
    assert decoder["iterations"] == [100, 200, 300]  # bf16 seed 1 stopped at 300
    assert decoder["precision_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(0.25)
    assert decoder["seed_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(2.0)
    assert decoder["precision_gap_over_seed_gap"] == pytest.approx(0.125)

    runs = {(r["preset"], r["precision"], r["seed"]): r for r in results["runs"]}
    first = runs["plain", "fp32", 0]
    assert first["study"] == "study-fp32-s0" and first["training_seconds"] == 360.0
    assert first["end"]["restored"] == 2 and first["end"]["fooling_set_size"] == 10
    assert runs["plain", "fp32", 1]["end"] is None
    assert runs["residual-decoder-1", "fp32", 0]["end"]["accuracy_after_defense"] == 0.1
    assert runs["residual-decoder-1", "bf16", 1]["last_iteration"] == 300
    assert set(results["fooling_sets"]) == {FOOLING}
    assert results["provenance"]["hardware"] == "a test machine"

    missing = [
        "plain fp32 seed 1: accuracy after defending at 500 not measured (measured to 400)",
        "residual-decoder-1 fp32 seed 1: accuracy after defending at 500 not measured "
        "(no point measured)",
        "residual-decoder-1 bf16 seed 0: accuracy after defending at 500 not measured "
        "(no point measured)",
        "residual-decoder-1 bf16 seed 1: trained to 300 of 500",
        "residual-decoder-1 bf16 seed 1: accuracy after defending at 500 not measured "
        "(no point measured)",
    ]
    assert results["missing"] == missing
    text = (out / "README.md").read_text()
    assert "Still missing: " + "; ".join(missing) + "." in text
    assert (
        "| study-fp32-s0 | fp32 | 0 | 500 / 7,500 | 20.25 | 20.50 | 20.75 | 21.00 | 21.25 | "
        "0.200 [0.057, 0.510] | 2/10 | 0.800 [0.490, 0.943] | 0.1 h |"
    ) in text
    assert "| study-bf16-s1 | bf16 | 1 | 300 / 7,500 | 24.00 | 24.25 | 24.50 | n/a | n/a |" in text
    assert (
        "| plain | 5 evaluations, 100 to 500 | 0.50 (max 0.50; 2 pairs) | "
        "1.00 (max 1.00; 2 pairs) | 0.50 | 0.100, 0.200 | incomplete (1 missing) |"
    ) in text
    assert plain["verdict"] == {"state": "incomplete", "reasons": [missing[0]]}
    pair = "| fp32 seed 0 | bf16 seed 0 | precision | 5 (500) | 0.50 | 0.50 | -0.100 (yes) |"
    assert pair in text
    assert "comdefend residual-study ..." in text and "Hardware: a test machine." in text
    assert "![held-out PSNR vs iteration](psnr.png)" in text
    assert (out / "psnr.png").read_bytes()[:4] == b"\x89PNG"


def test_a_preset_missing_from_a_study_is_skipped_with_a_note(
    script: ModuleType, tmp_path: Path
) -> None:
    fp32 = tmp_path / "fp32"
    bf16 = tmp_path / "bf16"
    for study, precision in ((fp32, "fp32"), (bf16, "bf16")):
        psnr = plain_psnr(precision, 0)
        write_log(study / "runs" / "plain", "plain", precision, 0, psnr, 500, [])
    starting = tmp_path / "starting" / "runs" / "plain"
    starting.mkdir(parents=True)
    (starting / "log.jsonl").write_text('{"event": "start", "iteration": 0, "con')  # being written
    argv = arguments([fp32, bf16, starting.parents[1]], tmp_path / "out")
    results = script.compare(script.parser().parse_args(argv), argv)
    assert results["notes"] == [
        "fp32: no run of residual-decoder-1 (skipped)",
        "bf16: no run of residual-decoder-1 (skipped)",
        "starting: plain has not logged its start yet (skipped)",
        "starting: no run of residual-decoder-1 (skipped)",
    ]
    assert results["comparisons"]["plain"]["summary"]["seed_gap"] is None
    assert "plain: no pair of seeds at the same precision" in results["missing"]
    assert "residual-decoder-1: no pair of precisions at the same seed" in results["missing"]
    assert "plain fp32 seed 1: no run" in results["missing"]
    assert results["runs"][0]["training_seconds"] is None  # no session has ended


def refusal(script: ModuleType, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as stopped:
        script.main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error: ")
    return error


def test_refusals(script: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    studies = make_studies(tmp_path)
    out = tmp_path / "out"
    same = tmp_path / "again-fp32-s0"
    write_log(same / "runs" / "plain", "plain", "fp32", 0, plain_psnr("fp32", 0), 500, [])
    error = refusal(script, arguments([studies[0], same], out), capsys)
    assert "two runs of plain at fp32, seed 0" in error

    assert "no such study folder" in refusal(script, arguments([tmp_path / "nope"], out), capsys)
    (tmp_path / "empty").mkdir()
    assert "no runs/ folder" in refusal(script, arguments([tmp_path / "empty"], out), capsys)
    beyond = arguments(studies, out)
    beyond[beyond.index("--until") + 1] = "9000"
    assert "beyond every run's training" in refusal(script, beyond, capsys)
    before = arguments(studies, out)
    before[before.index("--until") + 1] = "50"
    assert "no run has a held-out evaluation" in refusal(script, before, capsys)
    assert not out.exists()


def test_command_line_refusal_is_one_line(tmp_path: Path) -> None:
    """Run as a user runs it: the script finds publish_residual_study beside it."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_precision.py"), str(tmp_path),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {tmp_path}: no runs/ folder: not a residual study\n"


def test_the_results_page_summarises_the_comparison(script: ModuleType, tmp_path: Path) -> None:
    """scripts/results_page.py gives the comparison a section with its computed gaps, and refuses
    a results.json it does not know rather than leaving it off the page."""
    results = tmp_path / "results"
    script.main(arguments(make_studies(tmp_path), results / "training-precision"))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- results-at-a-glance:start -->\n<!-- results-at-a-glance:end -->\n")
    page = [sys.executable, str(REPO / "scripts" / "results_page.py"),
            "--results", str(results), "--readme", str(readme)]  # fmt: skip
    done = subprocess.run(page, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    text = (results / "README.md").read_text()
    assert "## training-precision" in text
    assert "| plain | 5 (100 to 500) | 0.50 dB (2 pairs) | 1.00 dB (2 pairs) | incomplete |" in text
    assert (
        "| residual-decoder-1 | 3 (100 to 300) | 0.25 dB (2 pairs) | 2.00 dB (2 pairs) "
        "| incomplete |"
    ) in text
    assert "In progress: 5 items still missing." in text
    (results / "unknown").mkdir()
    (results / "unknown" / "results.json").write_text('{"kind": "something else"}')
    done = subprocess.run(page, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stderr.strip().endswith("unknown/results.json: not a result this page knows")


def test_training_time_of_a_run_with_untimed_sessions_is_unknown(
    script: ModuleType, tmp_path: Path
) -> None:
    """A run whose earlier sessions logged no time (older logs) gets no training time, with a
    note, rather than the time of its last session only."""
    study = tmp_path / "old"
    write_log(study / "runs" / "plain", "plain", "fp32", 0, plain_psnr("fp32", 0), 500, [90.0])
    log = study / "runs" / "plain" / "log.jsonl"
    ended = {"event": "interrupted", "iteration": 200, "saved": True}  # written before times
    resume = {"event": "resume", "iteration": 200}
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:3] + [json.dumps(ended) + "\n", json.dumps(resume) + "\n"]
                           + lines[3:]))  # fmt: skip
    notes: list[str] = []
    run = script.read_run(study, "plain", UNTIL, notes)
    assert run is not None and run.training_seconds is None
    assert notes == [
        "old: training time of plain unknown (1 of its 2 stops logged no time: an older log)"
    ]


def test_the_verdict_reads_a_complete_design_by_its_rule(
    script: ModuleType, tmp_path: Path
) -> None:
    """Every run trained to the end and measured there: plain's precision gap is half its seed
    gap and the end accuracies overlap (within); the decoder's bf16 run at seed 0 restores
    none of what fp32 restores, with intervals apart (beyond), whatever its PSNR gap."""
    ends = {
        ("plain", "fp32", 0): "1100000000", ("plain", "bf16", 0): "1110000000",
        ("plain", "fp32", 1): "1000000000", ("plain", "bf16", 1): "1100000000",
        ("residual-decoder-1", "fp32", 0): "1111111111",
        ("residual-decoder-1", "bf16", 0): "0000000000",
        ("residual-decoder-1", "fp32", 1): "1111111110",
        ("residual-decoder-1", "bf16", 1): "1111111100",
    }  # fmt: skip
    studies = []
    for precision in ("fp32", "bf16"):
        for seed in (0, 1):
            study = tmp_path / f"{precision}-s{seed}"
            for preset, curve in (("plain", plain_psnr), ("residual-decoder-1", decoder_psnr)):
                psnr = curve(precision, seed)
                write_log(study / "runs" / preset, preset, precision, seed, psnr, 500, [60.0])
                write_points(study, preset, psnr, {500: (ends[preset, precision, seed], None)})
            studies.append(study)
    out = tmp_path / "out"
    script.main(arguments(studies, out))
    results = json.loads((out / "results.json").read_text())
    assert results["missing"] == []
    comparisons = results["comparisons"]
    assert comparisons["plain"]["verdict"] == {"state": "within seed spread", "reasons": []}
    assert comparisons["residual-decoder-1"]["verdict"] == {
        "state": "beyond seed spread",
        "reasons": ["the end accuracies of fp32 seed 0 and bf16 seed 0 do not overlap"],
    }
    text = (out / "README.md").read_text()
    assert "| 0.50 | 0.100, 0.100 | within seed spread |" in text
    assert (
        "| beyond seed spread: the end accuracies of fp32 seed 0 and bf16 seed 0 do not overlap |"
    ) in text


def test_a_run_repeated_on_other_hardware_gives_the_hardware_gap(
    script: ModuleType, tmp_path: Path
) -> None:
    """A hardware control repeats plain fp32 seed 0 to 300 on other kernels (0.3 dB off): it
    pairs only with the run it repeats, leaves the precision and seed gaps and what is missing
    as they were, and its gap stands beside theirs over the evaluations they share."""
    studies = make_studies(tmp_path)
    out, again = tmp_path / "out", tmp_path / "again"
    script.main(arguments(studies, out))
    before = json.loads((out / "results.json").read_text())
    control = tmp_path / "study-avx2"
    psnr = {i: v + 0.3 for i, v in plain_psnr("fp32", 0).items() if i <= 300}
    write_log(control / "runs" / "plain", "plain", "fp32", 0, psnr, 300, [])
    script.main(arguments(studies, again, "--hardware-control", str(control),
                          "--kernels", "study-fp32-s0=cpu AVX512"))  # fmt: skip
    results = json.loads((again / "results.json").read_text())
    assert results["missing"] == before["missing"]
    assert results["hardware_controls"] == ["study-avx2"]
    summary = results["comparisons"]["plain"]["summary"]
    old = before["comparisons"]["plain"]["summary"]
    assert summary["precision_gap"] == old["precision_gap"]
    assert summary["seed_gap"] == old["seed_gap"]
    hardware = summary["hardware_gap"]
    assert hardware["iterations"] == [100, 200, 300]
    assert hardware["hardware_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(0.3)
    assert hardware["precision_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(0.5)
    assert hardware["seed_gap"]["mean_abs_psnr_difference_db"] == pytest.approx(1.0)
    pairs = [p for p in results["comparisons"]["plain"]["pairs"] if p["differs_in"] == "hardware"]
    assert [(p["a"], p["b"]) for p in pairs] == [
        ("fp32 seed 0", "fp32 seed 0 (hardware not recorded)")
    ]
    runs = {(r["study"], r["preset"]): r for r in results["runs"]}
    assert runs["study-fp32-s0", "plain"]["kernels"] == "cpu AVX512"
    assert runs["study-avx2", "plain"]["hardware_control"] is True
    assert "hardware_gap" not in results["comparisons"]["residual-decoder-1"]["summary"]
    text = (again / "README.md").read_text()
    assert "Hardware control, over the 3 evaluations from 100 to 300" in text
    assert "repeated on other hardware 0.30 (max 0.30; 1 pair); the precisions" in text
    with pytest.raises(UsageError, match="--hardware-control"):
        script.compare(*parsed(script, arguments([*studies, control], tmp_path / "refused")))


def parsed(script: ModuleType, argv: list[str]) -> tuple:
    return script.parser().parse_args(argv), argv


def test_kernels_of_a_run_are_read_from_its_log(script: ModuleType) -> None:
    assert script.run_kernels([(0, "cpu AVX512"), (900, "cpu AVX512")], None) == "cpu AVX512"
    assert (
        script.run_kernels([(0, "cpu AVX512"), (908, "cpu AVX2")], None)
        == "cpu AVX512, then cpu AVX2 from 908"
    )
    assert script.run_kernels([(0, None), (908, "cpu AVX2")], None) is None
    assert script.run_kernels([(0, None)], "cpu AVX512") == "cpu AVX512"


def test_end_accuracies_on_different_fooling_sets_are_not_compared(
    script: ModuleType, tmp_path: Path
) -> None:
    """Two runs measured on two fooling sets keep their PSNR comparison; their end accuracies
    are not compared, and a pair of precisions at one seed so measured is missing."""
    studies = make_studies(tmp_path)
    other = tmp_path / "other-fooling-set"
    write_log(other / "runs" / "plain", "plain", "bf16", 0, plain_psnr("bf16", 0), 500, [])
    ends = early() | {UNTIL: ("1110000000", "1111111000")}
    write_points(other, "plain", plain_psnr("bf16", 0), ends, fooling="99" * 32)
    out = tmp_path / "out"
    script.main(arguments([studies[0], other], out))
    results = json.loads((out / "results.json").read_text())
    assert set(results["fooling_sets"]) == {FOOLING, "99" * 32}
    (pair,) = results["comparisons"]["plain"]["pairs"]
    assert pair["differs_in"] == "precision" and pair["common_evaluations"] > 0
    assert pair["end_accuracy"] is None and pair["fooling_sets_differ"] is True
    assert any("end accuracies on different fooling sets" in m for m in results["missing"])
    readme = (out / "README.md").read_text()
    assert f"`{FOOLING[:12]}`: study-fp32-s0/plain" in readme
    assert "| n/a (two fooling sets) |" in readme
