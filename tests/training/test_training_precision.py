"""Training precision: settings, refusals, where autocast applies, exact resume per precision."""

from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comdefend.checkpoint import read_metadata
from comdefend.errors import UsageError
from comdefend.models import precision as precision_module
from comdefend.training import engine
from comdefend.training import trainer as trainer_module
from comdefend.training.engine import TrainingPrecision, precision_unavailable
from comdefend.training.recipes import resolve_config
from comdefend.training.stabilizers import Stabilization
from comdefend.training.trainer import (
    LEGACY_DEFAULTS,
    NoisyReconstruction,
    TrainConfig,
    build_model,
    train,
)
from support import load_module

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
needs_cpu_bf16 = pytest.mark.skipif(
    precision_unavailable("bf16", CPU) is not None,
    reason=f"this CPU cannot train in bf16: {precision_unavailable('bf16', CPU)}",
)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny runs only wait on a second one when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(cifar_dir: Path, out: Path, iterations: int, **kwargs) -> TrainConfig:
    """CIFAR-10 in 16x16 crops, batch 4, checkpoints every 2 iterations, 4 held-out images."""
    settings = dict(
        dataset="cifar10",
        data_dir=str(cifar_dir.parent),
        out=str(out),
        iterations=iterations,
        batch_size=4,
        patch_size=16,
        eval_every=2,
        eval_images=4,
        checkpoint_every=2,
        seed=1,
        device="cpu",
    )
    return TrainConfig(**{**settings, **kwargs})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- settings -----------------------------------------------------------------------------------
def test_precision_is_a_checked_setting_of_the_config_and_the_recipes() -> None:
    assert TrainConfig().precision == "fp32"
    assert TrainConfig(precision=" BF16 ").precision == "bf16"
    assert resolve_config("residual-study", out="x", precision="bf16").precision == "bf16"
    assert resolve_config("authors", out="x").to_dict()["precision"] == "fp32"
    assert LEGACY_DEFAULTS["precision"] == "fp32"  # runs from before the setting resume
    with pytest.raises(UsageError, match="precision must be one of fp32, bf16, fp16, tf32"):
        TrainConfig(precision="fp64")


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("precision", "reason"),
    [("tf32", "TF32 exists only on CUDA"), ("fp16", "float16 convolution backward")],
)
def test_precisions_the_cpu_cannot_run_are_refused_before_any_file(
    tmp_path: Path, precision: str, reason: str
) -> None:
    out = tmp_path / "run"
    with pytest.raises(
        UsageError, match=f"--precision {precision} is not available on cpu.*{reason}"
    ):
        train(TrainConfig(out=str(out), device="cpu", precision=precision), progress=False)
    assert not out.exists()


def test_bf16_is_refused_on_a_cpu_without_bf16_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision_module.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision_module, "_probe", lambda namespace, name: False)
    with pytest.raises(UsageError, match="bf16 is not available on cpu.*neither AVX512-BF16"):
        TrainingPrecision("bf16", CPU)


