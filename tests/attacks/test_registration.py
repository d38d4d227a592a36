"""Attacks in the one registry: user registration, adapters for other libraries, the CLI by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from comdefend.attacks import (
    ATTACKS,
    FGSM,
    PGD,
    Attack,
    ZeroGradientError,
    adapt_attack,
    make_attack,
    register_attack,
)
from comdefend.errors import UsageError
from comdefend.registry import Registry


@pytest.fixture(autouse=True)
def _clean_registry() -> Iterator[None]:
    before = set(ATTACKS.names())
    yield
    for name in set(ATTACKS.names()) - before:
        ATTACKS.remove(name)


@pytest.fixture(scope="module")
def fashion() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The shipped Fashion-MNIST classifier and 8 embedded sample images."""
    from comdefend import load_dataset
    from comdefend.zoo import load_pretrained

    torch.set_num_threads(1)
    images = load_dataset("fashion-mnist", "sample")
    return load_pretrained("fashion-cnn").eval(), images.float_images()[:8], images.labels[:8]


def test_attacks_live_in_the_shared_registry() -> None:
    assert isinstance(ATTACKS, Registry)
    assert ATTACKS["PGD"] is PGD and ATTACKS.get("apgd-ce").name == "apgd-ce"
    with pytest.raises(UsageError, match="unknown attack 'carlini'; valid names: fgsm, bim"):
        make_attack("carlini", nn.Linear(2, 2))


def test_user_attack_by_name_with_alias() -> None:
    @register_attack("sign-noise", aliases=("sn",))
    class SignNoise(Attack):
        """Random signs of size eps (a gradient-free toy)."""

        def __init__(self, model: nn.Module, eps: float = 0.1, *, seed: int = 0) -> None:
            super().__init__(model, seed=seed)
            self.eps = eps

        def _attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            noise = torch.randint(0, 2, x.shape, generator=self._generator()) * 2 - 1
            return x + self.eps * noise.to(x)

    attack = make_attack("SN", nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), eps=0.05, seed=1)
    assert isinstance(attack, SignNoise) and attack.settings()["name"] == "sign-noise"
    x = torch.full((1, 1, 2, 2), 0.5)
    assert torch.allclose((attack(x, torch.tensor([0])) - x).abs(), torch.full_like(x, 0.05))
    with pytest.raises(UsageError, match="already registered"):
        register_attack("sign-noise", SignNoise)
    with pytest.raises(UsageError, match="subclass of comdefend.attacks.Attack"):
        register_attack("lambda", lambda model: model)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="calls itself 'fgsm'"):
        register_attack("not-fgsm", FGSM)


def test_adapted_attack_checks_budget_and_gradient() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.full((2, 1, 2, 2), 0.5), torch.tensor([0, 1])

    def too_far(model: nn.Module, eps: float, **kw: object):
        return lambda x, y: x + 2 * eps

    make_attack_cls = adapt_attack("too-far", too_far)
    with pytest.raises(UsageError, match="left its L-inf budget"):
        make_attack("too-far", model, eps=0.01)(x, y)
    assert make_attack_cls.norm == "linf"

    def flat(model: nn.Module, eps: float, **kw: object):
        return lambda x, y: x

    adapt_attack("flat", flat)
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    detached = nn.Sequential(_Detach(), frozen)
    with torch.no_grad():
        y = detached(x).argmax(1)
    with pytest.raises(ZeroGradientError):
        make_attack("flat", detached, eps=0.01)(x, y)


