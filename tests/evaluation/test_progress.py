"""The evaluation progress file: checksums, consistency with its per-image tensors, and the
data part of the resume fingerprint (what the images are, not where they lie)."""

from __future__ import annotations

import errno
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comdefend.checkpoint import METADATA_KEY
from comdefend.data.datasets import ImageSet
from comdefend.data.images import to_pixels
from comdefend.errors import CheckpointError, UsageError
from comdefend.evaluation.progress import PROGRESS_FILE, EvaluationProgress, fingerprint
from comdefend.evaluation.scoring import accuracy_stats

DEFENSES = ["none", "bits:4"]


def _images(value: int = 7, label: int = 3) -> ImageSet:
    images = torch.full((4, 3, 8, 8), value, dtype=torch.uint8)
    labels = torch.tensor([label, 1, 2, 0])
    return ImageSet("imagenet", "test", images, labels, [], "/somewhere/labels.csv")


def _fingerprint(data: ImageSet | None = None) -> dict:
    config = {"dataset": "imagenet", "defenses": DEFENSES, "n": 4, "data_dir": "/a", "out": "o"}
    return fingerprint(config, {}, {"test": (data or _images()).identity()})


def _cell(defense: str, correct: torch.Tensor) -> dict:
    return {
        "attack": "fgsm",
        "eps": 4.0,
        "defense": defense,
        "threat_model": "oblivious",
        "status": "ok",
        "robust_accuracy": accuracy_stats(correct)[0],
        "n": int(correct.shape[1]),
        "draws": int(correct.shape[0]),
    }


def _save(folder: Path, cells_edit: dict | None = None) -> Path:
    progress = EvaluationProgress(folder, _fingerprint(), resume=False)
    correct = {
        (0, "oblivious"): torch.tensor([[True, False, True, True]]),
        (1, "oblivious"): torch.tensor([[True, True, False, False]]),
    }
    cells = [_cell(DEFENSES[index], tensor) for (index, _), tensor in correct.items()]
    cells[1].update(cells_edit or {})
    grid = {"clean": torch.rand(2, 3, 8, 8), "purified": {"bits:4": torch.rand(2, 3, 8, 8)}}
    progress.save_group("fgsm", 4.0, cells, correct, None, grid, 1.5)
    return folder / PROGRESS_FILE


def _header(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def _rewrite_metadata(path: Path, edit) -> None:
    """Rewrite the file with the same tensors and an edited comdefend metadata (checksums
    kept as they were)."""
    _, header = _header(path)
    metadata = json.loads(header["__metadata__"][METADATA_KEY])
    edit(metadata)
    save_file(load_file(path), path, metadata={METADATA_KEY: json.dumps(metadata)})


def _refused(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as error:
        EvaluationProgress(path.parent, _fingerprint(), resume=True)
    message = str(error.value)
    assert str(path) in message and "--force" in message and "delete" in message
    assert "import-official" not in message and "\n" not in message
    return message


def test_a_saved_group_reads_back(tmp_path: Path) -> None:
    _save(tmp_path)
    progress = EvaluationProgress(tmp_path, _fingerprint(), resume=True)
    assert progress.restored == 1 and progress.elapsed_s == 1.5
    finished = progress.finished("fgsm", 4.0)
    assert finished is not None
    cells, correct, _ = finished
    assert [c["defense"] for c in cells] == DEFENSES
    assert correct[(1, "oblivious")].tolist() == [[True, True, False, False]]
    assert set(progress.grid) == {"clean", "purified"}


def test_the_grid_is_saved_as_the_8_bit_levels_it_draws(tmp_path: Path) -> None:
    torch.manual_seed(0)
    images = torch.rand(2, 3, 8, 8)
    progress = EvaluationProgress(tmp_path, _fingerprint(), resume=False)
    progress.save_group("fgsm", 4.0, [], {}, None, {"clean": images}, 1.0)
    stored = load_file(tmp_path / PROGRESS_FILE)["grid/clean"]
    assert stored.dtype == torch.uint8 and torch.equal(stored, to_pixels(images))
    restored = EvaluationProgress(tmp_path, _fingerprint(), resume=True).grid["clean"]
    assert restored.dtype == torch.float32 and restored.min() >= 0 and restored.max() <= 1
    assert torch.equal(to_pixels(restored), to_pixels(images))  # the same picture
    # saved again after a resume: the same levels, not rounded twice
    again = EvaluationProgress(tmp_path, _fingerprint(), resume=True)
    again.save_group("fgsm", 8.0, [], {}, None, again.grid, 2.0)
    assert torch.equal(load_file(tmp_path / PROGRESS_FILE)["grid/clean"], stored)


def test_a_grid_saved_in_float_by_an_older_version_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import comdefend.evaluation.progress as module

    images = torch.rand(2, 3, 8, 8)
    monkeypatch.setattr(module, "to_pixels", lambda x: x.clone())  # the older writer
    EvaluationProgress(tmp_path, _fingerprint(), resume=False).save_group(
        "fgsm", 4.0, [], {}, None, {"clean": images}, 1.0
    )
    assert load_file(tmp_path / PROGRESS_FILE)["grid/clean"].dtype == torch.float32
    restored = EvaluationProgress(tmp_path, _fingerprint(), resume=True).grid["clean"]
    assert torch.equal(restored, images)


def test_a_flipped_byte_in_a_tensor_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path)
    length, header = _header(path)
    start, _ = header["correct/0/1/oblivious"]["data_offsets"]
    raw = bytearray(path.read_bytes())
    raw[8 + length + start] ^= 1  # True -> False in the second defense's first image
    path.write_bytes(bytes(raw))
    _refused(path, "checksum")
    raw[-1] ^= 0x40  # and one in the grid's pixels
    raw[8 + length + start] ^= 1
    path.write_bytes(bytes(raw))
    _refused(path, "checksum")


def test_an_edited_value_in_the_metadata_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path)

    def more_robust(metadata: dict) -> None:
        metadata["groups"][0]["cells"][1]["robust_accuracy"] = 1.0

    _rewrite_metadata(path, more_robust)
    _refused(path, "checksum")
    path = _save(tmp_path)
    _rewrite_metadata(path, lambda metadata: metadata.update(elapsed_s=0.0))
    _refused(path, "checksum")


