"""README's main job, at a reduced size: trains, reports and draws the grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from comdefend.errors import UsageError
from comdefend.quickstart import run_quickstart


def test_quickstart_end_to_end(fashion_dir: Path, tmp_path: Path) -> None:
    result = run_quickstart(tmp_path / "qs", iterations=3, eval_images=20, progress=False)
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert report["reconstruction"]["images"] == 20
    assert report["reconstruction"]["bits_per_pixel"] == 4
    assert report["training"]["iterations"] == 3
    markdown = (tmp_path / "qs" / "report.md").read_text()
    assert "| 20 |" in markdown and "reconstructions.png" in markdown
    with Image.open(result["grid"]) as grid:
        assert grid.size[0] > 12 * 28 and grid.size[1] > 2 * 28
    with pytest.raises(UsageError, match="--force"):
        run_quickstart(tmp_path / "qs", iterations=3, eval_images=20, progress=False)
    run_quickstart(tmp_path / "qs", iterations=2, eval_images=10, progress=False, force=True)
    assert json.loads((tmp_path / "qs" / "report.json").read_text())["training"]["iterations"] == 2
