"""Points files of measured snapshots (comdefend.evaluation.snapshots.PointsFile), read back by
a report under the identity they carry."""

from __future__ import annotations

from pathlib import Path

import pytest

from comdefend.errors import UsageError
from comdefend.evaluation.snapshots import PointsFile, SnapshotPoint

IDENTITY = {"fooling_set_sha256": "ab" * 32, "clean_every": (500,)}


def _point(iteration: int) -> SnapshotPoint:
    return SnapshotPoint(
        iteration=iteration, snapshot_sha256=f"{iteration:064d}", adversarial_correct="0110",
        clean_correct=None, heldout_psnr_db=25.0, seconds=1.5,
    )  # fmt: skip


def test_a_points_file_reads_back_under_its_own_identity(tmp_path: Path) -> None:
    path = tmp_path / "points" / "plain.json"
    written = PointsFile(path, IDENTITY)
    written.add(_point(200))
    written.add(_point(100))
    read = PointsFile.read(path)
    assert read.identity == {"fooling_set_sha256": "ab" * 32, "clean_every": [500]}
    assert [point.iteration for point in read.sorted_points()] == [100, 200]
    assert read.points[100] == written.points[100]
    assert read.points[200].accuracy_after_defense == 0.5
    with pytest.raises(UsageError, match="measured with other settings"):
        PointsFile(path, {**IDENTITY, "clean_every": [100]})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "is corrupt"),
        ('{"kind": "something else"}', "not a points file of comdefend"),
        ('{"kind": "snapshot-points", "points": []}', "no identity"),
    ],
)
def test_a_file_that_is_no_points_file_gets_one_clear_error(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "plain.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        PointsFile.read(path)
    with pytest.raises(UsageError, match="cannot be read"):
        PointsFile.read(tmp_path / "missing.json")
