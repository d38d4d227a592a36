"""The faster training paths: ``channels_last`` and ``compile`` as settings, on the command line,
in the training pass, across ``--resume`` and in the files a run writes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from small_runs import small_config

from comdefend.errors import UsageError
from comdefend.models.comdefend import ComDefend
from comdefend.training import trainer as trainer_module
from comdefend.training.recipes import resolve_config
from comdefend.training.stabilizers import Stabilization
from comdefend.training.trainer import (
    LEGACY_DEFAULTS,
    NoisyReconstruction,
    TrainConfig,
    build_model,
    compile_unavailable,
    train,
)

OPTIONS = ("channels_last", "compile")
needs_compile = pytest.mark.skipif(
    compile_unavailable() is not None, reason=f"torch.compile: {compile_unavailable()}"
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- settings -----------------------------------------------------------------------------------
def test_the_options_are_recorded_settings_that_a_resume_may_change() -> None:
    config = TrainConfig()
    assert (config.channels_last, config.compile) == (False, False)
    assert {"channels_last": False, "compile": False}.items() <= config.to_dict().items()
    assert set(OPTIONS) <= TrainConfig.RESUMABLE_CHANGES
    assert all(LEGACY_DEFAULTS[name] is False for name in OPTIONS)  # older runs: eager NCHW
    fast = resolve_config("authors", out="x", channels_last=True, compile=True)
    assert (fast.channels_last, fast.compile, fast.iterations) == (True, True, 2500)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("value", [1, "yes", None])
def test_the_options_take_true_or_false_only(name: str, value: Any) -> None:
    with pytest.raises(UsageError, match=f"{name} must be True or False"):
        TrainConfig(**{name: value})


def test_compile_is_refused_before_any_file_where_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "compile_unavailable", lambda: "no compiler found")
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="--compile is not available here: no compiler found"):
        train(small_config(out, 2, compile=True), progress=False)
    assert not out.exists()


# -- the command line ---------------------------------------------------------------------------
def _cli(arguments: list[str]) -> Any:
    from typer.testing import CliRunner

    from comdefend.cli import app

    return CliRunner().invoke(app, arguments)


def test_the_train_command_has_the_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    help_text = " ".join(_cli(["train", "--help"]).output.split())
    for flag in ("--channels-last", "--no-channels-last", "--compile", "--no-compile"):
        assert flag in help_text
    seen: list[TrainConfig] = []
    monkeypatch.setattr(
        trainer_module, "train", lambda config, resume=False: seen.append(config) or {}
    )
    out = ["--out", str(tmp_path / "run")]
    assert _cli(["train", *out]).exit_code == 0
    assert _cli(["train", "--channels-last", "--compile", *out]).exit_code == 0
    assert _cli(["train", "--no-channels-last", "--no-compile", *out]).exit_code == 0
    assert [(c.channels_last, c.compile) for c in seen] == [(False, False), (True, True)] + [
        (False, False)
    ]
    refused = _cli(["train", "--compile=yes", *out])
    assert refused.exit_code == 2 and "--compile" in refused.output


def test_the_cli_refuses_compile_where_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_module, "compile_unavailable", lambda: "no compiler found")
    out = tmp_path / "run"
    result = _cli(["train", "--compile", "--dataset", "fashion-mnist", "--out", str(out)])
    assert result.exit_code != 0
    assert "--compile is not available here" in str(result.exception) + result.output
    assert not out.exists()


# -- the training pass --------------------------------------------------------------------------
def test_channels_last_feeds_nhwc_batches_and_computes_the_same_pass() -> None:
    torch.manual_seed(0)
    model = build_model(TrainConfig(dataset="cifar10")).train()
    x = torch.rand(2, 3, 16, 16)
    plain = NoisyReconstruction(model, Stabilization())(
        x, torch.Generator().manual_seed(3), 2, slice(0, 2)
    )
    seen: list[bool] = []
    for network in (model.encoder, model.decoder):
        network.register_forward_hook(
            lambda module, inputs, output: seen.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last)
            )
        )
    model.to(memory_format=torch.channels_last)
    nhwc = NoisyReconstruction(model, Stabilization(), channels_last=True)
    outputs = nhwc(x, torch.Generator().manual_seed(3), 2, slice(0, 2))
    assert seen == [True, True]
    for a, b in zip(plain, outputs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # the same arithmetic


# -- runs ---------------------------------------------------------------------------------------
def _files(run: Path) -> list[Path]:
    """Every weights file a run writes: checkpoint, model, best and snapshots."""
    return sorted(run.glob("*.safetensors")) + sorted(run.glob("snapshots/*.safetensors"))


def _resume_and_load(tmp_path: Path, **options: bool) -> None:
    """Straight and paused-then-resumed runs with ``options`` end bit-identical; every file they
    write has the plain model's keys in the usual layout, and the final weights load into a
    plain ComDefend that computes what the trained model computes."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kept: dict[str, torch.Tensor] = {}

    def keep(iteration: int, model: ComDefend) -> dict[str, Any]:
        kept.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        kept["output"] = model.reconstruct(images)[0]
        return {}

    images = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    settings = {"snapshot_every": 2, **options}
    summary = trainer_module.train(
        small_config(straight, 4, **settings), progress=False, on_evaluation=keep
    )
    train(small_config(resumed, 4, **settings), progress=False, pause_at=2)
    train(small_config(resumed, 4, **settings), resume=True, progress=False)
    weights = load_file(straight / "model.safetensors")
    assert weights.keys() == load_file(resumed / "model.safetensors").keys()
    assert all(
        torch.equal(v, load_file(resumed / "model.safetensors")[k]) for k, v in weights.items()
    )
    assert {k: summary["config"][k] for k in options} == options
    start = json.loads((straight / "log.jsonl").read_text().splitlines()[0])
    assert {k: start["config"][k] for k in options} == options

    plain_keys = set(build_model(small_config(straight, 4)).state_dict())
    for file in _files(straight) + _files(resumed):
        tensors = load_file(file)
        names = {k.removeprefix("model.") for k in tensors if not k.startswith("optimizer.")}
        assert not any("_orig_mod" in k for k in tensors), file
        assert plain_keys <= names, file
        assert all(t.is_contiguous() for t in tensors.values()), file
    loaded = ComDefend.from_checkpoint(straight / "model.safetensors")
    assert all(torch.equal(v, kept[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(loaded.reconstruct(images)[0], kept["output"], rtol=0, atol=1e-6)


def test_channels_last_resumes_bit_identically_and_saves_plain_checkpoints(
    fashion_dir: Path, tmp_path: Path
) -> None:
    _resume_and_load(tmp_path, channels_last=True)


def test_a_resume_may_switch_the_options(fashion_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(small_config(run, 4), progress=False, pause_at=2)
    summary = train(small_config(run, 4, channels_last=True), resume=True, progress=False)
    assert summary["iterations"] == 4 and summary["config"]["channels_last"] is True
    assert summary["first_iteration_seconds_this_session"] > 0


@pytest.mark.slow
@needs_compile
def test_compile_resumes_bit_identically_and_saves_plain_checkpoints(
    fashion_dir: Path, tmp_path: Path
) -> None:
    _resume_and_load(tmp_path, compile=True)
