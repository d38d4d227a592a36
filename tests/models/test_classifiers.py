"""Classifier architectures, their registry, and classifier checkpoints."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from comdefend.checkpoint import read_metadata, save_checkpoint
from comdefend.errors import CheckpointError, InputError, UsageError
from comdefend.models.classifiers import (
    CLASSIFIERS,
    DATASET_NORMALIZATION,
    ClassifierConfig,
    FashionCNN,
    ResNet20,
    build_classifier,
    check_dataset_fits,
    count_parameters,
    list_classifiers,
    load_classifier,
    load_torchvision_classifier,
    save_classifier,
)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_every_registered_classifier_gives_logits(name: str) -> None:
    spec = CLASSIFIERS[name]
    torch.manual_seed(0)
    model = build_classifier(name).eval()
    x = torch.rand(2, spec.in_channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()
    assert model.config is not None and model.config.arch == name


def test_num_classes_and_channel_check() -> None:
    model = build_classifier("resnet20", num_classes=100, dataset="cifar100").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 100)
    with pytest.raises(InputError, match="3 channel"):
        model(torch.rand(1, 1, 32, 32))
    with pytest.raises(InputError):
        model(torch.rand(3, 32, 32))


def test_resnet20_has_the_papers_parameter_count() -> None:
    # He et al. 2016, Table 6: 0.27M for ResNet-20 with parameter-free shortcuts.
    assert count_parameters(ResNet20()) == 269_722
    rows = {row["name"]: row for row in list_classifiers()}
    assert rows["resnet20"]["parameters"] == 269_722
    assert rows["fashion-cnn"]["input_channels"] == 1


def test_normalization_lives_inside_the_model() -> None:
    torch.manual_seed(0)
    model = FashionCNN().eval()
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.2860])
    assert model.normalize.std.flatten().tolist() == pytest.approx([0.3530])
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = model.classify((x - 0.2860) / 0.3530)
        assert torch.allclose(model(x), expected, atol=1e-6)
    cifar = build_classifier("resnet20")
    mean, std = DATASET_NORMALIZATION["cifar10"]
    assert cifar.normalize.mean.flatten().tolist() == pytest.approx(list(mean))
    assert cifar.normalize.std.flatten().tolist() == pytest.approx(list(std))
    custom = build_classifier("resnet20", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert custom.config is not None and custom.config.mean == (0.5, 0.5, 0.5)


def test_unknown_arch_and_mismatched_dataset_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="resnet20"):
        build_classifier("resnet1000")
    with pytest.raises(UsageError, match="3-channel"):
        check_dataset_fits("resnet20", "fashion-mnist")
    with pytest.raises(UsageError, match="1-channel"):
        check_dataset_fits("fashion-cnn", "cifar10")
    check_dataset_fits("resnet20", "cifar100")
    with pytest.raises(UsageError, match="normalization"):
        ClassifierConfig(arch="resnet20", dataset="svhn")


def test_config_survives_json() -> None:
    config = ClassifierConfig(arch="fashion-cnn", dataset="fashion-mnist")
    again = ClassifierConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(CheckpointError, match="unknown"):
        ClassifierConfig.from_dict({**config.to_dict(), "depth": 3})


def test_save_load_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet20")
    model.train()
    with torch.no_grad():  # move the BatchNorm running statistics away from their defaults
        model(torch.rand(8, 3, 32, 32))
    model.eval()
    path = tmp_path / "r20.safetensors"
    save_classifier(model, path, extra={"metrics": {"test_accuracy": 0.5}})
    loaded = load_classifier(path)
    assert not loaded.training
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded.config == model.config
    assert loaded.checkpoint_metadata is not None
    assert loaded.checkpoint_metadata["metrics"] == {"test_accuracy": 0.5}
    assert read_metadata(path)["kind"] == "classifier"


def test_loading_other_checkpoints_fails_clearly(tmp_path: Path) -> None:
    purifier = tmp_path / "purifier.safetensors"
    save_checkpoint(purifier, {"w": torch.zeros(2)}, {"kind": "purifier", "config": {}})
    with pytest.raises(CheckpointError, match="purifier"):
        load_classifier(purifier)

    # Weights of one architecture under the config of another.
    resnet = build_classifier("resnet20")
    wrong = tmp_path / "wrong.safetensors"
    config = ClassifierConfig(arch="fashion-cnn", dataset="fashion-mnist")
    save_classifier(resnet, wrong, config=config)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(wrong)

    pickled = tmp_path / "model.pt"
    torch.save(resnet.state_dict(), pickled)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_classifier(pickled)
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")


def test_torchvision_classifier_errors_are_clear(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes 'import torchvision' fail
    with pytest.raises(UsageError, match="torchvision"):
        load_torchvision_classifier("resnet101", weights_path=tmp_path / "resnet101.pth")


def _fake_torchvision() -> types.ModuleType:
    """A stand-in for torchvision whose 'resnet101' is a tiny network (no torchvision needed)."""

    def resnet101(weights: object = None, num_classes: int = 1000) -> torch.nn.Module:
        assert weights is None  # we never let torchvision download
        return torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, num_classes)
        )

    module = types.ModuleType("torchvision")
    module.models = types.SimpleNamespace(resnet101=resnet101)  # type: ignore[attr-defined]
    return module


def test_torchvision_classifier_uses_local_weights_only(monkeypatch, tmp_path: Path) -> None:
    fake = _fake_torchvision()
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="never downloads"):
        load_torchvision_classifier("resnet101")
    with pytest.raises(CheckpointError, match="not found"):
        load_torchvision_classifier("resnet101", weights_path=tmp_path / "missing.pth")
    with pytest.raises(UsageError, match="unknown torchvision"):
        load_torchvision_classifier("alexnet9000", weights_path=tmp_path / "missing.pth")

    torch.manual_seed(0)
    network = fake.models.resnet101()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    weights = tmp_path / "hub" / "checkpoints" / "resnet101-abc.pth"
    torch.save(network.state_dict(), weights)
    model = load_torchvision_classifier("resnet101")  # found in the hub cache
    assert model.config is not None and model.config.arch == "torchvision:resnet101"
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), network((x - mean) / std), atol=1e-6)

    bad = tmp_path / "bad.pth"
    torch.save({"0.weight": torch.zeros(1)}, bad)
    with pytest.raises(CheckpointError, match="do not fit torchvision resnet101: missing"):
        load_torchvision_classifier("resnet101", weights_path=bad)


def test_one_check_for_loaded_classifiers_and_architectures() -> None:
    from comdefend.models.classifiers import check_classifier_fits

    fashion = build_classifier("fashion-cnn", dataset="fashion-mnist")
    with pytest.raises(UsageError, match="trained on fashion-mnist, not cifar10"):
        check_classifier_fits(fashion, "cifar10", label="f.safetensors")
    hundred = build_classifier("resnet20", 100, dataset="cifar100")
    with pytest.raises(UsageError, match="100 classes but cifar10 has 10"):
        hundred.config.dataset = "cifar10"  # a checkpoint whose config disagrees with itself
        check_classifier_fits(hundred, "cifar10")
    with pytest.raises(UsageError, match="28x28 images but cifar100 images are 32x32"):
        # a 3-channel variant of the fixed-size head would still not fit 32x32 images
        CLASSIFIERS.add(
            "fashion-rgb",
            CLASSIFIERS["fashion-cnn"].__class__(
                "fashion-rgb", CLASSIFIERS["fashion-cnn"].builder, 3, 28, "cifar10", "", True
            ),
        )
        try:
            check_classifier_fits("fashion-rgb", "cifar100")
        finally:
            CLASSIFIERS.remove("fashion-rgb")
    assert check_classifier_fits("RESNET20", "cifar100").num_classes == 100
