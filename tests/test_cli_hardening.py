"""The command line under bad flags, dangerous output paths, interrupts and --quiet (issue 15).

Each case runs ``comdefend.cli.main`` in this process (fast: argument checks fail before any
model or dataset is loaded) and expects one ``error:`` line, no traceback, a non-zero exit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import typer

from comdefend import ComDefend, ComDefendConfig
from comdefend.cli import app
from comdefend.data import write_png
from support import run_cli as run


def assert_one_error_line(result: tuple[int, str, str], message: str, code: int = 2) -> None:
    exit_code, _, err = result
    assert exit_code == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], err


@pytest.fixture(scope="module")
def gray_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "gray.safetensors"
    torch.manual_seed(0)
    ComDefend(ComDefendConfig(image_channels=1)).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    for index in range(2):
        write_png(folder / f"img{index}.png", torch.rand(1, 8, 8))
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # `iterations or 7500` trained 7,500 iterations for --iterations 0
        (["train", "--iterations", "0"], "--iterations must be an integer >= 1, got 0"),
        (["train", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
        (["train", "--threads", "-1"], "--threads must be an integer >= 1, got -1"),
        (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["train", "--noise-std", "-1"], "--noise-std must be a finite number >= 0"),
        (["train", "--noise-std", "nan"], "--noise-std must be a finite number >= 0"),
        (["train", "--noise-std", "inf"], "--noise-std must be a finite number >= 0"),
        (["train", "--seed", str(2**67)], f"--seed must be an integer in 0..2**63-1, got {2**67}"),
        (["train", "--code-channels", "0"], "--code-channels must be an integer >= 1"),
        (["train", "--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["train", "--device", "tpu"], "unknown --device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        (["train-classifier", "--epochs", "0"], "--epochs must be an integer >= 1"),
        (["train-classifier", "--threads", "0"], "--threads must be an integer >= 1"),
        (["residual-study", "-c", "x", "--lr", "inf"], "--lr must be a finite number > 0"),
        (["residual-study", "-c", "x", "--threads", "0"], "--threads must be an integer >= 1"),
        (
            ["evaluate", "--dataset", "cifar10", "-c", "x", "--n", "0"],
            "--images must be an integer",
        ),
        (["evaluate", "--dataset", "cifar10", "-c", "x", "--seed", "-1"], "--seed must be"),
        (["evaluate", "--dataset", "cifar10", "-c", "x", "--device", "tpu"], "unknown --device"),
        (["demo", "--threads", "0"], "--threads must be an integer >= 1"),
        (["quickstart", "--iterations", "0"], "--iterations must be an integer >= 1"),
    ],
)
def test_bad_numbers_and_devices_are_usage_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], message: str
) -> None:
    result = run(capsys, *args, "--out", str(tmp_path / "out"))
    assert_one_error_line(result, message)
    assert not (tmp_path / "out").exists()


def test_reconstruct_and_purify_flags(
    capsys: pytest.CaptureFixture[str], gray_model: Path, images: Path, tmp_path: Path
) -> None:
    model = ["-m", str(gray_model)]
    assert_one_error_line(
        run(capsys, "reconstruct", *model, "--batch-size", "0"), "--batch-size must be"
    )
    assert_one_error_line(run(capsys, "reconstruct", *model, "--n", "-3"), "--images must be")
    out = ["-o", str(tmp_path / "out")]
    for flag, value in [("--noise-std", "-1"), ("--noise-std", "nan"), ("--seed", str(2**67))]:
        assert_one_error_line(run(capsys, "purify", str(images), *model, *out, flag, value), flag)
    assert_one_error_line(
        run(capsys, "purify", str(images), *model, *out, "--patch-size", "0"), "--patch-size"
    )


def test_cuda_without_cuda_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run(capsys, "train", "--device", "cuda", "--out", str(tmp_path / "r"))
    assert_one_error_line(result, "--device cuda requested but CUDA is not available")


def test_typer_parse_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert_one_error_line(run(capsys, "train", "--iterations", "abc", "-o", "x"), "--iterations")
    assert_one_error_line(run(capsys, "no-such-command"), "no-such-command")


def _commands(application: typer.Typer, prefix: str = "") -> list[tuple[str, object]]:
    found = [
        (prefix + (info.name or info.callback.__name__), info.callback)
        for info in application.registered_commands
    ]
    for group in application.registered_groups:
        found += _commands(group.typer_instance, f"{prefix}{group.name} ")
    return found


def test_every_numeric_option_is_checked() -> None:
    """Each int/float option of every command has a validator (or is checked in its body)."""
    import inspect
    import typing

    checked_in_body = {("presets", "channels")}
    unchecked = []
    for name, function in _commands(app):
        hints = typing.get_type_hints(function)
        for parameter in inspect.signature(function).parameters.values():
            option = parameter.default
            kinds = set(typing.get_args(hints[parameter.name])) or {hints[parameter.name]}
            if isinstance(option, typer.models.OptionInfo) and kinds & {int, float}:
                if option.callback is None and (name, parameter.name) not in checked_in_body:
                    unchecked.append(f"{name} --{parameter.name}")
    assert not unchecked, f"numeric options without a validator: {unchecked}"


# --- output paths ------------------------------------------------------------------------


def test_purify_never_writes_into_an_input_folder(
    capsys: pytest.CaptureFixture[str], gray_model: Path, images: Path
) -> None:
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    for extra in ([], ["--force"]):
        for source in (str(images), str(images / "img0.png")):
            result = run(capsys, "purify", source, "-m", str(gray_model), "-o", str(images), *extra)
            assert_one_error_line(result, "is the folder of the input")
    link = images.parent / "link"
    link.symlink_to(images)
    result = run(capsys, "purify", str(images), "-m", str(gray_model), "-o", str(link), "--force")
    assert_one_error_line(result, "is the folder of the input")
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_output_paths_that_are_files_or_folders(
    capsys: pytest.CaptureFixture[str], gray_model: Path, images: Path, tmp_path: Path
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    model = ["-m", str(gray_model)]
    assert_one_error_line(
        run(capsys, "purify", str(images), *model, "-o", str(a_file)), "is a file; give a folder"
    )
    assert_one_error_line(
        run(capsys, "purify", str(images), *model, "-o", str(a_file / "sub")), "is a file"
    )
    for command in (["train"], ["evaluate", "--dataset", "cifar10", "-c", "x"], ["demo"]):
        assert_one_error_line(run(capsys, *command, "-o", str(a_file)), "is a file")
    # import-official -o DIR --force used to end in IsADirectoryError
    folder = tmp_path / "folder"
    folder.mkdir()
    result = run(capsys, "import-official", "a.npy", "b.npy", "-o", str(folder), "--force")
    assert_one_error_line(result, "is a folder; give a file name such as")
    assert a_file.read_text() == "keep" and folder.is_dir()


def test_read_only_output_folder(
    capsys: pytest.CaptureFixture[str], gray_model: Path, images: Path, tmp_path: Path
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        probe = locked / "probe"
        try:
            probe.write_text("")
            probe.unlink()
            pytest.skip("permissions are not enforced here (root)")
        except PermissionError:
            pass
        result = run(capsys, "purify", str(images), "-m", str(gray_model), "-o", str(locked))
        assert_one_error_line(result, "cannot write in")
        assert_one_error_line(run(capsys, "train", "-o", str(locked / "run")), "cannot write in")
    finally:
        locked.chmod(0o755)


def test_a_write_that_fails_midway_is_one_error_line(
    capsys: pytest.CaptureFixture[str],
    gray_model: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder that turns read-only (or a full disk) while a command runs: no traceback."""
    from comdefend.data import images as images_module

    def refuse(path: object, *args: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images_module, "write_png", refuse)
    out = tmp_path / "out"
    result = run(capsys, "-q", "purify", str(images), "-m", str(gray_model), "-o", str(out))
    assert_one_error_line(result, f"{out / 'img0.png'}: Permission denied", code=1)


