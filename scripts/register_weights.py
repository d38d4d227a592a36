"""Copy a finished run's weights into the package zoo and record their provenance.

    python scripts/register_weights.py runs/classifier-fashion-cnn --name fashion-cnn \
        --command "comdefend train-classifier ..." --hardware "2-core x86_64 CPU"

Reads the run's ``summary.json`` (config, metrics, environment), copies ``model.safetensors`` to
``src/comdefend/zoo/weights/NAME.safetensors`` and writes the entry into ``registry.json``
(replacing an entry of the same name). A run whose summary says it collapsed is refused unless
``--weights best`` registers its ``best.safetensors`` (the best held-out evaluation) instead;
``--weights auto`` takes the final weights, or the best ones of a collapsed run and says so in
the entry's notes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from comdefend.checkpoint import atomic_write_text, read_metadata, sha256_of
from comdefend.zoo import REGISTRY_FILE, ZOO_FOLDER, measure_on_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the exact command that trained it")
    parser.add_argument("--hardware", required=True)
    parser.add_argument("--notes", default="")
    parser.add_argument(
        "--weights",
        choices=("final", "best", "auto"),
        default="final",
        help="register the run's final model.safetensors (default), its best.safetensors, or "
        "(auto) the final weights unless the run collapsed, then the best ones",
    )
    args = parser.parse_args()

    summary_path = args.run / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"error: {summary_path} not found: the run has not finished")
    summary = json.loads(summary_path.read_text())
    if summary.get("collapsed"):
        best = summary["best"]
        what = (
            f"collapsed (final held-out PSNR {summary['heldout']['psnr_db']:.2f} dB, best "
            f"{best['psnr_db']:.2f} dB at iteration {best['iteration']})"
        )
        if args.weights == "final":
            raise SystemExit(
                f"error: {args.run} {what}; register its best weights with --weights best "
                "(or auto), or retrain"
            )
        if args.weights == "auto":
            args.weights = "best"
            args.notes += f"; the run {what}: these are its best evaluated weights"
            print(f"{args.name}: the run {what}, registering best.safetensors", flush=True)
    elif args.weights == "auto":
        args.weights = "final"
    source = args.run / ("best.safetensors" if args.weights == "best" else "model.safetensors")
    metadata = read_metadata(source)
    kind = metadata["kind"]
    config = summary["config"]
    iterations = int(summary.get("iterations", 0))
    if kind == "purifier":
        architecture = metadata["config"]["preset"]
        heldout = summary.get("heldout", {})
        if args.weights == "best":
            training = metadata["training"]
            heldout, iterations = training["metrics"], int(training["iterations"])
        metrics = {f"heldout_{k}": v for k, v in heldout.items()}
        metrics["heldout_images"] = config.get("eval_images")
    else:
        architecture = config["arch"]
        metrics = {k: v for k, v in summary.items() if "accuracy" in k}
    target = ZOO_FOLDER / "weights" / f"{args.name}.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    entry = {
        "name": args.name,
        "file": target.name,
        "sha256": sha256_of(target),
        "kind": kind,
        "dataset": config["dataset"],
        "architecture": architecture,
        "command": args.command,
        "metrics": metrics,
        "hardware": args.hardware,
        "iterations": iterations,
        "license": "MIT",
        "notes": args.notes,
        "extra": {"torch": summary.get("env", {}).get("torch"), "seed": config.get("seed")},
    }
    write_entry(entry)
    # What the shipped file gives on the embedded sample, so tests can check it stays so.
    entry["metrics"].update(measure_on_sample(args.name))
    write_entry(entry)
    print(json.dumps(entry, indent=2))


def write_entry(entry: dict) -> None:
    entries = json.loads(REGISTRY_FILE.read_text()) if REGISTRY_FILE.is_file() else []
    names = [e["name"] for e in entries]
    # Re-registering a name replaces its entry where it stands, so `zoo list` keeps its order.
    if entry["name"] in names:
        entries[names.index(entry["name"])] = entry
    else:
        entries.append(entry)
    atomic_write_text(REGISTRY_FILE, json.dumps(entries, indent=2) + "\n")


if __name__ == "__main__":
    main()
