"""Helpers shared by test modules in several folders (``tests/`` is on ``sys.path``: the root
``conftest.py`` puts it there)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from comdefend.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``comdefend ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def tiny_classifier() -> nn.Module:
    """A seeded 8x8 grayscale 10-class CNN in eval mode (the global random state untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
        ).eval()


def load_module(path: Path, name: str | None = None) -> ModuleType:
    """The Python file at ``path`` (a benchmark, a script, a docs hook), loaded as a module and
    registered in ``sys.modules`` under ``name`` (default: the file's stem), where dataclasses
    look their module up."""
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
