"""Evaluation harness: invariants on a tiny Fashion-MNIST classifier, CLI end to end, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from comdefend.errors import UsageError
from comdefend.evaluation.harness import EvaluationConfig, evaluate, validate_config
from comdefend.evaluation.harness import _craft_and_score_group as _REAL_GROUP

FASHION = Path("/usr/share/datasets/fashion-mnist")
FAST_PGD = {"pgd": {"steps": 3}, "bim": {"steps": 3}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A fashion-cnn trained for a few Adam steps on 512 images, and an untrained ComDefend."""
    if not FASHION.exists():
        pytest.skip(f"{FASHION} is not available")
    from comdefend.data.datasets import load_dataset
    from comdefend.models.classifiers import build_classifier, save_classifier
    from comdefend.models.comdefend import ComDefend, ComDefendConfig

    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", "train", FASHION).head(512)
    x, y = data.float_images(), data.labels.long()
    model = build_classifier("fashion-cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(30):  # about 70 % test accuracy
        index = torch.arange(step * 32, step * 32 + 32) % 512
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("ckpt")
    classifier = str(save_classifier(model.eval(), folder / "classifier.safetensors"))
    comdefend = folder / "comdefend.safetensors"
    ComDefend(ComDefendConfig(image_channels=1)).save(comdefend)
    return {"classifier": classifier, "comdefend": str(comdefend)}


def _config(checkpoints: dict[str, str], **overrides: object) -> EvaluationConfig:
    values: dict[str, object] = {
        "dataset": "fashion-mnist",
        "classifier": checkpoints["classifier"],
        "defenses": ["none"],
        "attacks": ["pgd"],
        "eps": [0, 4, 16],
        "threat_models": ["oblivious"],
        "n": 32,
        "batch_size": 32,
        "data_dir": str(FASHION),
        "attack_params": {k: v for k, v in FAST_PGD.items()},
        "progress": False,
        "eot_draws": 2,
        "eot_samples": 2,
    }
    values.update(overrides)
    values["attack_params"] = {
        k: v
        for k, v in values["attack_params"].items()
        if k in values["attacks"]  # type: ignore[union-attr]
    }
    return EvaluationConfig(**values)  # type: ignore[arg-type]


def _cells(results: dict, **match: object) -> list[dict]:
    return [c for c in results["cells"] if all(c[k] == v for k, v in match.items())]


def test_robust_accuracy_falls_with_eps_and_eps0_equals_clean(checkpoints: dict) -> None:
    results = evaluate(
        _config(checkpoints, attacks=["pgd", "bim", "fgsm"], defenses=["none", "bits:4"])
    ).to_dict()
    for defense in ("none", "bits:4"):
        clean = next(c for c in results["clean"] if c["defense"] == defense)["accuracy"]
        assert clean > 0.3  # the tiny classifier learned something
        for attack in ("pgd", "bim", "fgsm"):
            cells = sorted(_cells(results, attack=attack, defense=defense), key=lambda c: c["eps"])
            accuracies = [c["robust_accuracy"] for c in cells]
            assert cells[0]["eps"] == 0
            assert accuracies[0] == pytest.approx(clean, abs=1e-12)
            assert cells[0]["mean_linf"] == 0.0
            if attack != "fgsm":
                assert all(b <= a + 0.05 for a, b in zip(accuracies, accuracies[1:], strict=False))
            assert accuracies[-1] < clean
            assert cells[-1]["mean_linf"] <= 16 / 255 + 1e-6
    worst = {
        (w["defense"], w["eps"]): w["worst_case_robust_accuracy"] for w in results["worst_case"]
    }
    for cell in results["cells"]:
        assert worst[(cell["defense"], cell["eps"])] <= cell["robust_accuracy"] + 1e-12


def test_bpda_at_most_oblivious_and_reuse_rules(checkpoints: dict) -> None:
    spec = f"comdefend:{checkpoints['comdefend']}@noise=1.0"
    results = evaluate(
        _config(
            checkpoints,
            n=8,
            batch_size=8,
            attacks=["fgsm"],
            eps=[16],
            defenses=["none", spec, "jpeg:75", "bits:3"],
            threat_models=["oblivious", "bpda", "bpda+eot", "relaxed"],
        )
    ).to_dict()
    oblivious = _cells(results, defense=spec, threat_model="oblivious")[0]
    bpda = _cells(results, defense=spec, threat_model="bpda")[0]
    assert bpda["robust_accuracy"] <= oblivious["robust_accuracy"] + 0.13  # one image of 8
    bits_obl = _cells(results, defense="bits:3", threat_model="oblivious")[0]
    bits_bpda = _cells(results, defense="bits:3", threat_model="bpda")[0]
    assert bits_bpda["robust_accuracy"] <= bits_obl["robust_accuracy"] + 0.13
    assert bpda["draws"] == 2 and "robust_accuracy_std" in bpda
    none_bpda = _cells(results, defense="none", threat_model="bpda")[0]
    none_obl = _cells(results, defense="none", threat_model="oblivious")[0]
    assert none_bpda["status"] == "reused"
    assert none_bpda["robust_accuracy"] == none_obl["robust_accuracy"]
    relaxed_jpeg = _cells(results, defense="jpeg:75", threat_model="relaxed")[0]
    assert relaxed_jpeg["status"] == "skipped" and "relaxed" in relaxed_jpeg["note"]
    eot_jpeg = _cells(results, defense="jpeg:75", threat_model="bpda+eot")[0]
    assert eot_jpeg["status"] == "reused" and "falls back to bpda" in eot_jpeg["note"]
    assert _cells(results, defense=spec, threat_model="relaxed")[0]["status"] == "ok"
    assert results["checkpoints"][checkpoints["comdefend"]]


def test_same_seed_same_results(checkpoints: dict) -> None:
    noisy = f"comdefend:{checkpoints['comdefend']}@noise=1.0"
    config = _config(
        checkpoints,
        n=4,
        batch_size=2,
        eps=[8],
        attacks=["pgd"],
        defenses=["none", noisy],
        threat_models=["oblivious", "bpda"],
    )
    first, second = evaluate(config).to_dict(), evaluate(config).to_dict()

    def timeless(cells: list[dict]) -> str:  # wall-clock seconds are the only expected change
        assert all("seconds" in c for c in cells)
        return json.dumps([{k: v for k, v in c.items() if k != "seconds"} for c in cells])

    assert timeless(first["cells"]) == timeless(second["cells"])
    assert first["worst_case"] == second["worst_case"]


def test_cli_writes_all_files(checkpoints: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from comdefend.cli import app

    out = tmp_path / "report"
    args = [
        "evaluate", "--dataset", "fashion-mnist", "--classifier", checkpoints["classifier"],
        "--defense", "none", "--defense", "bits:4", "--attack", "fgsm,deepfool",
        "--attack-param", "deepfool.steps=3", "--eps", "0,8", "--threat-model", "oblivious,bpda",
        "--n", "32", "--batch-size", "32", "--data-dir", str(FASHION), "--out", str(out),
        "--detector", "pca", "--detector", "squeeze", "--detector-holdout", "100", "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # no bar: status lines say how far a run got (its log in the background)
    assert "saved the clean images' scores:" in result.output
    assert "saved deepfool (minimum norm): group 3 of 3" in result.output
    for name in ("results.json", "results.csv", "report.md", "report.html", "grid.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["eps"] == [0.0, 8.0]
    assert {c["eps"] for c in results["cells"] if c["attack"] == "deepfool"} == {"min-norm"}
    assert set(results["checkpoints"]) == {checkpoints["classifier"]}
    assert results["environment"]["torch"] == torch.__version__
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(results["cells"]) == 1 + 3 * 2 * 2
    report = (out / "report.md").read_text()
    assert "Threat model: bpda" in report and "| clean |" in report
    assert "data:image/png;base64" in (out / "report.html").read_text()
    detection = results["detectors"]["results"]
    assert {row["attack"] for row in detection} == {"fgsm", "deepfool"}
    assert 0.0 <= detection[0]["pca"]["roc_auc"] <= 1.0
    # the folder now exists: a second run without --force is refused
    again = CliRunner().invoke(app, args)
    assert again.exit_code != 0 and "--force" in str(again.exception or again.output)


def _main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: list[str]) -> str:
    from comdefend.cli import main

    monkeypatch.setattr(sys, "argv", ["comdefend", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--attack": "nope"}, "valid attacks: fgsm, bim, pgd"),
        ({"--defense": "blur:3"}, "valid: none"),
        ({"--threat-model": "magic"}, "oblivious, bpda, bpda+eot, relaxed"),
        ({"--eps": "300"}, "[0, 255]"),
        ({"--dataset": "cifar10"}, "fashion-mnist"),
        ({"--n": "0"}, "--images must be an integer >= 1"),
        (
            {
                "--attack": "bim",
                "--defense": "jpeg:75",
                "--attack-param": "bim.stop_when_fooled=true",
            },
            "bim.stop_when_fooled stops on the attacker's model, which under oblivious",
        ),
    ],
)
def test_bad_inputs_exit_with_message(
    checkpoints: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    change: dict[str, str],
    expected: str,
) -> None:
    options = {
        "--dataset": "fashion-mnist",
        "--classifier": checkpoints["classifier"],
        "--defense": "none",
        "--attack": "fgsm",
        "--eps": "8",
        "--threat-model": "oblivious",
        "--n": "4",
        "--data-dir": str(FASHION),
        "--out": str(tmp_path / "out"),
        **change,
    }
    args = ["evaluate", *[item for pair in options.items() for item in pair], "--no-progress"]
    err = _main(monkeypatch, capsys, args)
    assert err.startswith("error: ") and expected in err
    assert not (tmp_path / "out").exists()


def test_validate_config_normalises() -> None:
    config = validate_config(
        EvaluationConfig(
            dataset="fashion-mnist",
            classifier="x",
            attacks=["PGD", "pgd"],
            eps=[8, 2.5, 8],
            threat_models=["bpda", "oblivious"],
        )
    )
    assert config.attacks == ["pgd"]
    assert config.eps == [2.5, 8.0]
    assert config.threat_models == ["oblivious", "bpda"]
    with pytest.raises(UsageError, match="1/255"):
        validate_config(EvaluationConfig(dataset="fashion-mnist", classifier="x", eps=[-1]))


def test_stop_when_fooled_is_refused_where_the_attacker_does_not_see_the_defense() -> None:
    def config(threat_models: list[str], defenses: list[str]) -> EvaluationConfig:
        return EvaluationConfig(
            dataset="fashion-mnist",
            classifier="x",
            attacks=["pgd", "fgsm"],
            defenses=defenses,
            threat_models=threat_models,
            attack_params={"pgd": {"stop_when_fooled": True}},
        )

    for threat_models in (["bpda"], ["bpda", "bpda+eot"]):  # forward = the defense itself
        validate_config(config(threat_models, ["none", "jpeg:75"]))
    validate_config(config(["oblivious"], ["none"]))  # no defense: the attacker's model is it
    for threat_models in (["oblivious"], ["relaxed"], ["bpda", "oblivious"]):
        with pytest.raises(UsageError, match="pgd.stop_when_fooled"):
            validate_config(config(threat_models, ["none", "jpeg:75"]))


def _timeless(results: dict) -> str:
    """Everything a resumed run must reproduce: all but wall-clock times and file lists."""
    cells = [{k: v for k, v in c.items() if k != "seconds"} for c in results["cells"]]
    return json.dumps(
        [cells, results["worst_case"], results["clean"], results["detectors"]],
        default=str,
        sort_keys=True,
    )


def test_interrupted_evaluation_resumes_to_the_same_results(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import comdefend.evaluation.harness as harness
    from comdefend.cli import app
    from comdefend.evaluation.progress import PROGRESS_FILE

    noisy = f"comdefend:{checkpoints['comdefend']}@noise=1.0"
    settings = {
        "n": 8,
        "batch_size": 4,
        "attacks": ["fgsm", "pgd"],
        "eps": [4, 16],
        "defenses": ["none", "bits:4", noisy],
        "threat_models": ["oblivious", "bpda"],
        "detectors": ["pca"],
        "detector_holdout": 100,
    }
    reference = evaluate(_config(checkpoints, **settings, out=str(tmp_path / "whole"))).to_dict()

    real_group = harness._craft_and_score_group
    calls: list[tuple[str, object]] = []

    def interrupted_after_two(*args: object, **kwargs: object) -> object:
        calls.append((args[6], args[7]))  # (attack, eps)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_group(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(harness, "_craft_and_score_group", interrupted_after_two)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(checkpoints, **settings, out=str(out)))
    assert (out / PROGRESS_FILE).is_file() and not (out / "results.json").exists()

    # the same command without --resume is refused, and says how to continue
    with pytest.raises(UsageError, match="--resume"):
        validate_config(_config(checkpoints, **settings, out=str(out)))
    # other settings are refused, naming what differs
    with pytest.raises(UsageError, match="eps"):
        evaluate(_config(checkpoints, **{**settings, "eps": [4, 8]}, out=str(out), resume=True))

    def counted(*args: object, **kwargs: object) -> object:
        calls.append((args[6], args[7]))
        return real_group(*args, **kwargs)  # type: ignore[arg-type]

    calls.clear()
    monkeypatch.setattr(harness, "_craft_and_score_group", counted)
    args = [
        "evaluate", "--dataset", "fashion-mnist", "--classifier", checkpoints["classifier"],
        "--defense", "none", "--defense", "bits:4", "--defense", noisy, "--attack", "fgsm,pgd",
        "--attack-param", "pgd.steps=3", "--eps", "4,16", "--threat-model", "oblivious,bpda",
        "--n", "8", "--batch-size", "4", "--data-dir", str(FASHION), "--out", str(out),
        "--detector", "pca", "--detector-holdout", "100", "--eot-draws", "2", "--eot-samples", "2",
        "--no-progress", "--resume",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "resumed: 2 (attack, eps) groups read back" in result.output
    assert "saved the clean images" not in result.output  # the clean scores were read back
    # without a bar, a status line says what each saved group brings (a log of a background run)
    assert "saved pgd at 4/255: group 3 of 4," in result.output
    assert "saved pgd at 16/255: group 4 of 4," in result.output
    assert "saved fgsm" not in result.output  # read back, not saved again
    assert calls == [("pgd", 4.0), ("pgd", 16.0)]  # only the unfinished groups were computed
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["resumed_groups"] == 2
    assert _timeless(resumed) == _timeless(json.loads(json.dumps(reference, default=str)))
    assert not (out / PROGRESS_FILE).exists()
    # the grid's images came back from the progress file: the same picture, byte for byte
    assert (out / "grid.png").read_bytes() == (tmp_path / "whole" / "grid.png").read_bytes()
    # a finished folder has nothing to resume
    with pytest.raises(UsageError, match="finished"):
        validate_config(_config(checkpoints, **settings, out=str(out), resume=True))


def test_resume_and_force_checks(checkpoints: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="give one of them"):
        validate_config(_config(checkpoints, out=str(tmp_path / "r"), resume=True, force=True))
    with pytest.raises(UsageError, match="--out"):
        validate_config(_config(checkpoints, resume=True))
    # nothing to resume yet: a fresh run
    validate_config(_config(checkpoints, out=str(tmp_path / "new"), resume=True))


def _group_calls(
    monkeypatch: pytest.MonkeyPatch, stop_at: int | None = None
) -> list[tuple[str, list[int]]]:
    """Record ``(attack, batch numbers)`` of every step the harness computes, raising
    KeyboardInterrupt at call ``stop_at``: the returned list fills as the run goes."""
    import comdefend.evaluation.harness as harness

    calls: list[tuple[str, list[int]]] = []

    def step(*args: object, **kwargs: object) -> object:
        calls.append((str(args[6]), list(args[4].numbers)))  # type: ignore[attr-defined]
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return _REAL_GROUP(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(harness, "_craft_and_score_group", step)
    return calls


def test_an_interrupted_group_resumes_from_its_saved_batches(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interruption inside an (attack, eps) group loses at most the batch in progress: the
    finished batches of the group are read back, and the report equals an uninterrupted one."""
    import comdefend.evaluation.harness as harness
    from comdefend.evaluation.progress import BATCHES_FOLDER, PROGRESS_FILE

    noisy = f"comdefend:{checkpoints['comdefend']}@noise=1.0"
    settings = {
        "n": 12,
        "batch_size": 4,
        "attacks": ["fgsm", "pgd"],
        "eps": [8],
        "defenses": ["none", "bits:4", noisy],
        "threat_models": ["oblivious", "bpda"],
    }
    monkeypatch.setattr(harness, "_batches_per_step", lambda scorer, config: 1)
    reference = evaluate(_config(checkpoints, **settings, out=str(tmp_path / "whole"))).to_dict()
    assert not (tmp_path / "whole" / BATCHES_FOLDER).exists()

    _group_calls(monkeypatch, stop_at=6)  # fgsm's 3 batches, then pgd's first two
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(checkpoints, **settings, out=str(out)))
    saved = sorted(p.name for p in (out / BATCHES_FOLDER).iterdir())
    assert saved == ["pgd-8.0-batches-0-0.safetensors", "pgd-8.0-batches-1-1.safetensors"]
    assert (out / PROGRESS_FILE).is_file()

    counted = _group_calls(monkeypatch)
    resumed = evaluate(_config(checkpoints, **settings, out=str(out), resume=True)).to_dict()
    assert [numbers for _, numbers in counted] == [[2]]  # only pgd's last batch was computed
    assert resumed["work"]["saved_batches_read_back"] == 2
    assert _timeless(resumed) == _timeless(reference)
    assert not (out / BATCHES_FOLDER).exists() and not (out / PROGRESS_FILE).exists()


def test_saved_batches_are_checked_and_removed_without_resume(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import comdefend.evaluation.harness as harness
    from comdefend.evaluation.progress import BATCHES_FOLDER

    settings = {"n": 8, "batch_size": 4, "attacks": ["fgsm"], "eps": [8], "defenses": ["none"]}
    monkeypatch.setattr(harness, "_batches_per_step", lambda scorer, config: 1)
    reference = evaluate(_config(checkpoints, **settings, out=str(tmp_path / "whole"))).to_dict()

    def run(resume: bool, force: bool = False) -> dict:
        calls.clear()
        config = _config(checkpoints, **settings, out=str(out), resume=resume, force=force)
        return evaluate(config).to_dict()

    out = tmp_path / "cut"
    calls = _group_calls(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        run(resume=False)
    (saved,) = (out / BATCHES_FOLDER).iterdir()
    # a damaged step is computed again (with a warning), never read as numbers
    saved.write_bytes(saved.read_bytes()[:-9] + b"\x00" * 9)
    with pytest.raises(KeyboardInterrupt):
        run(resume=True)
    assert [numbers for _, numbers in calls] == [[0], [1]]
    # --force starts over: the steps of the replaced run are removed before any is saved
    monkeypatch.setattr(harness, "_craft_and_score_group", _REAL_GROUP)
    assert (out / BATCHES_FOLDER).exists()
    forced = run(resume=False, force=True)
    assert _timeless(forced) == _timeless(reference)
    assert not (out / BATCHES_FOLDER).exists()


def test_a_long_group_logs_where_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a progress bar, a group of hours says every few minutes how far it got, and how
    long the rest should take at the pace of the batches computed so far."""
    import comdefend.evaluation.harness as harness

    clock = [1000.0]
    monkeypatch.setattr(harness.time, "monotonic", lambda: clock[0])
    lines: list[str] = []
    monkeypatch.setattr(harness.logger, "info", lines.append)
    monkeypatch.setattr(harness, "STATUS_EVERY_S", 0.0)
    cw = f"cw {harness._budget(8.0)} (group 9 of 9)"
    status = harness._step_status(cw, enabled=True)
    clock[0] += 1200.0  # 20 batches read back from a resume, then 10 computed in 20 minutes
    status(30, 50, 10)
    deepfool = harness._step_status(f"deepfool {harness._budget('min-norm')}", True, saved=False)
    clock[0] += 30.0
    deepfool(1, 5, 1)
    harness._step_status(cw, enabled=True)(20, 50, 0)  # only read back so far: no pace yet
    harness._step_status(cw, enabled=True)(50, 50, 50)  # the group's own line follows
    harness._step_status(cw, enabled=False)(20, 50, 20)  # a progress bar shows it
    assert lines == [
        "cw at 8/255 (group 9 of 9): 30 of 50 batches of this process, about 40 min left "
        "(saved; --resume continues)",
        "deepfool (minimum norm): 1 of 5 batches of this process, about 2 min left",
        "cw at 8/255 (group 9 of 9): 20 of 50 batches of this process (saved; --resume continues)",
    ]
    monkeypatch.setattr(harness, "STATUS_EVERY_S", 600.0)
    harness._step_status(cw, enabled=True)(20, 50, 20)  # too soon after the start
    assert len(lines) == 3
    clock[0] += 700.0
    status(49, 50, 29)  # 1,900 s for 29 batches: one more takes about a minute
    assert lines[-1].endswith("49 of 50 batches of this process, about 1 min left (saved; "
                              "--resume continues)")  # fmt: skip


def test_a_run_resumed_on_other_kernels_names_every_machine(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run may go on on another kind of machine: it says so, and results.json lists both."""
    import comdefend.evaluation.harness as harness
    import comdefend.training.run as run

    real_environment = run.environment

    def machine(capability: str) -> object:
        return lambda: {**real_environment(), "cpu_capability": capability, "cpu_threads": 2}

    settings = {"n": 8, "batch_size": 4, "attacks": ["fgsm"], "eps": [8], "defenses": ["none"]}
    monkeypatch.setattr(harness, "_batches_per_step", lambda scorer, config: 1)
    out = tmp_path / "moved"
    monkeypatch.setattr(run, "environment", machine("AVX512"))
    _group_calls(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(checkpoints, **settings, out=str(out)))
    warnings: list[str] = []
    monkeypatch.setattr(harness.logger, "warning", warnings.append)
    monkeypatch.setattr(run, "environment", machine("AVX2"))
    monkeypatch.setattr(harness, "_craft_and_score_group", _REAL_GROUP)
    result = evaluate(_config(checkpoints, **settings, out=str(out), resume=True)).to_dict()
    assert [w for w in warnings if "other kernels" in w] == [
        "parts of this evaluation were computed with other kernels "
        f"(torch {torch.__version__} cpu AVX512) than this machine's (torch {torch.__version__} "
        "cpu AVX2):"
        " their numbers can differ slightly from a run on one machine; results.json lists every "
        'machine under "environments"'
    ]
    assert result["environment"]["cpu_capability"] == "AVX2"
    assert [e["cpu_capability"] for e in result["environments"]] == ["AVX512", "AVX2"]
    assert all("cpu_threads" not in e for e in result["environments"])
    # a run on one machine names one
    whole = evaluate(_config(checkpoints, **settings, out=str(tmp_path / "whole"))).to_dict()
    assert whole["environments"] == [whole["environment"]]


def test_an_interrupted_clean_pass_resumes_from_its_saved_batches(
    checkpoints: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean pass (every image through every defense) is saved batch by batch too."""
    import comdefend.evaluation.harness as harness
    from comdefend.evaluation.progress import BATCHES_FOLDER
    from comdefend.evaluation.scoring import Scorer

    settings = {
        "n": 12,
        "batch_size": 4,
        "attacks": ["fgsm"],
        "eps": [8],
        "defenses": ["none", "bits:4"],
    }
    monkeypatch.setattr(harness, "_batches_per_step", lambda scorer, config: 1)
    reference = evaluate(_config(checkpoints, **settings, out=str(tmp_path / "whole"))).to_dict()
    real_score = Scorer.score
    calls: list[list[int]] = []

    def interrupted(self: Scorer, index: int, images: object, numbers: list[int], *rest: object):  # noqa: ANN202
        calls.append(numbers)
        if len(calls) == 5:  # the clean pass: batch 0 and 1 under both defenses, then batch 2
            raise KeyboardInterrupt
        return real_score(self, index, images, numbers, *rest)  # type: ignore[arg-type]

    out = tmp_path / "cut"
    monkeypatch.setattr(Scorer, "score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate(_config(checkpoints, **settings, out=str(out)))
    saved = sorted(p.name for p in (out / BATCHES_FOLDER).iterdir())
    assert saved == ["clean-batches-0-0.safetensors", "clean-batches-1-1.safetensors"]
    monkeypatch.setattr(Scorer, "score", real_score)
    resumed = evaluate(_config(checkpoints, **settings, out=str(out), resume=True)).to_dict()
    assert resumed["work"]["saved_batches_read_back"] == 2
    assert _timeless(resumed) == _timeless(reference)
    assert not (out / BATCHES_FOLDER).exists()
