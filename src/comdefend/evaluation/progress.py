"""Resumable evaluations: each finished (attack, eps) group is saved in the report folder.

A full-test-set evaluation can run for hours on a CPU. After every (attack, eps) group, that is
every threat model and defense of one attack at one budget, the harness rewrites
``PROGRESS_FILE`` in the report folder (atomically, safetensors: per-image correctness as
tensors, the cells and settings as JSON metadata). Before the first group, it saves every
image's clean scores under each defense (the clean pass purifies every image once per defense, as
costly as a group). ``evaluate --resume`` reads the clean scores and the finished groups back
instead of recomputing them; the file is removed once the report is written. Inside the group
in progress, each process also saves its finished batches (:class:`BatchProgress`), so that a
group of several hours is not lost to an interruption.

A run resumes only with the settings it started with: the progress file records a fingerprint
(every setting that changes a number, the sha256 of the classifier's weights and of every other
checkpoint, and the identity of the images the run uses: their count, shape and the sha256 of
their pixels and labels) and a resume with a different one is refused, saying what differs. The
images and the classifier count, not where they lie: the same images in a moved or renamed
folder resume, and so does the same classifier file moved or named another way (a zoo name for
its path), while a changed image or a changed model (a retrained checkpoint, a factory that
builds other weights) does not. Every random
choice of the harness is seeded per batch, so a resumed run gives the same numbers as an
uninterrupted one.

The file is checked when read: a sha256 of its tensors and one of its metadata are stored in it,
and each restored cell must agree with its per-image record (accuracy, image and draw counts). A
damaged or altered file is refused, naming it: the run is then started over with ``--force``
(or the file deleted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, TypeVar

import torch

from comdefend.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from comdefend.data.datasets import tensors_sha256
from comdefend.data.images import to_pixels
from comdefend.errors import CheckpointError, UsageError
from comdefend.evaluation.records import CleanRecord, GroupRecord, header_metadata
from comdefend.evaluation.scoring import accuracy_stats
from comdefend.training.run import kernels

PROGRESS_FILE = "progress.safetensors"
PROGRESS_KIND = "evaluation-progress"
CLEAN_PREFIX = "clean/"  # the names of the clean scores' tensors in a progress file
#: Settings that do not choose what is computed: left out of the fingerprint. ``data_dir`` only
#: says where the images lie; what they are is the fingerprint's ``data`` part. ``classifier``
#: only says where the model lies; what it is is the fingerprint's ``classifier`` part (its
#: sha256). ``device`` only says which hardware computes: a run started on a CPU goes on on a
#: GPU, as on a CPU of other kernels, with the warning of :func:`kernel_change`.
UNFINGERPRINTED = ("out", "force", "resume", "progress", "data_dir", "classifier", "device")
#: Metadata keys not covered by the metadata checksum (itself, and what save_checkpoint adds).
_UNCHECKSUMMED = ("metadata_sha256", "format_version")

logger = logging.getLogger(__name__)


def fingerprint(
    config: dict[str, Any],
    checkpoints: dict[str, str],
    data: Any,
    classifier: str | None = None,
) -> dict:
    """What must match between an interrupted run and its resume.

    Args:
        config: the run's settings (those in :data:`UNFINGERPRINTED` are left out).
        checkpoints: sha256 of every other checkpoint (the defenses'), by name.
        data: the identity of the images the run uses, by role, e.g.
            ``{"test": ImageSet.identity()}`` (:meth:`comdefend.data.datasets.ImageSet.identity`).
        classifier: the sha256 of the classifier: of its checkpoint file, or of the
            ``state_dict`` tensors of a model built by a factory or passed from Python.
    """
    settings = {k: v for k, v in config.items() if k not in UNFINGERPRINTED}
    # JSON round trip: tuples become lists, as they will be when read back
    return json.loads(
        json.dumps(
            {
                "config": settings,
                "classifier": classifier,
                "checkpoints": checkpoints,
                "data": data,
            },
            sort_keys=True,
            default=str,
        )
    )


#: A shipped model's file as older progress files named it: its path inside the installed
#: package, wherever that lay.
_SHIPPED_FILE = re.compile(r"(?:^|[\\/])comdefend[\\/]zoo[\\/]weights[\\/]([^\\/]+)\.safetensors$")


def _as_today(saved: Any) -> Any:
    """A fingerprint saved by an older version as today's :func:`fingerprint` writes it, so that
    its progress file still resumes: its shipped models named ``zoo:NAME``, not by the path of
    the package that held them, and without the settings that are no longer in a fingerprint
    (``device``).

    Example:
        >>> old = {"config": {"n": 8, "device": "cpu"},
        ...        "checkpoints": {"/venv/lib/comdefend/zoo/weights/m.safetensors": "ab"}}
        >>> _as_today(old)
        {'config': {'n': 8}, 'checkpoints': {'zoo:m': 'ab'}}
    """
    if not isinstance(saved, dict):
        return saved
    today = dict(saved)
    if isinstance(saved.get("config"), dict):
        today["config"] = {k: v for k, v in saved["config"].items() if k not in UNFINGERPRINTED}
    if isinstance(saved.get("checkpoints"), dict):
        named = {}
        for key, digest in saved["checkpoints"].items():
            match = _SHIPPED_FILE.search(key)
            named[f"zoo:{match.group(1)}" if match else key] = digest
        today["checkpoints"] = named
    return today


def group_key(attack: str, eps: Any) -> str:
    """The name of an (attack, eps) group in the progress file."""
    return json.dumps([attack, eps])


class EvaluationProgress:
    """The finished groups of one run: restored from ``folder`` on resume, saved as they finish.

    Args:
        folder: the report folder, or ``None`` (nothing is saved: no ``out`` given).
        fingerprint: see :func:`fingerprint`. A resumed run keeps the one it started with (as
            ``self.fingerprint``): an older version's may name settings no longer in it.
        resume: read the groups an interrupted run in ``folder`` finished.

    Raises:
        UsageError: ``resume`` and the saved run's fingerprint differs from ``fingerprint``
            (the message names the differing settings, or says how the images changed).
        CheckpointError: the progress file is unreadable, does not match its checksums, or
            contradicts itself (a cell and its per-image record).
    """

    def __init__(self, folder: str | Path | None, fingerprint: dict, resume: bool) -> None:
        self.path = Path(folder) / PROGRESS_FILE if folder is not None else None
        self.fingerprint = fingerprint
        self.groups: list[dict[str, Any]] = []
        self.correct: dict[str, torch.Tensor] = {}
        self.grid: dict[str, Any] = {}
        #: every image's clean scores, saved once so that a resume does not purify the clean
        #: images again (``None``: not saved yet, or a file of an older comdefend)
        self.clean: CleanRecord | None = None
        self.elapsed_s = 0.0
        self.restored = 0
        #: every machine that ran this evaluation so far (:func:`add_environments`)
        self.environments: list[dict[str, Any]] = []
        if self.path is None or not self.path.exists():
            return
        if not resume:  # --force: the interrupted run is replaced
            self.path.unlink()
            return
        try:
            tensors, metadata = load_checkpoint(self.path, PROGRESS_KIND)
        except CheckpointError as error:
            # not the checkpoint loader's hint (import-official): this file is ours to remake
            cause = error.__cause__
            reason = str(cause).splitlines()[0] if cause else "not an evaluation progress file"
            raise self._damaged(f"unreadable: {reason}") from None
        self._check_checksums(tensors, metadata)
        saved = _as_today(metadata.get("fingerprint"))
        if saved != fingerprint:
            raise UsageError(_refusal(self.path.parent, saved, fingerprint))
        # the run keeps the fingerprint it started with: its batch files carry its digest
        self.fingerprint = metadata["fingerprint"]
        try:
            self.groups = list(metadata["groups"])
            self.elapsed_s = float(metadata["elapsed_s"])
            self.environments = [dict(e) for e in metadata.get("environments") or []]
            grid_specs = list(metadata["grid_purified"])
            defenses = list(fingerprint.get("config", {}).get("defenses", []))
            expected = {f"grid/purified/{i}" for i in range(len(grid_specs))}
            for number, group in enumerate(self.groups):
                expected |= self._check_group(number, group, tensors, defenses)
            if metadata.get("clean") is not None:
                self.clean, names = self._restore_clean(metadata["clean"], tensors, defenses)
                expected |= names
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            raise self._damaged(f"incomplete record: {type(error).__name__} {error}") from None
        self.correct = {k: v for k, v in tensors.items() if k.startswith("correct/")}
        stray = sorted(
            set(tensors) - expected - {f"grid/{n}" for n in ("clean", "adversarial", "difference")}
        )
        if stray:
            raise self._damaged(f"tensors no group lists: {', '.join(stray[:3])}")
        for name in ("clean", "adversarial", "difference"):
            if f"grid/{name}" in tensors:
                self.grid[name] = _grid_images(tensors[f"grid/{name}"])
        purified = {
            s: _grid_images(tensors[f"grid/purified/{i}"]) for i, s in enumerate(grid_specs)
        }
        if purified:
            self.grid["purified"] = purified
        self.restored = len(self.groups)

    def _damaged(self, reason: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: the evaluation progress file is damaged ({reason}); pass --force "
            "instead of --resume to start the evaluation over, or delete it"
        )

    def _check_checksums(self, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
        stored_metadata = metadata.get("metadata_sha256")
        stored_tensors = metadata.get("tensors_sha256")
        if stored_metadata is None or stored_tensors is None:
            raise self._damaged(
                "no checksum: written by an older comdefend, or altered; its groups cannot be "
                "trusted"
            )
        if stored_metadata != _metadata_sha256(metadata):
            raise self._damaged("its metadata does not match its checksum: the file was altered")
        if stored_tensors != tensors_sha256(tensors):
            raise self._damaged(
                "its per-image tensors do not match their checksum: the file was altered"
            )

    def _check_group(
        self, number: int, group: dict, tensors: dict[str, torch.Tensor], defenses: list[str]
    ) -> set[str]:
        """Every computed cell of a restored group agrees with its per-image record; returns
        the group's tensor names.

        A file whose checksums are right can still hold wrong numbers (an edit followed by new
        checksums, a bug): the cells are what reaches results.json, so they are recomputed
        from the per-image correctness that worst-case accuracy also reads."""
        key, cells = group["key"], group["cells"]
        listed = {(int(index), str(tm)) for index, tm in group["correct"]}
        computed = {
            (defenses.index(cell["defense"]), cell["threat_model"]): cell
            for cell in cells
            if cell["status"] != "skipped"
        }
        if set(computed) != listed:
            raise self._damaged(f"group {key}: its cells and per-image records differ")
        names = set()
        for (index, tm), cell in computed.items():
            name = f"correct/{number}/{index}/{tm}"
            names.add(name)
            correct = tensors.get(name)
            if correct is None or correct.dtype != torch.bool or correct.dim() != 2:
                raise self._damaged(f"group {key}: {name} is missing or not a per-image record")
            stated = (cell["robust_accuracy"], cell["n"], cell["draws"])
            actual = (accuracy_stats(correct)[0], int(correct.shape[1]), int(correct.shape[0]))
            if stated != actual:
                raise CheckpointError(
                    f"{self.path}: the cell {cell['defense']} / {tm} of {key} says robust "
                    f"accuracy {stated[0]} on {stated[1]} images x {stated[2]} draws, which "
                    f"contradicts its per-image record ({actual[0]} on {actual[1]} x "
                    f"{actual[2]}); the file was altered: pass --force instead of --resume to "
                    "start the evaluation over, or delete it"
                )
        return names

    def _restore_clean(
        self, meta: dict, tensors: dict[str, torch.Tensor], defenses: list[str]
    ) -> tuple[CleanRecord, set[str]]:
        """The saved clean scores, checked: one record per defense over the same images, each
        image once in order, a boolean correctness and a float64 MSE per draw and image."""
        if int(meta["defenses"]) != len(defenses):
            raise self._damaged(f"clean scores of {meta['defenses']} defenses, not {len(defenses)}")
        try:
            record = CleanRecord.from_tensors(tensors, meta, CLEAN_PREFIX)
        except KeyError as error:
            raise self._damaged(f"the clean scores lack the tensor {error}") from error
        for i, scores in enumerate(record.defenses):
            indices, correct, mse = scores.indices, scores.correct, scores.mse
            n = int(indices.numel())
            if (
                not torch.equal(indices, torch.arange(n))
                or correct.dtype != torch.bool
                or correct.dim() != 2
                or correct.shape[1] != n
                or mse.dtype != torch.float64
                or mse.shape != correct.shape
                or n != int(record.defenses[0].indices.numel())
            ):
                raise self._damaged(f"the clean scores of {defenses[i]} are not a per-image record")
        return record, set(record.named_tensors(CLEAN_PREFIX))

    def keys(self) -> list[str]:
        """The :func:`group_key` of every finished group."""
        return [group["key"] for group in self.groups]

    def finished(
        self, attack: str, eps: Any
    ) -> tuple[list[dict[str, Any]], dict[tuple[int, str], torch.Tensor], Any] | None:
        """``(cells, correctness by (defense index, threat model), detection row)`` of a
        finished group, or ``None``."""
        key = group_key(attack, eps)
        for number, group in enumerate(self.groups):
            if group["key"] == key:
                correct = {
                    (int(index), tm): self.correct[f"correct/{number}/{index}/{tm}"]
                    for index, tm in group["correct"]
                }
                return group["cells"], correct, group["detection"]
        return None

    def save_group(
        self,
        attack: str,
        eps: Any,
        cells: list[dict[str, Any]],
        correct: dict[tuple[int, str], torch.Tensor],
        detection: Any,
        grid: dict[str, Any],
        elapsed_s: float,
    ) -> None:
        """Record a finished group and rewrite the progress file (atomically); nothing to do
        without a report folder."""
        if self.path is None:
            return
        number = len(self.groups)
        self.groups.append(
            json.loads(
                json.dumps(
                    {
                        "key": group_key(attack, eps),
                        "cells": cells,
                        "correct": [[index, tm] for index, tm in correct],
                        "detection": detection,
                    },
                    default=str,
                )
            )
        )
        for (index, tm), tensor in correct.items():
            # clone: reused cells share one tensor, which safetensors will not write twice
            self.correct[f"correct/{number}/{index}/{tm}"] = tensor.clone()
        self._write(grid, elapsed_s)

    def save_clean(self, clean: CleanRecord, elapsed_s: float) -> None:
        """Record every image's clean scores (``clean``, in image order) and rewrite the
        progress file, so that a resume restores them instead of purifying the clean images
        again; nothing to do without a report folder."""
        self.clean = clean
        if self.path is not None:
            self._write(self.grid, elapsed_s)

    def _write(self, grid: dict[str, Any], elapsed_s: float) -> None:
        assert self.path is not None
        self.grid = grid
        tensors = dict(self.correct)
        # the picture's 8-bit levels, all it draws: a quarter of float32's bytes (an ImageNet
        # grid is 8 MB instead of 33), and the same picture after a resume
        for name in ("clean", "adversarial", "difference"):
            if name in grid:
                tensors[f"grid/{name}"] = to_pixels(grid[name])
        specs = list(grid.get("purified", {}))
        for i, spec in enumerate(specs):
            tensors[f"grid/purified/{i}"] = to_pixels(grid["purified"][spec])
        clean = None
        if self.clean is not None:
            clean_tensors, clean = self.clean.tensors(CLEAN_PREFIX)
            tensors.update(clean_tensors)
        metadata: dict[str, Any] = {
            "kind": PROGRESS_KIND,
            "fingerprint": self.fingerprint,
            "groups": self.groups,
            "grid_purified": specs,
            "clean": clean,
            "elapsed_s": elapsed_s,
            "environments": self.environments,
            "tensors_sha256": tensors_sha256(tensors),
        }
        metadata["metadata_sha256"] = _metadata_sha256(metadata)
        try:
            save_checkpoint(self.path, tensors, metadata)
        except OSError as error:
            # named by the progress file, not the temporary file it is written through
            raise OSError(error.errno, error.strerror or str(error), str(self.path)) from error

    def begin(self) -> None:
        """Write the file of a run that has none yet (its fingerprint, nothing finished): a run
        interrupted in its clean pass resumes, and a resume with other settings is refused."""
        if self.path is not None and not self.path.exists():
            self._write(self.grid, self.elapsed_s)

    def add_environments(self, environments: list[dict[str, Any]]) -> None:
        """Record the machines of this run's processes (written with the next save)."""
        self.environments = add_environments(self.environments, environments)

    def clear(self) -> None:
        """The report is written: the progress file is no longer needed."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def add_environments(
    known: list[dict[str, Any]], new: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``known`` followed by the environments of ``new`` it lacks (first seen first).

    Example:
        >>> add_environments([{"cpu": "a"}], [{"cpu": "b"}, {"cpu": "a"}])
        [{'cpu': 'a'}, {'cpu': 'b'}]
    """
    merged = list(known)
    for environment in new:
        if environment not in merged:
            merged.append(environment)
    return merged


def kernel_change(saved: list[dict[str, Any]], current: list[dict[str, Any]]) -> str | None:
    """A warning if a part of the run was computed with other kernels than this machine's
    (``None`` if not): a resume on another kind of machine goes on, but its numbers can differ
    slightly from those of a run on one machine.

    Example:
        >>> avx512 = {"torch": "2.13.0", "cpu_capability": "AVX512"}
        >>> kernel_change([avx512], [avx512]) is None
        True
        >>> kernel_change([avx512], [{**avx512, "cpu_capability": "AVX2"}])[:84]
        'parts of this evaluation were computed with other kernels (torch 2.13.0 cpu AVX512) '
    """

    def described(environment: dict[str, Any]) -> str:
        # an evaluation's environment names a GPU only when it computed on it
        computed = kernels(environment, on_cuda="cuda_device" in environment)
        return " ".join(x for x in (f"torch {environment.get('torch')}", computed) if x)

    here = {described(e) for e in current}
    other = sorted({described(e) for e in saved} - here)
    if not other:
        return None
    return (
        f"parts of this evaluation were computed with other kernels ({', '.join(other)}) than "
        f"this machine's ({', '.join(sorted(here))}): their numbers can differ slightly from a "
        'run on one machine; results.json lists every machine under "environments"'
    )


def _grid_images(saved: torch.Tensor) -> torch.Tensor:
    """A saved grid row as images in [0, 1]: 8-bit levels, or float from older files."""
    return saved.float() / 255 if saved.dtype == torch.uint8 else saved


def _metadata_sha256(metadata: dict[str, Any]) -> str:
    body = {k: v for k, v in metadata.items() if k not in _UNCHECKSUMMED}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _refusal(folder: Path, saved: Any, current: dict) -> str:
    """Why a resume is refused: the differing settings, and how the images changed."""
    settings = _differences(saved, current)
    images = _image_changes(saved.get("data") if isinstance(saved, dict) else None, current)
    if not images:
        return (
            f"{folder} holds an interrupted evaluation with other settings "
            f"(differing: {', '.join(settings) or 'format'}); rerun it with the same settings, "
            "or pass --force instead of --resume to start over"
        )
    also = f"; its settings differ too: {', '.join(settings)}" if settings else ""
    return (
        f"{folder} holds an interrupted evaluation of other images ({'; '.join(images)}{also}): "
        "a resumed report would mix results of old and new images; restore the images it "
        "started with, or pass --force instead of --resume to start over"
    )


def _differences(saved: Any, current: dict) -> list[str]:
    if not isinstance(saved, dict):
        return []
    names = []
    for part in ("config", "classifier", "checkpoints"):
        old, new = saved.get(part), current.get(part)
        if isinstance(old, dict) and isinstance(new, dict):
            names += [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            names.append(part)
    return list(dict.fromkeys(names))


def _image_changes(saved: Any, current: dict) -> list[str]:
    """How the images of each role (``test``, ...) differ from those the run started with."""
    new = current.get("data")
    if saved == new:
        return []
    if not isinstance(saved, dict) or not isinstance(new, dict):
        return ["the images are recorded differently (an older comdefend?)"]
    changes = []
    for role in sorted(set(saved) | set(new)):
        before, after = saved.get(role), new.get(role)
        if before == after:
            continue
        if not isinstance(before, dict) or not isinstance(after, dict):
            changes.append(f"{role} images: {'added' if before is None else 'none now'}")
        elif before.get("images") != after.get("images"):
            changes.append(
                f"{role} images: {after.get('images')} instead of {before.get('images')}"
            )
        elif before.get("image_shape") != after.get("image_shape"):
            changes.append(
                f"{role} images of size {after.get('image_shape')} instead of "
                f"{before.get('image_shape')}"
            )
        else:
            changed = [
                what
                for what in ("pixels", "labels")
                if before.get(f"{what}_sha256") != after.get(f"{what}_sha256")
            ]
            changes.append(f"{role} images' {' and '.join(changed) or 'identity'} changed")
    return changes


#: The folder (in the report folder) of the batches of the group in progress.
BATCHES_FOLDER = "progress-batches"
BATCH_KIND = "evaluation-batches"
#: The key of the clean pass's batches (a group's key is :func:`group_key`).
CLEAN_KEY = json.dumps(["clean"])

_Record = TypeVar("_Record", GroupRecord, CleanRecord)


def _step_name(key: str) -> str:
    """The file name prefix of a key's steps (letters, digits, ``.``, ``_`` and ``-``).

    Example:
        >>> _step_name(group_key("apgd-ce", 8.0)), _step_name(CLEAN_KEY)
        ('apgd-ce-8.0-batches-', 'clean-batches-')
    """
    text = "-".join(str(part) for part in json.loads(key))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) + "-batches-"


def fingerprint_sha256(fingerprint: dict[str, Any]) -> str:
    """A digest of a run's :func:`fingerprint` (its batch files carry it)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


class BatchProgress:
    """The finished batches of the clean pass or the (attack, eps) group in progress, one
    file per step.

    A group of a large run takes hours (C&W on 1,000 ImageNet images, EOT on CIFAR-10): each
    process saves what it finished of the group after every few batches, in
    ``BATCHES_FOLDER`` of the report folder, so an interruption loses at most one step. A
    resume takes a saved step only if the run's fingerprint (:func:`fingerprint_sha256`) and the
    group are the same and its batches are next in the resuming process's share, whatever the
    step size it was saved with (a GPU saves more batches per step than a CPU): every random
    choice is seeded per batch, so a restored step holds what computing it again would give.
    A damaged or foreign file is computed again, with a warning. Once the group is in the
    progress file its batch files are removed.

    Args:
        folder: the report folder, or ``None`` (nothing is saved).
        digest: :func:`fingerprint_sha256` of the run.
        resume: take the steps an interrupted run saved; without it they are never read.
    """

    def __init__(
        self,
        folder: str | Path | None,
        digest: str,
        resume: bool,
        environment: dict[str, Any] | None = None,
    ) -> None:
        self.folder = Path(folder) / BATCHES_FOLDER if folder is not None else None
        self.digest = digest
        self.resume = resume
        #: this process's machine, written into its steps
        self.environment = dict(environment or {})
        #: the machines of the steps read back
        self.environments: list[dict[str, Any]] = []
        #: batches taken from the folder so far
        self.restored_batches = 0
        #: how long the run had run when this process started (the report's elapsed time)
        self.base_elapsed_s = 0.0

    def _path(self, key: str, numbers: list[int]) -> Path:
        assert self.folder is not None
        return self.folder / f"{_step_name(key)}{numbers[0]}-{numbers[-1]}.safetensors"

    def starts(self, key: str) -> set[int]:
        """The first batch of every saved step of ``key``, whatever its length (none without
        ``resume``)."""
        if self.folder is None or not self.resume or not self.folder.is_dir():
            return set()
        prefix = _step_name(key)
        first = (
            p.name[len(prefix) :].split("-")[0] for p in self.folder.glob(f"{prefix}*.safetensors")
        )
        return {int(number) for number in first if number.isdigit()}

    def load_from(
        self, key: str, remaining: list[int], kind: type[_Record]
    ) -> tuple[_Record, list[int]] | None:
        """The longest saved step of ``key`` whose batches are the first of ``remaining``, and
        those batches; ``None`` if there is none. A step saved with another step size (on
        another device, or by another version) is taken as one of this run's own."""
        for end in range(len(remaining), 0, -1):
            numbers = remaining[:end]
            record = self.load(key, numbers, kind)  # None: no such step, or not this run's
            if record is not None:
                return record, numbers
        return None

    def load(self, key: str, numbers: list[int], kind: type[_Record]) -> _Record | None:
        """The saved record (a ``kind``) of the batches ``numbers`` of ``key``, or ``None``."""
        if self.folder is None or not self.resume:
            return None
        path = self._path(key, numbers)
        if not path.exists():
            return None
        try:
            data = path.read_bytes()
            meta = header_metadata(data)
            if meta.get("kind") != BATCH_KIND or meta.get("fingerprint_sha256") != self.digest:
                return None  # another run's (a resume with other settings is refused before)
            if meta.get("group") != key or json.loads(meta["batches"]) != numbers:
                return None
            record = kind.from_bytes(data)
            if tensors_sha256(record.tensors()[0]) != meta.get("tensors_sha256"):
                raise ValueError("its tensors do not match their checksum")
            computed_on = json.loads(meta.get("environment", "{}"))
        except (OSError, ValueError, KeyError, CheckpointError) as error:
            logger.warning("%s: damaged, its batches are computed again (%s)", path, error)
            return None
        self.restored_batches += len(numbers)
        if computed_on:
            self.environments = add_environments(self.environments, [computed_on])
        return record

    def save(
        self, key: str, numbers: list[int], record: GroupRecord | CleanRecord, elapsed_s: float
    ) -> None:
        """Save the record of the batches ``numbers`` of ``key`` (atomically)."""
        if self.folder is None:
            return
        tensors, _ = record.tensors()
        extra = {
            "kind": BATCH_KIND,
            "fingerprint_sha256": self.digest,
            "group": key,
            "batches": json.dumps(numbers),
            "elapsed_s": repr(float(elapsed_s)),
            "environment": json.dumps(self.environment, sort_keys=True),
            "tensors_sha256": tensors_sha256(tensors),
        }
        data = record.to_bytes(extra)
        atomic_write(self._path(key, numbers), lambda tmp: tmp.write_bytes(data))

    def elapsed_s(self) -> float:
        """The longest run time a saved step of this run records (0 without any)."""
        if self.folder is None or not self.resume or not self.folder.is_dir():
            return 0.0
        longest = 0.0
        for path in self.folder.glob("*.safetensors"):
            try:
                meta = header_metadata(path.read_bytes())
                if meta.get("fingerprint_sha256") == self.digest:
                    longest = max(longest, float(meta["elapsed_s"]))
            except (OSError, ValueError, KeyError):
                continue
        return longest

    def clear(self, key: str | None = None) -> None:
        """Remove the saved steps of group ``key`` (every group's: ``None``)."""
        if self.folder is None or not self.folder.is_dir():
            return
        prefix = _step_name(key) if key is not None else None
        for path in self.folder.glob("*.safetensors"):
            if prefix is None or path.name.startswith(prefix):
                path.unlink(missing_ok=True)
        if key is None or not any(self.folder.iterdir()):
            shutil.rmtree(self.folder, ignore_errors=True)