class _Detach(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


def test_torchattacks_pgd_by_name_matches_the_built_in(
    fashion: tuple[nn.Module, torch.Tensor, torch.Tensor],
) -> None:
    torchattacks = pytest.importorskip("torchattacks")
    classifier, x, y = fashion

    def build(model: nn.Module, eps: float, **kwargs: object):
        return torchattacks.PGD(model, eps=eps, **kwargs)

    adapt_attack("ta-pgd", build)
    settings = {"alpha": 2 / 255, "steps": 5, "random_start": False}
    theirs = make_attack("ta-pgd", classifier, eps=8 / 255, **settings)(x, y)
    ours = PGD(classifier, eps=8 / 255, **settings)(x, y)
    assert (theirs - x).abs().max() <= 8 / 255 + 1e-6
    # same signed steps; float rounding of the projection may move a pixel by one ulp
    assert torch.allclose(theirs, ours, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(classifier(theirs).argmax(1), classifier(ours).argmax(1))


def test_registered_attack_runs_in_comdefend_evaluate(
    fashion: tuple[nn.Module, torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from comdefend.cli import app

    class HalfFGSM(FGSM):
        def _run(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return FGSM._run(self, x, y) * 0 + x  # the user's attack: a no-op on purpose

    register_attack("noop-fgsm", HalfFGSM)
    out = tmp_path / "report"
    args = [
        "evaluate", "--dataset", "fashion-mnist", "--split", "sample", "--classifier",
        "fashion-cnn", "--defense", "none", "--attack", "noop-fgsm,fgsm", "--eps", "8",
        "--threat-model", "oblivious", "--n", "16", "--batch-size", "16", "--out", str(out),
        "--no-progress",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cells = json.loads((out / "results.json").read_text())["cells"]
    by_attack = {c["attack"]: c for c in cells if c["eps"] == 8.0}
    assert by_attack["noop-fgsm"]["robust_accuracy"] == by_attack["noop-fgsm"]["clean_accuracy"]
    assert by_attack["fgsm"]["robust_accuracy"] < by_attack["fgsm"]["clean_accuracy"]


PLUGIN = '''
import torch
from comdefend.attacks import FGSM


class GrayOut(FGSM):
    """Moves every pixel eps towards 0.5 (a gradient-free toy attack from a plugin)."""

    def _run(self, x, y):
        return x + self.eps * torch.sign(0.5 - x)
'''


@pytest.mark.slow
def test_installed_plugin_attack_runs_in_the_comdefend_command(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    (site / "grayout_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "grayout_plugin.py").write_text(PLUGIN)
    info = site / "grayout_plugin-0.1.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: grayout-plugin\nVersion: 0.1\n")
    entry_points = "[comdefend.attacks]\ngray-out = grayout_plugin:GrayOut\n"
    (info / "entry_points.txt").write_text(entry_points)
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(src)])}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "report"
    command = [
        sys.executable, "-m", "comdefend.cli", "evaluate", "--dataset", "fashion-mnist",
        "--split", "sample", "--classifier", "fashion-cnn", "--defense", "none",
        "--attack", "gray-out", "--eps", "16", "--threat-model", "oblivious", "--n", "8",
        "--batch-size", "8", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {c["attack"] for c in cells} == {"gray-out"}
    assert any(c["mean_linf"] > 15 / 255 for c in cells)


def test_evaluation_reads_a_registered_attacks_norm() -> None:
    """A registered L2 attack is minimum-norm in an evaluation grid (one group, no eps),
    like DeepFool and C&W; an L-inf one gets one group per eps."""
    from comdefend.evaluation.config import MIN_NORM, EvaluationConfig, is_min_norm
    from comdefend.evaluation.planning import eps_plan

    adapt_attack("my-l2", lambda model, eps, **kw: lambda x, y: x, norm="l2")
    adapt_attack("my-linf", lambda model, eps, **kw: lambda x, y: x)
    config = EvaluationConfig(dataset="cifar10", classifier="x", eps=[4.0, 8.0])
    assert is_min_norm("my-l2") and is_min_norm("cw") and not is_min_norm("my-linf")
    assert eps_plan(config, "my-l2") == [(MIN_NORM, None)]
    assert eps_plan(config, "my-linf") == [(4.0, 4.0 / 255), (8.0, 8.0 / 255)]
