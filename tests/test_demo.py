"""The offline demo, end to end at a reduced size, on the shipped zoo and embedded samples."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import comdefend.zoo as zoo
from comdefend.cli import app
from comdefend.demo import DEMO_DATASETS, DemoConfig, run_demo
from comdefend.errors import UsageError


def test_every_demo_model_is_shipped() -> None:
    shipped_names = set(zoo.list_pretrained())
    for name, spec in DEMO_DATASETS.items():
        missing = [n for n in spec.zoo_names() if n not in shipped_names]
        assert not missing, f"{name}: the demo uses unshipped models {missing}"


def test_demo_end_to_end_small(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    summary = run_demo(
        DemoConfig(
            out=str(out),
            n=4,
            attacks=["fgsm", "pgd"],
            batch_size=4,
            progress=False,
        )
    )
    assert (out / "index.html").is_file() and (out / "summary.md").is_file()
    written = json.loads((out / "summary.json").read_text())
    assert [d["dataset"] for d in written["datasets"]] == list(DEMO_DATASETS)
    for name, spec in DEMO_DATASETS.items():
        results = json.loads((out / name / "results.json").read_text())
        assert results["dataset"]["split"] == "sample" and results["dataset"]["n"] == 4
        assert results["config"]["defenses"] == list(spec.defenses)
        assert sorted({c["threat_model"] for c in results["cells"]}) == ["bpda", "oblivious"]
        eps = sorted({c["eps"] for c in results["cells"]})
        assert eps == sorted(spec.eps)
        # every defended cell was really attacked under bpda (not reused from oblivious)
        bpda = [c for c in results["cells"] if c["threat_model"] == "bpda"]
        assert all(c["status"] == "ok" for c in bpda if c["defense"] != "none")
        assert (out / name / "report.html").is_file()
        assert f'href="{name}/report.html"' in (out / "index.html").read_text()
    assert summary["index"] == str(out / "index.html")


def test_demo_cli_prints_tables_and_report_path(tmp_path: Path) -> None:
    out = tmp_path / "d"
    result = CliRunner().invoke(
        app,
        [
            "demo",
            "--out",
            str(out),
            "--images",
            "3",
            "--dataset",
            "fashion-mnist",
            "--attack",
            "fgsm",
            "--threat-model",
            "oblivious,bpda",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Threat model: bpda" in result.output
    assert f"report: {out / 'index.html'}" in result.output
    # a second run into the same folder is refused with a one-line error, nothing overwritten
    again = subprocess.run(
        [sys.executable, "-m", "comdefend.cli", "demo", "--out", str(out), "--images", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode != 0 and "--force" in again.stderr, again.stderr
    assert "Traceback" not in again.stderr
    assert (out / "index.html").is_file()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datasets": ["mnist"]}, "valid: fashion-mnist, cifar10"),
        ({"n": 0}, "1..1000"),
        ({"n": 1001}, "1..1000"),
        ({"attacks": ["nope"]}, "valid attacks"),
        ({"threat_models": ["nope"]}, "valid threat models: oblivious"),
    ],
)
def test_demo_bad_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        run_demo(DemoConfig(out=str(tmp_path / "x"), progress=False, **kwargs))


def test_demo_names_missing_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(zoo, "list_pretrained", lambda kind=None: ["fashion-cnn"])
    with pytest.raises(UsageError, match="comdefend-fashion-mnist"):
        run_demo(DemoConfig(out=str(tmp_path / "x"), datasets=["fashion-mnist"], progress=False))
