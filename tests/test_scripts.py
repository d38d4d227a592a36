"""The repository's scripts that the docs and notes rely on, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import load_module

REPO = Path(__file__).resolve().parents[1]


def _log(path: Path, preset: str, psnrs: dict[int, float], planned: int = 7500) -> Path:
    config = {"dataset": "cifar10", "preset": preset, "iterations": planned}
    lines = [{"event": "start", "iteration": 0, "config": config}]
    for iteration, psnr in psnrs.items():
        lines.append({"iteration": iteration, "loss": 0.01})
        lines.append({"iteration": iteration, "heldout_psnr_db": psnr, "heldout_bit_density": 0.5})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_preset_table_reports_common_iteration_best_and_collapse(tmp_path: Path) -> None:
    steady = _log(tmp_path / "steady.jsonl", "normal", {500: 20.0, 1000: 24.0, 1500: 26.0})
    folder = tmp_path / "diverged"
    folder.mkdir()
    _log(folder / "log.jsonl", "1_1", {500: 22.0, 1000: 30.0})
    late = _log(tmp_path / "late.jsonl", "off_on_1", {500: 21.0, 1000: 29.0, 1500: 12.0})
    speed = tmp_path / "speed.json"
    speed.write_text(json.dumps({"plain/3": 8.0, "residual-both-1/3": 15.0}))
    out = tmp_path / "table" / "presets"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "preset_table.py"),
            str(steady),
            str(folder),
            str(late),
            "--speed",
            str(speed),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {row["run"]: row for row in json.loads(out.with_suffix(".json").read_text())}
    assert rows["steady"]["psnr_common"] == 24.0  # the diverged run stopped at 1,000
    assert rows["steady"]["collapsed"] is False and rows["steady"]["ms_per_iteration"] == 8.0
    assert rows["diverged"]["preset"] == "residual-both-1 (1_1)"
    assert rows["late"]["collapsed"] is True
    assert (rows["late"]["psnr_best"], rows["late"]["best_iteration"]) == (29.0, 1000)
    assert "PSNR @ 1,000" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_preset_table_refuses_a_file_that_is_no_training_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"iteration": 1, "loss": 0.1}) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "preset_table.py"),
            str(bad),
            "--out",
            str(tmp_path / "t"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "needs a start record" in done.stderr and "Traceback" not in done.stderr


def test_register_weights_refuses_a_collapsed_run(tmp_path: Path) -> None:
    registry = REPO / "src" / "comdefend" / "zoo" / "registry.json"
    before = registry.read_text()
    run = tmp_path / "run"
    run.mkdir()
    summary = {
        "config": {"dataset": "cifar10", "eval_images": 500},
        "iterations": 7500,
        "heldout": {"psnr_db": 11.9},
        "best": {"iteration": 6500, "psnr_db": 31.8},
        "collapsed": True,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "register_weights.py"),
            str(run),
            "--name",
            "x",
            "--command",
            "c",
            "--hardware",
            "h",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "collapsed" in done.stderr and "--if-collapsed best" in done.stderr
    assert "Traceback" not in done.stderr
    assert registry.read_text() == before


def _collapsed_run(out: Path, scripted_psnrs) -> dict:
    """A real 6-iteration Fashion-MNIST training whose scripted evaluations collapse after 4."""
    from comdefend.training import trainer as trainer_module

    scripted_psnrs(20.0, 25.0, 12.0, 11.0)
    config = trainer_module.TrainConfig(
        dataset="fashion-mnist",
        out=str(out),
        iterations=6,
        batch_size=8,
        eval_every=2,
        eval_images=16,
        checkpoint_every=2,
        seed=5,
    )
    return trainer_module.train(config, progress=False)


def _register_into(zoo: Path, run: Path, *options: str) -> subprocess.CompletedProcess:
    """Run register_weights.py (a thin wrapper of ``comdefend zoo register``, which
    tests/zoo/test_zoo_cards.py tests) as a user does, against a throw-away zoo folder."""
    redirect = (
        "import runpy, sys\n"
        "from pathlib import Path\n"
        "import comdefend.zoo as zoo\n"
        "zoo.ZOO_FOLDER = Path(sys.argv[1])\n"
        "zoo.REGISTRY_FILE = zoo.ZOO_FOLDER / 'registry.json'\n"
        "script = sys.argv[2]\n"
        "sys.argv = [script, *sys.argv[3:]]\n"
        "runpy.run_path(script, run_name='__main__')\n"
    )
    script = str(REPO / "scripts" / "register_weights.py")
    return subprocess.run(
        [sys.executable, "-c", redirect, str(zoo), script, str(run), *options],
        capture_output=True,
        text=True,
        check=False,
    )


def test_register_weights_auto_ships_a_collapsed_runs_best_weights(
    fashion_dir: Path, tmp_path: Path, scripted_psnrs
) -> None:
    from comdefend.checkpoint import read_metadata, sha256_of

    run = tmp_path / "run"
    summary = _collapsed_run(run, scripted_psnrs)
    assert summary["collapsed"] and summary["best"]["iteration"] == 4
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    common = ("--name", "tiny", "--command", "c", "--hardware", "h", "--notes", "n")
    refused = _register_into(zoo, run, *common)
    assert refused.returncode != 0 and "--if-collapsed best" in refused.stderr
    assert not (zoo / "registry.json").exists()

    done = _register_into(zoo, run, *common, "--weights", "auto")
    assert done.returncode == 0, done.stderr
    registry = json.loads((zoo / "registry.json").read_text())
    assert registry["format"] == "comdefend-zoo/2"
    (entry,) = registry["entries"]
    shipped = zoo / "weights" / "tiny.safetensors"
    assert entry["sha256"] == sha256_of(shipped) == sha256_of(run / "best.safetensors")
    assert sha256_of(shipped) != sha256_of(run / "model.safetensors")
    assert entry["iterations"] == 4 and read_metadata(shipped)["training"]["iterations"] == 4
    assert entry["metrics"]["heldout_psnr_db"] == 25.0
    assert entry["notes"].startswith("n; the run collapsed (final held-out PSNR 11.00 dB")
    assert entry["metrics"]["sample_images"] == 500


def test_register_weights_auto_ships_a_healthy_runs_final_weights(
    fashion_dir: Path, tmp_path: Path
) -> None:
    from comdefend.checkpoint import sha256_of
    from comdefend.training.trainer import TrainConfig, train

    run = tmp_path / "run"
    config = TrainConfig(
        dataset="fashion-mnist", out=str(run), iterations=2, batch_size=8, eval_images=16, seed=5
    )
    train(config, progress=False)
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    # An older entry of the same name is replaced where it stands, before another entry; a
    # registry of format 1 (a bare list) is read and written back versioned.
    shipped = json.loads((REPO / "src/comdefend/zoo/registry.json").read_text())["entries"][0]
    shipped.pop("card")
    older = [{**shipped, "name": "tiny", "sha256": "old"}, {**shipped, "name": "after"}]
    (zoo / "registry.json").write_text(json.dumps(older))
    done = _register_into(
        zoo, run, "--name", "tiny", "--command", "c", "--hardware", "h", "--weights", "auto"
    )
    assert done.returncode == 0, done.stderr
    entry, after = json.loads((zoo / "registry.json").read_text())["entries"]
    assert entry["name"] == "tiny" and after == older[1]
    assert entry["sha256"] == sha256_of(run / "model.safetensors") and entry["notes"] == ""
    # The final weights were the best: best.safetensors is the same file, copied.
    assert sha256_of(run / "best.safetensors") == entry["sha256"]


def test_stabilizer_curves_table_and_chart(tmp_path: Path) -> None:
    plain = _log(tmp_path / "plain.jsonl", "normal", {1000: 26.0, 2500: 27.0, 3000: 7.0})
    stable = tmp_path / "amsgrad"
    stable.mkdir()
    config = {"dataset": "fashion-mnist", "preset": "normal", "iterations": 7500, "seed": 0,
              "lr": 0.001, "stabilize": {"amsgrad": 1.0}}  # fmt: skip
    lines = [{"event": "start", "iteration": 0, "config": config}]
    for iteration, psnr in ((1000, 25.0), (2500, 27.5), (5000, 28.0), (7500, 28.5)):
        if iteration == 5000:  # a collapse the engine flagged and rolled back, then the redo
            lines.append({"iteration": 5000, "heldout_psnr_db": 9.0, "collapse": True})
            lines.append({"event": "rollback", "iteration": 5000, "to": 4900, "lr_scale": 0.5})
        lines.append({"iteration": iteration, "heldout_psnr_db": psnr, "loss": 0.01,
                      "max_abs_code_logit": iteration / 2, "saturated_output": 0.0})  # fmt: skip
    (stable / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    for path in (plain,):  # the older logs: no seed, lr or logit records
        text = path.read_text().replace('"iterations": 7500', '"iterations": 7500, "seed": 1, '
                                        '"lr": 0.001')  # fmt: skip
        path.write_text(text)
    out = tmp_path / "curves"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "stabilizer_curves.py"), str(plain), str(stable),
         "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines()[2:]}
    assert "| none | 1 |" in rows["plain"] and "| 3,000 | - | - | - |" in rows["plain"]
    assert "26.00 / 27.00 / - / -" in rows["plain"]  # collapsed at 3,000, logit not logged
    assert "| amsgrad | 0 |" in rows["amsgrad"] and "28.50 (7,500)" in rows["amsgrad"]
    assert "| 5,000 | 5,000 to 4,900 | 3.75e+03 | 0.00 |" in rows["amsgrad"]
    assert "25.00 / 27.50 / 28.00 / 28.50" in rows["amsgrad"]  # the redone evaluation at 5,000
    assert out.with_suffix(".md").read_text() == done.stdout
    assert out.with_suffix(".png").stat().st_size > 1000


def test_gpu_presets_script_trains_both_arms_resumes_and_summarises_on_the_cpu(
    tmp_path: Path, cifar_dir: Path
) -> None:
    import os

    out = tmp_path / "presets"
    env = {
        **os.environ,
        "OUT": str(out),
        "PRESETS_PRESETS": "normal",
        "PRESETS_ITERATIONS": "2",
        "PRESETS_EVAL_EVERY": "1",
        "PRESETS_EVAL_IMAGES": "8",
        "PRESETS_PARALLEL": "2",
        "PRESETS_DEVICE": "cpu",
        "PRESETS_DATA": str(cifar_dir.parent),
    }
    script = [str(REPO / "scripts" / "gpu_presets.sh")]
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"normal-none", "normal-rollback"}  # the default arms
    for run in summary.values():
        assert run["iterations"] == 2 and run["finished"] and run["collapsed_at"] is None
        assert 5.0 < run["last_psnr_db"] < 40.0
    assert (out / "presets-rollback.md").is_file() and (out / "stabilizers.png").is_file()
    assert "| rollback=0.5 |" in (out / "stabilizers.md").read_text()
    again = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0 and "skip normal rollback (finished)" in again.stdout


def test_gpu_residual_study_script_trains_measures_and_resumes_on_the_cpu(
    tmp_path: Path, cifar_dir: Path, imagenet_dir: Path, efficientnet_lite0
) -> None:
    """The GPU job of the residual study, tried on the CPU with a tiny budget: the presets
    train side by side, measurers follow them, a second call measures nothing twice."""
    import os

    out = tmp_path / "study"
    env = {
        **os.environ,
        "OUT": str(out),
        "STUDY_PRESETS": "plain,residual-decoder-1",
        "STUDY_ITERATIONS": "2",
        "STUDY_EVAL_EVERY": "1",
        "STUDY_CLEAN_EVERY": "2",
        "STUDY_N": "8",
        "STUDY_IMAGE_SIZE": "96",  # the smallest crop whose fooling set is not empty
        "STUDY_EVAL_IMAGES": "4",
        "STUDY_DEVICE": "cpu",
        "STUDY_THREADS": "1",
        "STUDY_IMAGENET": str(imagenet_dir),
        "STUDY_CIFAR10": str(cifar_dir.parent),
    }
    script = [str(REPO / "scripts" / "gpu_residual_study.sh")]
    done = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "complete" in done.stdout.splitlines()[-1]
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True
    for name in ("plain", "residual-decoder-1"):
        points = results["presets"][name]["evaluations"]
        assert [point["iteration"] for point in points] == [1, 2]
        assert points[0]["clean_accuracy_defended"] is None
        assert points[1]["clean_accuracy_defended"] is not None
    before = {path: path.read_text() for path in (out / "points").glob("*.json")}
    again = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {path: path.read_text() for path in (out / "points").glob("*.json")} == before


def test_results_pages_are_generated_from_the_result_files(tmp_path: Path) -> None:
    """docs/results/README.md and the README's table are what scripts/results_page.py makes of
    the result files (no number typed by hand), and a changed result changes them."""
    import shutil

    script = [sys.executable, str(REPO / "scripts" / "results_page.py")]
    check = subprocess.run([*script, "--check"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    results = tmp_path / "results"
    shutil.copytree(REPO / "docs" / "results" / "fashion-test-10000", results / "fm")
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n<!-- results-at-a-glance:start -->\nold\n<!-- results-at-a-glance:end -->\ntail\n"
    )
    arguments = ["--results", str(results), "--readme", str(readme)]
    made = subprocess.run([*script, *arguments], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    data = json.loads((results / "fm" / "results.json").read_text())
    cell = next(c for c in data["cells"] if c["defense"] == "none" and c["attack"] == "fgsm")
    value = f"| fgsm | {cell['eps']:g} | {100 * cell['robust_accuracy']:.1f} ["
    assert value in (results / "README.md").read_text()
    assert "old" not in readme.read_text() and readme.read_text().endswith("tail\n")
    assert "10,000" in readme.read_text()
    cell["robust_accuracy"] = 0.5  # a changed result is a stale page
    (results / "fm" / "results.json").write_text(json.dumps(data))
    stale = subprocess.run([*script, *arguments, "--check"], capture_output=True, text=True)
    assert stale.returncode == 1 and "out of date" in stale.stderr


def test_the_table_at_a_glance_shows_the_budget_nearest_8() -> None:
    """CIFAR-10 evaluated at 2, 8 and 16/255 is quoted at 8/255, not at its first budget."""
    page = load_module(REPO / "scripts" / "results_page.py")
    assert page.glance_eps([2.0, 8.0, 16.0]) == 8.0
    assert page.glance_eps([4.0, 12.0]) == 4.0  # a tie goes to the smaller budget
    assert page.glance_eps([25.0, 2.0]) == 2.0
    cifar = json.loads(
        (REPO / "docs" / "results" / "cifar10-test-10000" / "results.json").read_text()
    )
    rows = page.glance_rows([("cifar", cifar, {})])
    assert len(rows) == 2 + 6 and all(row.endswith(" at 8 |") for row in rows[2:])
    short = page.glance_rows([("cifar", cifar, {})], authors_only=True)
    assert [row.split("|")[5].strip() for row in short[2:]] == [
        "`none`",
        "`comdefend:runs/official-rgb.safetensors`",  # the authors' weights, not the zoo's
    ]
    # bpda+eot on a deterministic defense repeats bpda: one row under bpda, none under bpda+eot
    golden = REPO / "tests" / "evaluation" / "golden" / "sample-threat-models.json"
    rows = page.glance_rows([("sample", json.loads(golden.read_text()), {})])
    shown = {(row.split("|")[4].strip(), row.split("|")[5].strip()) for row in rows[2:]}
    assert ("bpda", "`comdefend:comdefend-fashion-mnist`") in shown
    assert ("bpda+eot", "`comdefend:comdefend-fashion-mnist@noise=2`") in shown
    assert ("bpda+eot", "`comdefend:comdefend-fashion-mnist`") not in shown
    assert ("bpda+eot", "`none`") not in shown


def test_a_result_of_several_machines_says_so() -> None:
    """A run resumed on another machine names every machine under its command."""
    page = load_module(REPO / "scripts" / "results_page.py")
    epyc = {"comdefend": "0.1.0", "torch": "2.13.0", "cpu": "AMD EPYC", "cpu_capability": "AVX2"}
    xeon = {**epyc, "cpu": "Intel Xeon", "cpu_capability": "AVX512"}
    one = page._provenance_lines({"environment": epyc, "environments": [epyc]}, {})
    two = page._provenance_lines({"environment": epyc, "environments": [xeon, epyc]}, {})
    assert one == ["- comdefend 0.1.0, torch 2.13.0.", ""]
    assert two == [
        "- comdefend 0.1.0, torch 2.13.0; computed on Intel Xeon (AVX512); AMD EPYC (AVX2).",
        "",
    ]


def test_publishing_a_run_makes_the_folder_the_results_page_reads(tmp_path: Path) -> None:
    """scripts/publish_results.py: the data without the checkout's path, the report rendered
    from it (the published one is exactly that), the provenance from what the run recorded."""
    publish = load_module(REPO / "scripts" / "publish_results.py")
    published = REPO / "docs" / "results" / "cifar10-relaxed-500"
    results = json.loads((published / "results.json").read_text())
    run = tmp_path / "runs" / "relaxed"
    run.mkdir(parents=True)
    # as the run wrote it: the checkpoint named by its absolute path
    local = json.loads(
        json.dumps(results).replace('"runs/official-rgb', f'"{REPO}/runs/official-rgb')
    )
    assert local != results
    (run / "results.json").write_text(json.dumps(local))
    (run / "accuracy.png").write_bytes(b"png")
    target = publish.publish(run, "relaxed", "comdefend evaluate ...", "notes", root=tmp_path)
    assert json.loads((target / "results.json").read_text()) == results
    assert (target / "report.md").read_text() == (published / "report.md").read_text()
    assert (target / "accuracy.png").read_bytes() == b"png"
    provenance = json.loads((target / "provenance.json").read_text())
    stated = json.loads((published / "provenance.json").read_text())
    assert provenance["wall_time"] == stated["wall_time"]  # from elapsed_s, not typed
    assert provenance["command"] == "comdefend evaluate ..." and provenance["notes"] == "notes"
    assert provenance["hardware"] == "AMD EPYC (AVX2), 2 torchrun processes"
    # an existing publication is kept without --force; a run in progress is refused
    with pytest.raises(SystemExit, match="exists"):
        publish.publish(run, "relaxed", "c", root=tmp_path)
    (run / "results.json").unlink()
    (run / "progress.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="still in progress"):
        publish.publish(run, "other", "c", root=tmp_path)