def test_a_cell_contradicting_its_per_image_tensor_is_refused(tmp_path: Path) -> None:
    """Checksums made over wrong numbers (an edit with fresh checksums, a bug) are caught by
    the consistency checks."""
    path = _save(tmp_path, {"robust_accuracy": 1.0})
    message = _refused(path, "contradict")
    assert "bits:4" in message and "0.5" in message
    _save(tmp_path, {"n": 5})
    _refused(path, "contradict")


def test_unreadable_progress_files_say_force_or_delete(tmp_path: Path) -> None:
    path = _save(tmp_path)
    path.write_bytes(path.read_bytes()[:-40])  # truncated
    _refused(path, "damaged")
    path.write_bytes(b"\x80\x04 a pickle, or anything else")
    _refused(path, "damaged")
    _save(tmp_path)
    _rewrite_metadata(path, lambda metadata: metadata.pop("tensors_sha256"))  # older format
    _refused(path, "checksum")


def test_the_fingerprint_holds_the_images_not_their_folder(tmp_path: Path) -> None:
    _save(tmp_path)
    moved = _images()
    moved.source = "/elsewhere/labels.csv"
    other_dir = fingerprint(
        {"dataset": "imagenet", "defenses": DEFENSES, "n": 4, "data_dir": "/b", "out": "p"},
        {},
        {"test": moved.identity()},
    )
    assert other_dir == _fingerprint()
    assert EvaluationProgress(tmp_path, other_dir, resume=True).restored == 1
    for changed, what in [(_images(value=8), "pixels"), (_images(label=4), "labels")]:
        with pytest.raises(UsageError, match=rf"test images' {what} changed") as error:
            EvaluationProgress(tmp_path, _fingerprint(changed), resume=True)
        assert "--force" in str(error.value)
    fewer = _images().head(3)
    with pytest.raises(UsageError, match="test images: 3 instead of 4"):
        EvaluationProgress(tmp_path, _fingerprint(fewer), resume=True)


def test_shipped_models_resume_wherever_the_package_lies(tmp_path: Path) -> None:
    # progress files written before shipped models were named zoo:NAME held their package path
    config = {"dataset": "imagenet", "defenses": DEFENSES, "n": 4}
    data = {"test": _images().identity()}
    old_path = "/old/venv/site-packages/comdefend/zoo/weights/m.safetensors"
    progress = EvaluationProgress(tmp_path, fingerprint(config, {old_path: "ab"}, data), False)
    progress.save_group("fgsm", 4.0, [], {}, None, {}, 1.0)
    resumed = EvaluationProgress(tmp_path, fingerprint(config, {"zoo:m": "ab"}, data), True)
    assert resumed.restored == 1
    with pytest.raises(UsageError, match="differing: zoo:m"):
        EvaluationProgress(tmp_path, fingerprint(config, {"zoo:m": "cd"}, data), True)


