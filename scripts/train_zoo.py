"""Train every model of the pretrained zoo and register it, resumably, on CPU or CUDA.

    python scripts/train_zoo.py                     # all models, --device auto
    python scripts/train_zoo.py --only fashion-cnn  # one model
    python scripts/train_zoo.py --smoke             # a few iterations each, nothing registered
    python scripts/train_zoo.py --only NAME --finalize  # register an interrupted run as it is
    python scripts/train_zoo.py --precision bf16    # ComDefend models in bf16 autocast

Each model is one ``comdefend`` command (the exact command is stored in the registry); a run
folder that already holds a checkpoint is resumed, a finished one is skipped. After training,
``scripts/register_weights.py`` copies the weights into ``src/comdefend/zoo/weights/`` and
records the command, metrics and hardware. On a CUDA GPU the whole zoo takes minutes; on a
2-core CPU each ComDefend model takes hours.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from comdefend.checkpoint import read_metadata

REPO = Path(__file__).resolve().parents[1]
CIFAR = "--data-dir ../shared/data/cifar10"

# name -> (comdefend arguments, notes); the residual study's ComDefend schedule: 7,500 iterations of
# batch 20, Adam 1e-3, noise std 20, lambda 1e-4.
PLAN: dict[str, tuple[str, str]] = {
    "fashion-cnn": (
        "train-classifier --dataset fashion-mnist --arch fashion-cnn --epochs 8 "
        "--batch-size 128 --lr 0.05 --seed 0",
        "Fashion-MNIST classifier",
    ),
    "resnet20-cifar10": (
        f"train-classifier --dataset cifar10 --arch resnet20 --epochs 24 --batch-size 128 "
        f"--lr 0.1 --seed 0 {CIFAR}",
        "CIFAR-10 ResNet-20",
    ),
    "comdefend-fashion-mnist": (
        "train --dataset fashion-mnist --preset normal --iterations 7500 --batch-size 20 "
        "--lr 1e-3 --noise-std 20 --code-penalty 1e-4 --seed 0",
        "ComDefend (plain), 4-bit code",
    ),
    "comdefend-cifar10": (
        f"train --dataset cifar10 --preset normal --iterations 7500 --batch-size 20 --lr 1e-3 "
        f"--noise-std 20 --code-penalty 1e-4 --seed 0 {CIFAR}",
        "ComDefend (plain), 12-bit code",
    ),
    "comdefend-cifar10-1_on_off": (
        f"train --dataset cifar10 --preset 1_on_off --iterations 7500 --batch-size 20 "
        f"--lr 1e-3 --noise-std 20 --code-penalty 1e-4 --seed 0 {CIFAR}",
        "residual encoder (depth 1), plain decoder",
    ),
    "comdefend-cifar10-1_1": (
        f"train --dataset cifar10 --preset 1_1 --iterations 7500 --batch-size 20 --lr 1e-3 "
        f"--noise-std 20 --code-penalty 1e-4 --seed 0 {CIFAR}",
        "residual encoder and decoder (depth 1)",
    ),
}
SMOKE = {"--epochs": "1", "--iterations": "4", "--eval-images": "16"}
PRECISIONS = ("fp32", "bf16", "fp16", "tf32")


def with_precision(arguments: str, precision: str) -> str:
    """A ComDefend ``train`` command at ``precision`` (fp32, the default, adds nothing, so the
    recorded commands of fp32 models stay as they were; classifiers always train in fp32).

    Example:
        >>> with_precision("train --dataset cifar10", "bf16")
        'train --dataset cifar10 --precision bf16'
        >>> with_precision("train-classifier --arch resnet20", "bf16")
        'train-classifier --arch resnet20'
    """
    if precision == "fp32" or shlex.split(arguments)[0] != "train":
        return arguments
    return f"{arguments} --precision {precision}"


def hardware() -> str:
    if torch.cuda.is_available():
        return f"CUDA: {torch.cuda.get_device_name(0)}"
    return f"CPU: {platform.machine()}, {torch.get_num_threads()} torch threads"


def smoke_arguments(arguments: list[str]) -> list[str]:
    out = list(arguments)
    for flag, value in SMOKE.items():
        if flag in out:
            out[out.index(flag) + 1] = value
    if out[0] == "train":
        out += ["--eval-images", "16"]
    if out[0] == "train-classifier":
        out += ["--limit-train", "512", "--limit-test", "256", "--eval-images", "64"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated names; default: all")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "zoo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny runs, nothing registered")
    parser.add_argument(
        "--finalize",
        action="store_true",
        help="stop where the run's checkpoint is (after an interrupted, time-limited training) "
        "and register those weights, recording how many iterations they had",
    )
    parser.add_argument("--hardware", default=None, help="override the recorded hardware line")
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="training precision of the ComDefend models (comdefend train --precision); "
        "classifiers train in fp32. A run folder keeps the precision it started with.",
    )
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(PLAN)
    unknown = [name for name in names if name not in PLAN]
    if unknown:
        sys.exit(f"unknown zoo model(s) {unknown}; valid: {', '.join(PLAN)}")
    for name in names:
        arguments, notes = PLAN[name]
        arguments = with_precision(arguments, args.precision)
        argv = shlex.split(arguments)
        if args.smoke:
            argv = smoke_arguments(argv)
        out = args.runs / name
        command = ["comdefend", *argv, "--device", args.device, "--out", str(out)]
        planned = argv[argv.index("--iterations") + 1] if "--iterations" in argv else None
        if args.finalize and not (out / "summary.json").exists():
            # The constant learning rate makes the first N iterations of the full schedule
            # exactly the run with --iterations N: finish that run at its checkpoint.
            reached = int(read_metadata(out / "checkpoint.safetensors")["iteration"])
            arguments = arguments.replace(f"--iterations {planned}", f"--iterations {reached}")
            argv = shlex.split(arguments)
            command = ["comdefend", *argv, "--device", args.device, "--out", str(out), "--resume"]
            if reached < int(planned or reached):
                notes += (
                    f"; trained {reached} of the seed schedule's {planned} iterations (the CPU "
                    "time this session had), and with a constant learning rate these are exactly "
                    f"the weights at iteration {reached} of the full schedule; "
                    f"`--iterations {planned} --resume` on the run folder continues it"
                )
            print("$", shlex.join(command), flush=True)
            subprocess.run(command, check=True, cwd=REPO)
        elif (out / "summary.json").exists():
            print(f"{name}: finished run found in {out}, not retrained")
        else:
            if (out / "checkpoint.safetensors").exists():
                command.append("--resume")
            print("$", shlex.join(command), flush=True)
            subprocess.run(command, check=True, cwd=REPO)
        if args.smoke:
            continue
        recorded = f"comdefend {arguments} --out runs/zoo/{name}"
        # The seed recipe can diverge late (docs/notes/training-collapse.md): "auto" ships a
        # collapsed run's best evaluated weights and says so in the notes.
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "register_weights.py"),
                str(out),
                "--name",
                name,
                "--command",
                recorded,
                "--hardware",
                args.hardware or hardware(),
                "--notes",
                notes,
                "--weights",
                "auto",
            ],
            check=True,
            cwd=REPO,
        )


if __name__ == "__main__":
    main()
