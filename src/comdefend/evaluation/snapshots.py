"""Measuring a training run along its training, from the snapshots it kept.

``comdefend train --snapshot-every N`` (and every run of ``comdefend residual-study``) keeps the
weights every ``N`` iterations in ``RUN/snapshots/iteration-NNNNNNN.safetensors``. This module
measures those files afterwards, in another process if need be (training and measuring then
share the cores instead of taking turns), and keeps every measured point in a points file:

* :func:`defended_correct` is the one accuracy measurement: which images
  ``classifier(purifier.purify(x))`` labels correctly.
* :class:`SnapshotPoint` is one measured point, a typed record: the snapshot's iteration and
  sha256, the per-image outcomes on the adversarial (and, at some iterations, the clean) images,
  the accuracies with their 95% Wilson intervals, and the held-out PSNR.
* :class:`PointsFile` keeps the points of one run, written atomically after every point. It
  carries the identity of what was measured (the fooling set's sha256, the classifier's, the
  settings): a file made with anything else is refused. Every point carries a checksum and its
  accuracies are recomputed from its per-image outcomes when read, so a flipped byte or an
  edited number is an error that names the file, never a number in a table.
* :func:`measure_snapshots` measures the snapshots of a run that have no point yet (a snapshot
  rewritten since, e.g. after a rollback, is measured again). A point is saved as soon as it is
  measured: an interrupted measurement loses at most the point in progress, and none is measured
  twice.

Example (on a run that kept snapshots)::

    from comdefend.evaluation.snapshots import PointsFile, measure_snapshots
    points = PointsFile("study/points/plain.json", identity={"fooling_set_sha256": "..."})
    measure_snapshots("runs/plain", points, classifier, adversarial, labels, clean=clean)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from comdefend.checkpoint import atomic_write_text, read_metadata, sha256_of
from comdefend.errors import UsageError
from comdefend.metrics import proportion_interval

POINTS_KIND = "snapshot-points"
#: Snapshot files as the trainer names them (``comdefend.training.trainer.snapshot_name``).
SNAPSHOT_NAME = re.compile(r"^iteration-(?P<iteration>\d+)\.safetensors$")


@torch.no_grad()
def defended_correct(
    purifier: torch.nn.Module | None,
    classifier: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int = 50,
) -> torch.Tensor:
    """Per image, whether ``classifier(purifier.purify(x))`` is the true label (bool, CPU).

    ``purifier`` may be any module with a ``purify`` method (a ComDefend) or a defense module
    (called directly); ``None`` measures the undefended classifier. Images travel to the
    classifier's device ``batch`` at a time.
    """
    device = next(classifier.parameters()).device
    outcomes = []
    for chunk, truth in zip(images.split(batch), labels.split(batch), strict=True):
        x = chunk.to(device)
        if purifier is not None:
            purify = getattr(purifier, "purify", None)
            x = purify(x) if callable(purify) else purifier(x)
        outcomes.append(classifier(x).argmax(dim=1).cpu() == truth.cpu())
    return torch.cat(outcomes) if outcomes else torch.zeros(0, dtype=torch.bool)


def _bits(outcomes: torch.Tensor) -> str:
    return "".join("1" if value else "0" for value in outcomes.tolist())


def _checksum(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class SnapshotPoint:
    """One measured snapshot.

    Attributes:
        iteration: training iterations behind the snapshot.
        snapshot_sha256: the snapshot file's sha256 (a rewritten snapshot is measured again).
        adversarial_correct: per adversarial image, ``"1"`` if the defended classifier labels it
            correctly (in the fooling set's order).
        clean_correct: the same for the clean images, or ``None`` where not measured.
        heldout_psnr_db: reconstruction PSNR on the training dataset's held-out images.
        seconds: time the measurement took.
    """

    iteration: int
    snapshot_sha256: str
    adversarial_correct: str
    clean_correct: str | None
    heldout_psnr_db: float | None
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accuracy_after_defense(self) -> float:
        return self.adversarial_correct.count("1") / max(len(self.adversarial_correct), 1)

    @property
    def clean_accuracy_defended(self) -> float | None:
        if self.clean_correct is None:
            return None
        return self.clean_correct.count("1") / max(len(self.clean_correct), 1)

    def summary(self) -> dict[str, Any]:
        """The point as a results row: accuracies, counts and 95% intervals, PSNR."""
        size = len(self.adversarial_correct)
        right = self.adversarial_correct.count("1")
        row: dict[str, Any] = {
            "iteration": self.iteration,
            "accuracy_after_defense": self.accuracy_after_defense,
            "accuracy_after_defense_interval": list(proportion_interval(right, size)),
            "restored": right,
            "fooling_set_size": size,
            "clean_accuracy_defended": self.clean_accuracy_defended,
            "clean_accuracy_defended_interval": None,
            "heldout_psnr_db": self.heldout_psnr_db,
            "snapshot_sha256": self.snapshot_sha256,
        }
        if self.clean_correct is not None:
            clean_right = self.clean_correct.count("1")
            row["clean_accuracy_defended_interval"] = list(
                proportion_interval(clean_right, len(self.clean_correct))
            )
        return {**row, **self.extra}

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["checksum"] = _checksum(record)
        return record

    @classmethod
    def from_record(cls, record: Any, where: str) -> SnapshotPoint:
        """Read a stored point; :class:`UsageError` naming ``where`` if it was altered."""
        if not isinstance(record, dict) or record.get("checksum") != _checksum(record):
            raise UsageError(f"{where} does not match its checksum (the file was altered)")
        try:
            point = cls(**{k: v for k, v in record.items() if k != "checksum"})
        except TypeError as error:
            raise UsageError(f"{where} is not a measured point: {error}") from None
        for outcomes in (point.adversarial_correct, point.clean_correct or ""):
            if set(outcomes) - {"0", "1"}:
                raise UsageError(f"{where} holds per-image outcomes that are not 0/1")
        return point


class PointsFile:
    """The measured points of one run, in a JSON file rewritten atomically after each point.

    Args:
        path: the file (created on the first :meth:`add`).
        identity: what the points were measured with (fooling set, classifier, settings). An
            existing file with another identity is refused with the differing keys named.
    """

    def __init__(self, path: str | os.PathLike, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))  # JSON-normalised (tuples -> lists)
        self.points: dict[int, SnapshotPoint] = {}
        if self.path.exists():
            self._read(self._load(self.path))

    @classmethod
    def read(cls, path: str | os.PathLike) -> PointsFile:
        """An existing points file under the identity it carries, to read its points (every
        point's record checked as when measuring)."""
        data = cls._load(Path(path))
        identity = data.get("identity")
        if not isinstance(identity, dict):
            raise UsageError(f"{path} is not a points file of comdefend (no identity)")
        points = cls.__new__(cls)
        points.path, points.identity, points.points = Path(path), identity, {}
        points._read(data)
        return points

    @staticmethod
    def _load(path: Path) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UsageError(
                f"{path} is corrupt ({error}); delete it to measure its points again"
            ) from None
        except OSError as error:
            raise UsageError(f"{path} cannot be read ({error.strerror})") from None
        if not isinstance(data, dict) or data.get("kind") != POINTS_KIND:
            raise UsageError(f"{path} is not a points file of comdefend")
        return data

    def _read(self, data: dict[str, Any]) -> None:
        stored = data.get("identity", {})
        differing = sorted(
            key
            for key in set(stored) | set(self.identity)
            if stored.get(key) != self.identity.get(key)
        )
        if differing:
            details = ", ".join(
                f"{k}: {stored.get(k)!r} -> {self.identity.get(k)!r}" for k in differing
            )
            raise UsageError(
                f"{self.path} was measured with other settings ({details}); measure into "
                "another folder, or delete the file to measure again"
            )
        for index, record in enumerate(data.get("points", [])):
            point = SnapshotPoint.from_record(record, f"{self.path} (point {index + 1})")
            self.points[point.iteration] = point

    def add(self, point: SnapshotPoint) -> None:
        """Keep ``point`` (replacing one at the same iteration) and rewrite the file."""
        self.points[point.iteration] = point
        payload = {
            "kind": POINTS_KIND,
            "identity": self.identity,
            "points": [self.points[key].to_record() for key in sorted(self.points)],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(payload, indent=1) + "\n")

    def sorted_points(self) -> list[SnapshotPoint]:
        return [self.points[key] for key in sorted(self.points)]


def list_snapshots(run: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every snapshot in ``RUN/snapshots``, by iteration."""
    folder = Path(run) / "snapshots"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = SNAPSHOT_NAME.match(path.name)
            if match:
                found.append((int(match["iteration"]), path))
    return sorted(found)


_HASHED: dict[Path, tuple[int, int, str]] = {}


def _file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and modification time stay the same (a
    measurer that follows a training polls the same snapshots again and again)."""
    stat = path.stat()
    known = _HASHED.get(path)
    if known is not None and known[:2] == (stat.st_size, stat.st_mtime_ns):
        return known[2]
    sha = sha256_of(path)
    _HASHED[path] = (stat.st_size, stat.st_mtime_ns, sha)
    return sha


def snapshot_psnr(path: Path, eval_images: int) -> float | None:
    """The held-out PSNR the trainer stored in a snapshot, if it measured ``eval_images``
    images at that iteration (None otherwise)."""
    training = read_metadata(path).get("training", {})
    if int(training.get("config", {}).get("eval_images", -1)) != eval_images:
        return None
    value = training.get("metrics", {}).get("psnr_db")
    return float(value) if value is not None else None


def measure_snapshots(
    run: str | os.PathLike,
    points: PointsFile,
    classifier: torch.nn.Module,
    adversarial: torch.Tensor,
    labels: torch.Tensor,
    *,
    clean: torch.Tensor | None = None,
    clean_due: Callable[[int], bool] = lambda iteration: True,
    heldout: torch.Tensor | None = None,
    iterations: Iterable[int] | None = None,
    batch: int = 50,
    on_point: Callable[[SnapshotPoint], None] | None = None,
) -> list[SnapshotPoint]:
    """Measure every snapshot of ``run`` that ``points`` lacks; returns the new points.

    Args:
        run: the run folder (its ``snapshots/`` are read).
        points: where the points are kept (and which are already measured).
        classifier: the classifier in eval mode (its device is used).
        adversarial, labels: the attacked images and their true labels.
        clean: the clean images (same order), measured where ``clean_due(iteration)``.
        heldout: the training dataset's held-out images, for the PSNR when the snapshot does
            not carry the trainer's own measurement of that many images.
        iterations: measure only these iterations (default: every snapshot).
        batch: images per forward pass.
        on_point: called with each new point (progress output).
    """
    from comdefend.models.comdefend import ComDefend
    from comdefend.training.trainer import evaluate_reconstruction

    wanted = None if iterations is None else set(iterations)
    device = next(classifier.parameters()).device
    new: list[SnapshotPoint] = []
    for iteration, path in list_snapshots(run):
        if wanted is not None and iteration not in wanted:
            continue
        sha = _file_sha256(path)
        known = points.points.get(iteration)
        if known is not None and known.snapshot_sha256 == sha:
            continue
        started = time.perf_counter()
        model = ComDefend.from_checkpoint(path, map_location=device).eval()
        if _file_sha256(path) != sha:  # rewritten while loading: measure it on the next pass
            continue
        adversarial_correct = defended_correct(model, classifier, adversarial, labels, batch)
        clean_correct = None
        if clean is not None and clean_due(iteration):
            clean_correct = _bits(defended_correct(model, classifier, clean, labels, batch))
        psnr = None
        if heldout is not None:
            psnr = snapshot_psnr(path, int(heldout.shape[0]))
            if psnr is None:
                psnr = evaluate_reconstruction(model, heldout)["psnr_db"]
        point = SnapshotPoint(
            iteration=iteration,
            snapshot_sha256=sha,
            adversarial_correct=_bits(adversarial_correct),
            clean_correct=clean_correct,
            heldout_psnr_db=psnr,
            seconds=round(time.perf_counter() - started, 3),
        )
        points.add(point)
        new.append(point)
        if on_point is not None:
            on_point(point)
    return new


__all__ = [
    "POINTS_KIND",
    "PointsFile",
    "SnapshotPoint",
    "defended_correct",
    "list_snapshots",
    "measure_snapshots",
    "snapshot_psnr",
]