def test_a_run_goes_on_on_another_device_and_keeps_its_identity(tmp_path: Path) -> None:
    from comdefend.evaluation.progress import fingerprint_sha256

    # older versions put the device into the fingerprint: such a run started on a CPU
    today = _fingerprint()
    started = {**today, "config": {**today["config"], "device": "cpu"}}
    EvaluationProgress(tmp_path, started, resume=False).save_group(
        "fgsm", 4.0, [], {}, None, {}, 1.0
    )
    config = {"dataset": "imagenet", "defenses": DEFENSES, "n": 4, "device": "cuda"}
    on_a_gpu = fingerprint(config, {}, {"test": _images().identity()})
    assert on_a_gpu == today  # the device says where the numbers are computed, not what
    resumed = EvaluationProgress(tmp_path, on_a_gpu, resume=True)
    assert resumed.restored == 1
    # the run keeps the fingerprint it started with: the batches it saved are still its own
    assert fingerprint_sha256(resumed.fingerprint) == fingerprint_sha256(started)
    resumed.save_group("fgsm", 8.0, [], {}, None, {}, 2.0)
    again = EvaluationProgress(tmp_path, today, resume=True)
    assert again.restored == 2 and again.fingerprint == started
    # what is computed still has to match
    with pytest.raises(UsageError, match="differing: n"):
        EvaluationProgress(
            tmp_path, fingerprint({**config, "n": 5}, {}, {"test": _images().identity()}), True
        )


def test_the_progress_file_is_named_when_it_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while writing: the error names the progress file, not the temporary file
    it is written through (which is gone by the time the user reads the message)."""
    import comdefend.checkpoint

    def disk_full(tensors: object, filename: str, metadata: object = None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(comdefend.checkpoint, "save_file", disk_full)
    progress = EvaluationProgress(tmp_path, _fingerprint(), resume=False)
    with pytest.raises(OSError, match="No space left") as error:
        progress.save_group("fgsm", 4.0, [], {}, None, {}, 1.0)
    assert error.value.filename == str(tmp_path / PROGRESS_FILE)
    assert error.value.errno == errno.ENOSPC and "comdefend-tmp" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_the_clean_scores_read_back_and_a_malformed_record_is_refused(tmp_path: Path) -> None:
    from comdefend.evaluation.records import CleanRecord, DefenseScores

    def record(correct: torch.Tensor) -> CleanRecord:
        indices = torch.arange(4)
        scores = DefenseScores(indices, correct, torch.rand(1, 4, dtype=torch.float64))
        return CleanRecord([scores, scores], {"squeeze": torch.rand(4)})

    path = _save(tmp_path)
    progress = EvaluationProgress(tmp_path, _fingerprint(), resume=True)
    assert progress.clean is None  # saved groups only, as older versions wrote them
    clean = record(torch.tensor([[True, False, True, True]]))
    progress.save_clean(clean, 2.0)
    restored = EvaluationProgress(tmp_path, _fingerprint(), resume=True)
    assert restored.clean is not None and restored.restored == 1
    for saved, original in zip(restored.clean.defenses, clean.defenses, strict=True):
        assert torch.equal(saved.correct, original.correct) and torch.equal(saved.mse, original.mse)
    assert torch.equal(restored.clean.detector_scores["squeeze"], clean.detector_scores["squeeze"])
    part = restored.clean.subset(torch.tensor([3, 1]))
    assert part.defenses[0].correct.tolist() == [[True, False]]
    assert part.defenses[0].indices.tolist() == [3, 1]

    restored.save_clean(record(torch.ones(1, 4)), 3.0)  # float, not a per-image boolean record
    _refused(path, "clean scores of none are not a per-image record")


def _step_record(batches, numbers: list[int], correct: bool = True):  # noqa: ANN001, ANN202
    from comdefend.evaluation.records import CellRecord, DefenseScores, GroupRecord

    positions = batches.indices(numbers)
    n = len(positions)
    scores = DefenseScores(
        positions,
        torch.full((1, n), correct, dtype=torch.bool),
        positions.double().unsqueeze(0),
    )
    zeros = torch.zeros(n, dtype=torch.float64)
    cell = CellRecord(0, "oblivious", scores, zeros, zeros, "classifier", {"steps": 3}, 1.0)
    return GroupRecord("fgsm", 8.0, [cell], positions)


def test_saved_steps_serve_any_split_of_the_batches_and_only_their_run(tmp_path: Path) -> None:
    """Steps are keyed by their batch numbers: a resume with another number of processes takes
    the ones it computes; another run's (another fingerprint) and other groups are not taken."""
    from comdefend.evaluation.harness import _in_steps, _Shard
    from comdefend.evaluation.progress import (
        BATCHES_FOLDER,
        BatchProgress,
        fingerprint_sha256,
        group_key,
    )
    from comdefend.evaluation.records import GroupRecord
    from comdefend.evaluation.seeding import Batches

    batches = Batches(10, 3)  # batches 0-3, the last of one image
    x = torch.rand(10, 1, 2, 2)
    computed: list[list[int]] = []

    def compute(part: _Shard):  # noqa: ANN202
        assert torch.equal(part.x, x[part.positions])
        computed.append(part.numbers)
        return _step_record(batches, part.numbers)

    def shard(numbers: list[int]) -> _Shard:
        positions = batches.indices(numbers)
        return _Shard(batches, numbers, positions, x[positions])

    key = group_key("fgsm", 8.0)
    digest = fingerprint_sha256(_fingerprint())
    store = BatchProgress(tmp_path, digest, resume=True, environment={"cpu_capability": "AVX2"})
    whole = _in_steps(store, compute, shard([0, 1, 2, 3]), key, 1, lambda: 12.5, GroupRecord)
    assert computed == [[0], [1], [2], [3]]
    assert torch.equal(whole.indices, torch.arange(10))
    assert torch.equal(whole.cells[0].scores.mse[0], torch.arange(10).double())
    assert len(list((tmp_path / BATCHES_FOLDER).iterdir())) == 4

    computed.clear()  # the second of two processes: its batches are read back
    second = _in_steps(store, compute, shard([2, 3]), key, 1, lambda: 13.0, GroupRecord)
    assert computed == [] and store.restored_batches == 2
    assert store.environments == [{"cpu_capability": "AVX2"}]  # the machine of those steps
    assert torch.equal(second.indices, torch.arange(6, 10))
    assert second.cells[0].attack_settings == {"steps": 3}
    # another group, another run, or no --resume: computed again
    _in_steps(store, compute, shard([0]), group_key("fgsm", 16.0), 1, lambda: 0.0, GroupRecord)
    _in_steps(
        BatchProgress(tmp_path, "other", True), compute, shard([1]), key, 1, float, GroupRecord
    )
    _in_steps(
        BatchProgress(tmp_path, digest, False), compute, shard([3]), key, 1, float, GroupRecord
    )
    assert computed == [[0], [1], [3]]
    # the longest time a step of this run records
    assert store.elapsed_s() == 12.5
    assert BatchProgress(tmp_path, "other", resume=True).elapsed_s() == 0.0
    assert len(list((tmp_path / BATCHES_FOLDER).iterdir())) == 4 + 1
    store.clear(group_key("fgsm", 16.0))
    assert len(list((tmp_path / BATCHES_FOLDER).iterdir())) == 4
    store.clear(key)
    assert not (tmp_path / BATCHES_FOLDER).exists()