def test_demo_force_only_replaces_a_demo_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    keep = tmp_path / "mine" / "thesis.tex"
    keep.parent.mkdir()
    keep.write_text("years of work")
    result = run(capsys, "demo", "-o", str(keep.parent), "--force")
    assert_one_error_line(result, "holds files that are not a demo report (thesis.tex)")
    assert keep.read_text() == "years of work"


# --- interrupts --------------------------------------------------------------------------


def _interrupting(save: Path | None = None):  # noqa: ANN202
    def stop(*args: object, **kwargs: object) -> None:
        if save is not None:
            save.parent.mkdir(parents=True, exist_ok=True)
            save.write_bytes(b"")
        raise KeyboardInterrupt

    return stop


def test_interrupt_message_reaches_the_user(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The training engine's hint (what was saved, --resume) is printed, exit 130."""
    from comdefend.training import trainer

    def stop(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt("interrupted at iteration 7: saved; rerun with --resume")

    monkeypatch.setattr(trainer, "train", stop)
    code, _, err = run(capsys, "train", "--dataset", "fashion-mnist", "-o", str(tmp_path / "r"))
    assert code == 130 and "Traceback" not in err
    assert err.strip() == "interrupted at iteration 7: saved; rerun with --resume"


def test_interrupt_of_evaluate_and_of_a_plain_command(
    capsys: pytest.CaptureFixture[str],
    gray_model: Path,
    images: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from comdefend.evaluation import harness
    from comdefend.models import comdefend as comdefend_module

    out = tmp_path / "report"
    monkeypatch.setattr(harness, "evaluate", _interrupting(out / "progress.safetensors"))
    code, _, err = run(capsys, "evaluate", "--dataset", "cifar10", "-c", "x.pt", "-o", str(out))
    assert code == 130 and "every finished batch and (attack, eps) group is saved" in err

    monkeypatch.setattr(comdefend_module.ComDefend, "from_checkpoint", _interrupting())
    code, _, err = run(capsys, "purify", str(images), "-m", str(gray_model), "-o", str(out))
    assert code == 130 and err.strip() == "interrupted"


# --- --quiet -----------------------------------------------------------------------------


def test_quiet_hides_status_lines_and_progress(
    capsys: pytest.CaptureFixture[str], gray_model: Path, images: Path, tmp_path: Path
) -> None:
    code, out, err = run(
        capsys, "purify", str(images), "-m", str(gray_model), "-o", str(tmp_path / "a")
    )
    assert code == 0 and "wrote 2 image(s)" in out and "purify" in err  # the progress bar
    code, out, err = run(
        capsys, "--quiet", "purify", str(images), "-m", str(gray_model), "-o", str(tmp_path / "b")
    )
    assert code == 0 and out == "" and err == ""
    assert len(list((tmp_path / "b").iterdir())) == 2


def test_library_messages_go_through_logging(capsys: pytest.CaptureFixture[str]) -> None:
    from comdefend import console

    try:
        console.configure(quiet=False)
        console.logger.info("status line")
        console.logger.warning("something to know")
        console.configure(quiet=True)
        console.logger.info("hidden")
        console.logger.warning("still shown")
        assert console.progress_bar(range(2)).disable
    finally:
        console.reset()
    err = capsys.readouterr().err
    assert "status line" in err and "warning: something to know" in err
    assert "hidden" not in err and "warning: still shown" in err
    assert logging.getLogger("comdefend").propagate
