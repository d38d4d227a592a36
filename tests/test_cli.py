"""The CLI end to end on real Fashion-MNIST slices, and its error handling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comdefend import ComDefend, ComDefendConfig
from comdefend.data import load_dataset, write_png


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "comdefend.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def gray_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "gray.safetensors"
    torch.manual_seed(0)
    ComDefend(ComDefendConfig(image_channels=1)).save(path)
    return path


@pytest.fixture(scope="module")
def fashion_pngs(fashion_dir: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pngs")
    images = load_dataset("fashion-mnist", "test").head(3).float_images()
    for index, image in enumerate(images):
        write_png(folder / f"img{index}.png", image)
    return folder


def test_presets_json() -> None:
    result = run_cli("presets", "--json")
    assert result.returncode == 0
    rows = json.loads(result.stdout)
    assert {row["study_name"] for row in rows} >= {"normal", "1_on_off", "3_3"}
    assert all(row["encoder_macs_per_pixel"] > 0 for row in rows)


@pytest.mark.slow
def test_train_reconstruct_purify_end_to_end(fashion_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "fm"
    result = run_cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--preset",
        "normal",
        "--iterations",
        "4",
        "--batch-size",
        "8",
        "--eval-every",
        "2",
        "--eval-images",
        "16",
        "--out",
        str(run),
    )
    assert result.returncode == 0, result.stderr
    model = run / "model.safetensors"
    assert model.exists() and (run / "summary.json").exists()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("heldout_psnr_db" in record for record in log)

    result = run_cli(
        "reconstruct", "--model", str(model), "--dataset", "fashion-mnist", "--n", "20", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 20 and report["bits_per_pixel"] == 4
    assert report["compression_ratio"] == 2.0

    images = tmp_path / "in"
    data = load_dataset("fashion-mnist", "test").head(2).float_images()
    for index, image in enumerate(data):
        write_png(images / f"{index}.png", image)
    result = run_cli("purify", str(images), "--model", str(model), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]


def test_purify_precision_option(gray_checkpoint: Path, fashion_pngs: Path, tmp_path: Path) -> None:
    from comdefend.models.precision import cpu_bf16_missing

    native_bf16 = cpu_bf16_missing() is None
    out = {name: tmp_path / name for name in ("fp32", "bf16")}
    for name, folder in out.items():
        result = run_cli(
            "purify", str(fashion_pngs), "-m", str(gray_checkpoint), "-o", str(folder),
            "--precision", name,
        )  # fmt: skip
        if name == "bf16" and not native_bf16:  # emulated: refused, nothing written
            assert result.returncode == 2, result.stderr
            assert "bf16 needs a CPU with AVX512-BF16 or AMX" in result.stderr
            assert "Traceback" not in result.stderr and not folder.exists()
            continue
        assert result.returncode == 0, result.stderr
    if native_bf16:
        assert sorted(p.name for p in out["bf16"].iterdir()) == sorted(
            p.name for p in out["fp32"].iterdir()
        )
    for bad, message in (("fp16", "--precision must be one of fp32, tf32, bf16"),
                         ("tf32", "tf32 needs a CUDA GPU")):  # fmt: skip
        result = run_cli(
            "purify", str(fashion_pngs), "-m", str(gray_checkpoint), "-o", str(tmp_path / bad),
            "--precision", bad,
        )  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / bad).exists()


def test_purify_never_overwrites_without_force(
    gray_checkpoint: Path, fashion_pngs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert (
        run_cli(
            "purify", str(fashion_pngs), "--model", str(gray_checkpoint), "--out", str(out)
        ).returncode
        == 0
    )
    before = (out / "img0.png").read_bytes()
    result = run_cli(
        "purify",
        str(fashion_pngs),
        "--model",
        str(gray_checkpoint),
        "--out",
        str(out),
        "--noise-std",
        "3",
    )
    assert_clean_failure(result, "--force")
    assert (out / "img0.png").read_bytes() == before
    result = run_cli(
        "purify",
        str(fashion_pngs),
        "--model",
        str(gray_checkpoint),
        "--out",
        str(out),
        "--noise-std",
        "3",
        "--force",
    )
    assert result.returncode == 0


def test_purify_rejects_rgb_for_gray_model(gray_checkpoint: Path, tmp_path: Path) -> None:
    write_png(tmp_path / "rgb.png", torch.rand(3, 8, 8))
    result = run_cli(
        "purify",
        str(tmp_path / "rgb.png"),
        "--model",
        str(gray_checkpoint),
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_failure(result, "is RGB but the model is grayscale")
    assert not (tmp_path / "o").exists()


def test_purify_rejects_truncated_image(gray_checkpoint: Path, tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", torch.rand(1, 16, 16))
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])
    result = run_cli(
        "purify",
        str(tmp_path / "a.png"),
        "--model",
        str(gray_checkpoint),
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_failure(result, "cannot read image")


def test_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "model.pt")
    write_png(tmp_path / "a.png", torch.rand(1, 8, 8))
    result = run_cli(
        "purify",
        str(tmp_path / "a.png"),
        "--model",
        str(tmp_path / "model.pt"),
        "--out",
        str(tmp_path / "o"),
    )
    assert_clean_failure(result, "never unpickles")


def test_import_official_cli(official_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "official.safetensors"
    result = run_cli(
        "import-official",
        str(official_dir / "enc_mnist.npy"),
        str(official_dir / "dec_mnist.npy"),
        "-o",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "grayscale, 4 bits/pixel" in result.stdout
    result = run_cli(
        "import-official",
        str(official_dir / "enc_mnist.npy"),
        str(official_dir / "dec_mnist.npy"),
        "-o",
        str(out),
    )
    assert_clean_failure(result, "--force")
    result = run_cli(
        "import-official",
        str(official_dir / "dev.csv"),
        str(official_dir / "dec_mnist.npy"),
        "-o",
        str(tmp_path / "x.safetensors"),
    )
    assert_clean_failure(result, "error:")


def test_bad_arguments_exit_nonzero(tmp_path: Path) -> None:
    assert_clean_failure(
        run_cli("train", "--preset", "nope", "--out", str(tmp_path / "r")), "unknown preset"
    )
    assert_clean_failure(
        run_cli(
            "train",
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path),
            "--iterations",
            "1",
            "--out",
            str(tmp_path / "r"),
        ),
        "not found",
    )
    assert_clean_failure(
        run_cli("reconstruct", "--model", str(tmp_path / "none.safetensors")), "not found"
    )


def _train_in_process(out: Path, iterations: int, eval_every: int) -> object:
    """``comdefend train`` on Fashion-MNIST through typer's runner, in this process, so that a
    test's monkeypatches of the trainer apply."""
    from typer.testing import CliRunner

    from comdefend.cli import app

    arguments = ["train", "--dataset", "fashion-mnist", "--iterations", str(iterations)]
    options = ["--batch-size", "8", "--eval-every", str(eval_every), "--eval-images", "16"]
    result = CliRunner().invoke(app, [*arguments, *options, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return result


def test_train_says_where_a_collapsed_runs_best_weights_are(
    fashion_dir: Path, tmp_path: Path, scripted_psnrs
) -> None:
    scripted_psnrs(20.0, 25.0, 12.0, 11.0)
    out = tmp_path / "run"
    result = _train_in_process(out, 6, 2)
    assert "done: 6 iterations, held-out PSNR 11.00 dB" in result.stdout
    best = out / "best.safetensors"
    assert (
        f"best held-out PSNR 25.00 dB at iteration 4: {best} (the run collapsed: use these "
        "weights)" in result.stdout
    )


def test_train_says_when_a_dead_run_stopped_early(
    fashion_dir: Path, tmp_path: Path, dead_model
) -> None:
    result = _train_in_process(tmp_path / "run", 50, 10)
    assert "done: 3 iterations" in result.stdout
    assert "stopped early at iteration 3 of 50: every gradient was exactly zero" in result.stdout