def test_saved_steps_serve_any_step_size(tmp_path: Path) -> None:
    """A GPU saves more batches per step than a CPU: a resume with another step size takes the
    saved steps as they are and computes only the batches none of them holds."""
    from comdefend.evaluation.harness import _in_steps, _Shard
    from comdefend.evaluation.progress import BATCHES_FOLDER, BatchProgress, group_key
    from comdefend.evaluation.records import GroupRecord
    from comdefend.evaluation.seeding import Batches

    batches = Batches(12, 2)  # batches 0-5
    x = torch.rand(12, 1, 2, 2)
    computed: list[list[int]] = []

    def compute(part: _Shard):  # noqa: ANN202
        computed.append(part.numbers)
        return _step_record(batches, part.numbers)

    def steps(folder: Path, size: int) -> GroupRecord:
        numbers = list(range(6))
        positions = batches.indices(numbers)
        store = BatchProgress(folder, "run", resume=True)
        shard = _Shard(batches, numbers, positions, x[positions])
        return _in_steps(store, compute, shard, group_key("fgsm", 8.0), size, float, GroupRecord)

    whole = steps(tmp_path / "whole", 6)
    computed.clear()
    # saved by steps of 1 (a CPU), resumed by steps of 4 (a GPU): nothing computed again
    steps(tmp_path / "small", 1)
    assert computed == [[0], [1], [2], [3], [4], [5]]
    computed.clear()
    resumed = steps(tmp_path / "small", 4)
    assert computed == []
    assert torch.equal(resumed.indices, whole.indices)
    assert torch.equal(resumed.cells[0].scores.mse, whole.cells[0].scores.mse)
    # steps of 4 saved, resumed by steps of 1: the step of four is taken whole
    steps(tmp_path / "large", 4)
    computed.clear()
    steps(tmp_path / "large", 1)
    assert computed == []
    # only batch 2 saved: steps of 4 compute 0-1, take 2, compute 3-5
    partial = tmp_path / "partial" / BATCHES_FOLDER
    partial.mkdir(parents=True)
    (name,) = [p.name for p in (tmp_path / "small" / BATCHES_FOLDER).iterdir() if "-2-2." in p.name]
    shutil.copy(tmp_path / "small" / BATCHES_FOLDER / name, partial / name)
    computed.clear()
    mixed = steps(tmp_path / "partial", 4)
    assert computed == [[0, 1], [3, 4, 5]]
    assert torch.equal(mixed.cells[0].scores.mse, whole.cells[0].scores.mse)
