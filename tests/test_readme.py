"""README's first Python example must run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_first_python_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["purified"].shape == namespace["x"].shape
    assert namespace["x_adv"].shape == namespace["x"].shape
    assert float((namespace["x_adv"] - namespace["x"]).abs().max()) <= 8 / 255 + 1e-6


def test_readme_commands_match_ci() -> None:
    """CI ends by running exactly README's test command, whose steps are joined by ``&&`` so that
    a failing linter or test fails CI."""
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    ci_command = commands[-1].strip()
    block = re.search(r"Tests \(this is what `\.ci/run` runs.*?```bash\n(.*?)\n```", text, re.S)
    assert block, "README has no test command"
    assert block.group(1).strip() == ci_command
    steps = [step.strip() for step in ci_command.split("&&")]
    assert "ruff check src tests" in steps
    assert "mypy" in steps  # [tool.mypy] in pyproject.toml says what it checks
    assert steps[-1] == "python -m pytest -q"
    assert "set -euo pipefail" in ci
