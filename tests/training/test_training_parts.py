"""The training engine's parts on tiny inputs: the best value and the collapse rule in both
directions, the logging window, the rollback stabilizer and the one rule of ``--resume``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from comdefend.errors import UsageError
from comdefend.evaluation.residual_study import _finished_run
from comdefend.training.classifier import ClassifierTrainConfig
from comdefend.training.engine import (
    COLLAPSE_MARGIN,
    BestTracker,
    LogWindow,
    Rollback,
    TrainingPrecision,
    is_collapse,
)
from comdefend.training.logs import first_collapse
from comdefend.training.run import differing_settings
from comdefend.training.stabilizers import MAX_ROLLBACKS
from comdefend.training.trainer import COLLAPSE_DB, LEGACY_DEFAULTS, TrainConfig


# -- the collapse rule and the best value ------------------------------------------------------
def test_one_collapse_margin() -> None:
    assert COLLAPSE_DB is COLLAPSE_MARGIN
    assert COLLAPSE_MARGIN == 6.0


@pytest.mark.parametrize(
    ("score", "best", "mode", "expected"),
    [
        (18.9, 25.0, "max", True),
        (19.0, 25.0, "max", False),  # exactly the margin below: not yet
        (30.0, 25.0, "max", False),
        (5.0, None, "max", False),  # nothing to fall from
        (0.31, 0.3, "min", False),
        (6.31, 0.3, "min", True),
        (-10.0, 0.3, "min", False),
    ],
)
def test_is_collapse_in_both_directions(
    score: float, best: float | None, mode: str, expected: bool
) -> None:
    assert is_collapse(score, best, mode) is expected


def test_the_log_reader_uses_the_engines_margin() -> None:
    psnr = {100: 20.0, 200: 25.0, 300: 19.0, 400: 18.9}
    assert first_collapse(psnr) == 400
    assert first_collapse(psnr, margin=5.5) == 300


def test_best_tracker_higher_is_better() -> None:
    best = BestTracker("heldout_psnr_db", "max")
    assert best.record() is None
    verdicts = [best.observe(s, i) for i, s in [(1, 20.0), (2, 25.0), (3, 25.0), (4, 18.0)]]
    assert verdicts == ["best", "best", None, "collapse"]
    assert best.record() == {"iteration": 2, "psnr_db": 25.0}  # an equal score is no new best


def test_best_tracker_lower_is_better() -> None:
    best = BestTracker("heldout_loss", "min", margin=1.0)
    verdicts = [best.observe(s, i) for i, s in [(1, 3.0), (2, 2.0), (3, 2.5), (4, 3.5), (5, 1.0)]]
    assert verdicts == ["best", "best", None, "collapse", "best"]
    assert best.record() == {"iteration": 5, "loss": 1.0}


def test_best_tracker_refuses_an_unknown_direction() -> None:
    with pytest.raises(UsageError, match="max, min"):
        BestTracker("heldout_psnr_db", "higher")


def test_best_tracker_continues_from_best_safetensors(tmp_path: Path) -> None:
    from comdefend.checkpoint import save_checkpoint

    path = tmp_path / "best.safetensors"
    best = BestTracker("heldout_psnr_db")
    best.load(path)  # no file yet: nothing
    assert best.record() is None
    training = {"iterations": 40, "metrics": {"psnr_db": 27.5, "bit_density": 0.5}}
    save_checkpoint(path, {"w": torch.zeros(1)}, {"kind": "comdefend", "training": training})
    best.load(path)
    assert best.record() == {"iteration": 40, "psnr_db": 27.5}
    assert best.observe(21.0, 50) == "collapse"


# -- the logging window ------------------------------------------------------------------------
def test_log_window_means_and_reset() -> None:
    window = LogWindow()
    window.add({"loss": 1.0, "mse": 0.5})
    window.add({"loss": 2.0, "mse": 1.5})
    window.add({"loss": 6.0, "mse": 1.0})
    assert window.count == 3
    assert list(window.flush().items()) == [
        ("loss", 3.0),
        ("mse", 1.0),
        ("iterations_averaged", 3),
    ]
    assert window.count == 0 and window.sums == {}
    window.add({"loss": 4.0})
    window.reset()
    window.add({"loss": 8.0})
    assert window.flush() == {"loss": 8.0, "iterations_averaged": 1}


def test_classifier_training_has_no_logging_window_of_its_own() -> None:
    from comdefend.training import classifier

    assert not hasattr(classifier, "LOG_EVERY")


# -- the rollback stabilizer -------------------------------------------------------------------
class _Parts:
    def __init__(self, factor: float | None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.records: list[dict[str, Any]] = []
        self.rollback = Rollback(
            factor,
            self.model,
            self.optimizer,
            TrainingPrecision(None, torch.device("cpu")),
            self.records.append,
            warn=False,
        )

    def train(self) -> None:
        self.optimizer.zero_grad()
        self.model(torch.ones(3, 2)).sum().backward()
        self.optimizer.step()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def test_rollback_off_does_nothing() -> None:
    parts = _Parts(None)
    assert not parts.rollback.active
    assert parts.rollback.after_iteration(2, evaluated=True, trouble=False) is None
    assert parts.rollback.after_iteration(4, evaluated=True, trouble=True) is None
    assert parts.rollback.healthy is None and parts.records == []
    assert parts.rollback.state() == {"lr_scale": 1.0, "rollbacks": 0}


def test_rollback_restores_the_last_healthy_evaluation() -> None:
    parts = _Parts(0.5)
    parts.train()
    # trouble before any healthy evaluation: nothing to go back to
    assert parts.rollback.after_iteration(1, evaluated=True, trouble=True) is None
    parts.train()
    assert parts.rollback.after_iteration(2, evaluated=True, trouble=False) is None
    healthy, adam = parts.weights(), parts.optimizer.state_dict()["state"][0]["exp_avg"].clone()
    parts.train()
    assert parts.rollback.after_iteration(3, evaluated=False, trouble=False) is None
    assert parts.rollback.healthy is not None and parts.rollback.healthy.iteration == 2
    parts.train()
    assert parts.rollback.after_iteration(4, evaluated=True, trouble=True) == 2
    assert all(torch.equal(a, b) for a, b in zip(parts.weights(), healthy, strict=True))
    assert torch.equal(parts.optimizer.state_dict()["state"][0]["exp_avg"], adam)
    assert parts.records == [
        {"event": "rollback", "iteration": 4, "to": 2, "lr_scale": 0.5, "rollbacks": 1}
    ]
    assert parts.rollback.state() == {"lr_scale": 0.5, "rollbacks": 1}


def test_rollback_stops_after_its_limit_and_resumes_its_state() -> None:
    parts = _Parts(0.5)
    parts.rollback.after_iteration(2, evaluated=True, trouble=False)
    for _ in range(MAX_ROLLBACKS):
        assert parts.rollback.after_iteration(4, evaluated=True, trouble=True) == 2
    assert parts.rollback.after_iteration(4, evaluated=True, trouble=True) is None
    assert parts.rollback.state() == {"lr_scale": 0.5**MAX_ROLLBACKS, "rollbacks": MAX_ROLLBACKS}
    resumed = _Parts(0.5).rollback
    resumed.load(parts.rollback.state())
    assert resumed.state() == parts.rollback.state()
    resumed.load({})  # a checkpoint from before the stabilizer
    assert resumed.state() == {"lr_scale": 1.0, "rollbacks": 0}


# -- the one rule of --resume ------------------------------------------------------------------
def test_differing_settings_ignores_what_may_change() -> None:
    saved = {"lr": 0.1, "threads": 1, "stabilize": {"rollback": 0.5}}
    current = {"lr": 0.2, "threads": 4, "stabilize": {}, "precision": "fp32"}
    assert differing_settings(saved, current, {"threads"}) == {
        "lr": (0.1, 0.2),
        "precision": (None, "fp32"),
    }
    legacy = {"precision": "fp32"}
    assert differing_settings(saved, current, {"threads", "lr"}, legacy) == {}


def test_each_config_declares_what_may_change_on_resume() -> None:
    assert {"out", "device", "threads", "checkpoint_every"} <= TrainConfig.RESUMABLE_CHANGES
    assert "lr" not in TrainConfig.RESUMABLE_CHANGES
    classifier = ClassifierTrainConfig(dataset="fashion-mnist")
    assert classifier.RESUMABLE_CHANGES == {
        "out",
        "threads",
        "device",
        "eval_images",
        "limit_test",
        "checkpoint_every",
    }
    recorded = classifier.resume_dict()  # what a classifier checkpoint records
    assert "out" in recorded and "threads" not in recorded and "lr" in recorded


def _finished(folder: Path, config: TrainConfig, iterations: int) -> Path:
    folder.mkdir(parents=True)
    summary = {"config": config.to_dict(), "iterations": iterations}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_a_study_reuses_finished_runs_by_the_resume_rule(tmp_path: Path) -> None:
    config = TrainConfig(dataset="fashion-mnist", out=str(tmp_path / "a"), iterations=20)
    run = _finished(tmp_path / "a", config, 20)
    moved = TrainConfig(**{**config.to_dict(), "out": "elsewhere", "threads": 3})
    assert _finished_run(run, moved)
    spaced = TrainConfig(**{**config.to_dict(), "eval_every": 7})  # the study measures snapshots
    with pytest.raises(UsageError, match="eval_every: 500 -> 7"):
        _finished_run(run, spaced)
    longer = TrainConfig(**{**config.to_dict(), "iterations": 30})
    assert not _finished_run(run, longer)  # a resume extends it
    shorter = TrainConfig(**{**config.to_dict(), "iterations": 10})
    with pytest.raises(UsageError, match="iterations: 20 -> 10"):
        _finished_run(run, shorter)
    other = TrainConfig(**{**config.to_dict(), "lr": 0.5})
    with pytest.raises(UsageError, match="other settings .lr: 0.001 -> 0.5"):
        _finished_run(run, other)
    older = {k: v for k, v in config.to_dict().items() if k not in LEGACY_DEFAULTS}
    (run / "summary.json").write_text(json.dumps({"config": older, "iterations": 20}))
    assert _finished_run(run, config)  # a run from before those settings existed


def test_the_collapse_warning_names_the_metric_and_its_direction(tmp_path: Path) -> None:
    from comdefend.training.trainer import PurifierTask

    task = PurifierTask(TrainConfig(dataset="fashion-mnist", out=str(tmp_path)))
    psnr = BestTracker("heldout_psnr_db")
    psnr.observe(20.0, 4)
    assert task.collapse_warning(12.0, 6, psnr, tmp_path / "best.safetensors") == (
        "held-out PSNR fell to 12.00 dB at iteration 6, from 20.00 dB at iteration 4: the run "
        f"is diverging; the best weights are kept in {tmp_path / 'best.safetensors'}"
    )
    task.monitor_label, task.monitor_unit = None, ""
    loss = BestTracker("heldout_loss", "min")
    loss.observe(0.25, 3)
    message = task.collapse_warning(7.5, 9, loss, tmp_path / "best.safetensors")
    assert message.startswith("held-out loss rose to 7.50 at iteration 9, from 0.25 at iteration 3")