def test_cli_refuses_tf32_on_the_cpu(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from comdefend.cli import app

    out = tmp_path / "run"
    arguments = ["train", "--precision", "tf32", "--device", "cpu", "--out", str(out)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code != 0
    assert "tf32 is not available on cpu" in str(result.exception) + result.output
    assert not out.exists()


def test_cli_passes_the_precision_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from comdefend.cli import app

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, resume: bool = False) -> dict:
        seen.append(config)
        return {}

    monkeypatch.setattr(trainer_module, "train", fake_train)
    result = CliRunner().invoke(app, ["train", "--precision", "BF16", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [config.precision for config in seen] == ["bf16"]


# -- where the precision applies ------------------------------------------------------------------
def _autocast_seen(precision: str) -> tuple[dict[str, bool], tuple[torch.Tensor, ...]]:
    """Run one NoisyReconstruction pass; whether autocast was on inside encoder and decoder."""
    torch.manual_seed(0)
    model = build_model(TrainConfig(dataset="cifar10", preset="plain")).train()
    seen: dict[str, bool] = {}
    for name in ("encoder", "decoder"):
        getattr(model, name).register_forward_hook(
            lambda *_, name=name: seen.__setitem__(name, torch.is_autocast_enabled("cpu"))
        )
    module = NoisyReconstruction(model, Stabilization(), precision)
    x = torch.rand(2, 3, 16, 16)
    outputs = module(x, torch.Generator().manual_seed(3), 2, slice(0, 2))
    return seen, outputs


def test_fp32_takes_no_autocast_path_and_computes_what_it_always_did() -> None:
    seen, (reconstruction, code, logits) = _autocast_seen("fp32")
    assert seen == {"encoder": False, "decoder": False}
    # the pass as it was before precisions existed: the binarizer's own noisy sigmoid
    torch.manual_seed(0)
    model = build_model(TrainConfig(dataset="cifar10", preset="plain")).train()
    x = torch.rand(2, 3, 16, 16)
    expected_logits = model.code_logits(x)
    expected_code = model.binarizer(expected_logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits, expected_logits) and torch.equal(code, expected_code)
    assert torch.equal(reconstruction, model.decode(expected_code))
    numerics = TrainingPrecision("fp32", CPU)
    assert numerics.scaler is None and numerics.state() == {}
    assert isinstance(numerics.autocast(), nullcontext)
    assert isinstance(numerics.training_math(), nullcontext)
    assert isinstance(numerics.evaluation(), nullcontext)


def test_bf16_autocasts_the_networks_and_keeps_noise_code_and_loss_in_float32() -> None:
    seen, (reconstruction, code, logits) = _autocast_seen("bf16")
    assert seen == {"encoder": True, "decoder": True}
    assert reconstruction.dtype == code.dtype == logits.dtype == torch.float32
    fp32_reconstruction = _autocast_seen("fp32")[1][0]
    assert not torch.equal(reconstruction, fp32_reconstruction)  # it did compute in bf16


def test_cuda_fp32_turns_tf32_off_and_tf32_on_for_the_run_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flags themselves (settable without a GPU); a task without a precision (the
    classifier) leaves them alone."""
    monkeypatch.setattr(engine, "_cuda_lacks", lambda precision, device: None)
    cuda = torch.device("cuda")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    with TrainingPrecision("tf32", cuda).training_math():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        with TrainingPrecision("tf32", cuda).evaluation():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert conv.fp32_precision == "tf32"
    for precision in ("fp32", "bf16"):
        with TrainingPrecision(precision, cuda).training_math():
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert isinstance(TrainingPrecision(None, cuda).training_math(), nullcontext)
    assert (conv.fp32_precision, matmul.fp32_precision) == before


# -- runs ---------------------------------------------------------------------------------------
@needs_cpu_bf16
def test_bf16_resume_is_bit_identical_and_the_precision_is_recorded_and_fixed(
    cifar_dir: Path, tmp_path: Path
) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    summary = train(_tiny(cifar_dir, straight, 4, precision="bf16"), progress=False)
    train(_tiny(cifar_dir, resumed, 2, precision="bf16"), progress=False)
    train(_tiny(cifar_dir, resumed, 4, precision="bf16"), resume=True, progress=False)
    weights = _weights(straight)
    assert _same(weights, _weights(resumed))
    assert all(w.dtype == torch.float32 for w in weights.values())  # fp32 master weights
    checkpoint = read_metadata(resumed / "checkpoint.safetensors")
    assert checkpoint["train_config"]["precision"] == "bf16" and "grad_scaler" not in checkpoint
    assert summary["config"]["precision"] == "bf16"
    start = json.loads((straight / "log.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["config"]["precision"] == "bf16"
    weights_file = read_metadata(straight / "model.safetensors")
    assert weights_file["training"]["config"]["precision"] == "bf16"
    assert weights_file["config"]["precision"] == "fp32"  # purification's own setting
    with pytest.raises(UsageError, match=r"differ.*precision: 'bf16' -> 'fp32'"):
        train(_tiny(cifar_dir, resumed, 6), resume=True, progress=False)


def test_the_gradient_scaler_state_travels_in_the_checkpoint(
    cifar_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fp16 plumbing of the engine on the CPU (whose float16 convolutions are refused for
    their speed): a real gradient scaler, the forward pass left in float32."""
    monkeypatch.setattr(engine, "_cpu_lacks", lambda precision: None)
    monkeypatch.setattr(trainer_module, "autocast", lambda precision, device: nullcontext())
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    every = {"checkpoint_every": 1, "eval_images": 0, "precision": "fp16"}
    train(_tiny(cifar_dir, straight, 2, **every), progress=False)
    train(_tiny(cifar_dir, resumed, 1, **every), progress=False)
    scaler = read_metadata(resumed / "checkpoint.safetensors")["grad_scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 1
    train(_tiny(cifar_dir, resumed, 2, **every), resume=True, progress=False)
    assert read_metadata(resumed / "checkpoint.safetensors")["grad_scaler"]["_growth_tracker"] == 2
    assert _same(_weights(straight), _weights(resumed))


def test_the_gradient_scaler_skips_overflowing_steps_and_resumes_exactly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """float16 autocast on a linear layer (fast on CPUs): the first steps overflow at the
    initial scale and are skipped; a scaler restored from its JSON state continues exactly."""
    monkeypatch.setattr(engine, "_cpu_lacks", lambda precision: None)
    inputs = torch.randn(6, 8, 32, generator=torch.Generator().manual_seed(0)) * 100

    def run(steps: range, numerics: TrainingPrecision, layer: torch.nn.Linear, optimizer) -> None:
        for step in steps:
            with numerics.autocast():
                output = layer(inputs[step])
            loss = output.float().square().mean()
            optimizer.zero_grad(set_to_none=True)
            numerics.backward(loss)
            numerics.unscale(optimizer)
            numerics.step(optimizer)

    def fresh() -> tuple[torch.nn.Linear, torch.optim.Optimizer]:
        torch.manual_seed(0)
        layer = torch.nn.Linear(32, 4)
        return layer, torch.optim.Adam(layer.parameters(), lr=1e-2)

    layer, optimizer = fresh()
    straight = TrainingPrecision("fp16", CPU)
    run(range(6), straight, layer, optimizer)
    assert straight.state()["grad_scaler"]["scale"] < 65536.0  # overflowed steps were skipped

    first, first_optimizer = fresh()
    before = TrainingPrecision("fp16", CPU)
    run(range(3), before, first, first_optimizer)
    saved = json.loads(json.dumps(before.state()))  # as the checkpoint keeps it
    after = TrainingPrecision("fp16", CPU)
    after.load(saved)
    run(range(3, 6), after, first, first_optimizer)
    assert torch.equal(layer.weight, first.weight) and torch.equal(layer.bias, first.bias)
    assert after.state() == straight.state()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["tf32", "bf16", "fp16"])
def test_cuda_precisions_resume_bit_identically(
    cifar_dir: Path, tmp_path: Path, precision: str
) -> None:
    if precision_unavailable(precision, torch.device("cuda")) is not None:
        pytest.skip(str(precision_unavailable(precision, torch.device("cuda"))))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_tiny(cifar_dir, straight, 4, precision=precision, device="cuda"), progress=False)
    train(_tiny(cifar_dir, resumed, 2, precision=precision, device="cuda"), progress=False)
    train(
        _tiny(cifar_dir, resumed, 4, precision=precision, device="cuda"),
        resume=True,
        progress=False,
    )
    assert _same(_weights(straight), _weights(resumed))


# -- scripts ------------------------------------------------------------------------------------
def test_the_zoo_trainer_adds_the_precision_to_comdefend_commands_only() -> None:
    train_zoo = load_module(REPO / "scripts" / "train_zoo.py")
    purifier, _ = train_zoo.PLAN["comdefend-cifar10"]
    classifier, _ = train_zoo.PLAN["resnet20-cifar10"]
    assert train_zoo.with_precision(purifier, "bf16").endswith(" --precision bf16")
    assert train_zoo.with_precision(purifier, "fp32") == purifier  # recorded commands unchanged
    assert train_zoo.with_precision(classifier, "bf16") == classifier
