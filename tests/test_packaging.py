"""What a user installs: the sdist and wheel contents, the metadata, the version, the entry points,
the dependency bounds and README's install steps."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import comdefend

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def _requirement(name: str) -> Requirement:
    for line in PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == name:
            return requirement
    raise AssertionError(f"{name} is not a dependency in pyproject.toml")


def test_version_flag() -> None:
    result = _run("-m", "comdefend", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"comdefend {comdefend.__version__}"


def test_python_dash_m_is_the_command_line() -> None:
    """``python -m comdefend`` runs the commands and turns errors into one ``error:`` line."""
    ok = _run("-m", "comdefend", "presets", "--channels", "1", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"name": "plain"' in ok.stdout
    bad = _run("-m", "comdefend", "presets", "--channels", "2")
    assert bad.returncode != 0
    assert bad.stderr.strip() == "error: --channels must be 1 or 3"


def test_one_version_source() -> None:
    """The version is written once, in ``comdefend/__init__.py``; setuptools reads it there."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "comdefend.__version__"
    }
    Version(comdefend.__version__)  # a valid PEP 440 version
    literal = re.compile(re.escape(comdefend.__version__).join(["[\"']", "[\"']"]))
    sources = [*(REPO / "src").rglob("*.py"), REPO / "pyproject.toml"]
    holders = [path.relative_to(REPO) for path in sources if literal.search(path.read_text())]
    assert holders == [Path("src/comdefend/__init__.py")]


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = PYPROJECT["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert "MIT License" in (REPO / "LICENSE").read_text()
    # a License classifier beside an SPDX expression is deprecated (setuptools refuses both)
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if "setuptools" in r]
    assert Requirement(setuptools).specifier.contains("77"), "SPDX licenses need setuptools>=77"
    assert not Requirement(setuptools).specifier.contains("76.9")


def test_readme_torch_steps_fit_the_torch_requirement() -> None:
    """Every ``torch==X`` README tells users to install satisfies pyproject's range (else the
    package install would replace it), and README names PyTorch's CPU wheel index."""
    readme = (REPO / "README.md").read_text()
    pins = re.findall(r"pip install (?:-q )?torch==([\w.+]+)", readme)
    assert pins, "README has no torch install step"
    torch_range = _requirement("torch").specifier
    for pin in pins:
        assert torch_range.contains(pin, prereleases=True), (pin, str(torch_range))
    assert "--index-url https://download.pytorch.org/whl/cpu" in readme


@pytest.mark.slow
def test_oldest_allowed_typer_runs_every_command(tmp_path: Path) -> None:
    """Install the lowest typer pyproject allows (with the newest click pip picks for it) and
    open every command's --help with it."""
    typer_range = _requirement("typer")
    (lowest,) = [spec.version for spec in typer_range.specifier if spec.operator == ">="]
    target = tmp_path / "site"
    install = _run(
        "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(target),
        f"typer=={lowest}",
    )  # fmt: skip
    if install.returncode != 0:
        pytest.skip(f"could not install typer=={lowest}: {install.stderr.strip()[-300:]}")
    script = (
        "import sys, typer, typer.main\n"
        f"assert typer.__file__.startswith({str(target)!r}), typer.__file__\n"
        "from typer.testing import CliRunner\n"
        "from comdefend.cli import app\n"
        "runner, failed = CliRunner(), []\n"
        "group = typer.main.get_command(app)\n"
        "for args in [[], *([name] for name in group.commands)]:\n"
        "    result = runner.invoke(app, [*args, '--help'])\n"
        "    if result.exit_code != 0:\n"
        "        failed.append((args, repr(result.exception)))\n"
        "print(len(group.commands), failed)\n"
        "sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO / "src")])},
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """sdist and wheel built offline from a copy of the checkout (the wheel from the sdist, as
    ``python -m build`` and pip do), with this environment's setuptools."""
    source = tmp_path_factory.mktemp("source") / "comdefend"
    skip = shutil.ignore_patterns(
        ".git", ".venv", "runs", "reports", "build", "dist", "*.egg-info", "__pycache__",
        ".*_cache", "*.pyc",
    )  # fmt: skip
    shutil.copytree(REPO, source, ignore=skip)
    out = tmp_path_factory.mktemp("dist")
    sdist_run = _run("-m", "build", "--no-isolation", "--sdist", "--outdir", str(out), cwd=source)
    assert sdist_run.returncode == 0, sdist_run.stdout[-2000:] + sdist_run.stderr[-2000:]
    (sdist,) = out.glob("*.tar.gz")
    unpacked = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (sdist_root,) = unpacked.iterdir()
    wheel_run = _run(
        "-m", "build", "--no-isolation", "--wheel", "--outdir", str(out), cwd=sdist_root
    )  # fmt: skip
    assert wheel_run.returncode == 0, wheel_run.stdout[-2000:] + wheel_run.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_sdist_has_the_library_and_the_whole_test_suite_or_none(built: tuple[Path, Path]) -> None:
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        root = f"comdefend-{comdefend.__version__}/"
        names = {name.removeprefix(root) for name in archive.getnames()}
    assert {"LICENSE", "README.md", "pyproject.toml", "MANIFEST.in"} <= names
    package = REPO / "src" / "comdefend"
    library = {
        path.relative_to(REPO).as_posix()
        for path in package.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert library - names == set()
    tests = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "tests").rglob("*.py")
        if "__pycache__" not in path.parts
    }
    shipped_tests = {name for name in names if name.startswith("tests/") and name.endswith(".py")}
    assert shipped_tests in (set(), tests), sorted(shipped_tests)
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.slow
def test_wheel_metadata_and_contents(built: tuple[Path, Path]) -> None:
    _, wheel = built
    version = comdefend.__version__
    info = f"comdefend-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{info}/METADATA").decode()
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
    assert f"{info}/licenses/LICENSE" in names
    assert {"comdefend/__main__.py", "comdefend/py.typed", "comdefend/cli.py"} <= names
    assert any(name.startswith("comdefend/zoo/weights/") for name in names)
    assert not [name for name in names if name.startswith("tests/")]
    headers = metadata.split("\n\n", 1)[0].splitlines()
    assert f"Version: {version}" in headers
    assert "License-Expression: MIT" in headers
    assert "License-File: LICENSE" in headers
    assert not [line for line in headers if line.startswith("Classifier: License ::")]
    assert [line for line in headers if line.startswith("Project-URL: ")]
    requires = [Requirement(line.split(": ", 1)[1]) for line in headers if "Requires-Dist" in line]
    typer_requirement = next(r for r in requires if r.name == "typer")
    assert typer_requirement.specifier == _requirement("typer").specifier
    assert "comdefend = comdefend.cli:main" in entry_points
