"""What purifying in bf16 instead of fp32 changes: speed, code bits, PSNR and robust accuracy.

On the first N CIFAR-10 test images (and PGD L-inf adversarial examples crafted once, in fp32,
against the classifier alone: the paper's oblivious setting), one purifier is run at each
precision. Reported per precision: purification throughput (timed passes alternating between
precisions in one run, median), the fraction of code bits that differ from fp32's, the PSNR of
its reconstruction against fp32's and against the clean images, and the classifier's accuracy
on purified clean and purified adversarial images. Run:

    python benchmarks/precision.py --images 500 --threads 2

``--model`` takes any purifier (zoo name or file, e.g. the imported authors' model), ``tf32`` is
added on a CUDA device. docs/PERFORMANCE.md ("Precision") holds the numbers from this script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch

from comdefend import ComDefend, load_dataset
from comdefend.attacks import PGD
from comdefend.metrics import mean_psnr
from comdefend.models.precision import Precision, cpu_bf16_missing, precision_context
from comdefend.zoo import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=500, help="first N CIFAR-10 test images")
    parser.add_argument("--model", default="zoo:comdefend-cifar10")
    parser.add_argument("--classifier", default="resnet20-cifar10")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--eps", type=float, default=8.0, help="PGD budget in units of 1/255")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per precision")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", dest="json_out", default=None, help="also write results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and (missing := cpu_bf16_missing()) is not None:
        # emulated bfloat16 would measure the emulation (hundreds of times slower), not bf16
        sys.exit(f"bf16 needs a CPU with AVX512-BF16 or AMX ({missing}): nothing to compare")

    model = ComDefend.from_checkpoint(args.model, map_location=device).eval()
    model.requires_grad_(False)
    classifier = load_pretrained(args.classifier).to(device).eval().requires_grad_(False)
    data = load_dataset("cifar10", "test", args.data_dir).head(args.images)
    x, y = data.float_images().to(device), data.labels.long().to(device)
    start = time.perf_counter()
    x_adv = torch.cat(
        [
            PGD(classifier, eps=args.eps / 255)(xb, yb)
            for xb, yb in zip(x.split(100), y.split(100), strict=True)
        ]
    )
    print(f"PGD {args.eps:g}/255 on {len(x)} images: {time.perf_counter() - start:.0f} s")

    precisions: list[Precision] = ["fp32", "bf16"]
    if device.type == "cuda":
        precisions.append("tf32")

    def run(precision: Precision, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, codes = [], []
        model.config.precision = precision
        with torch.inference_mode(), precision_context(precision, device):
            for batch in images.split(args.batch_size):
                reconstruction, code = model.reconstruct(batch)
                outputs.append(reconstruction.float())
                codes.append(code.float())
        return torch.cat(outputs), torch.cat(codes)

    def accuracy(images: torch.Tensor) -> float:
        with torch.inference_mode():
            predictions = torch.cat([classifier(b).argmax(1) for b in images.split(500)])
        return float((predictions == y).float().mean())

    seconds: dict[str, list[float]] = {p: [] for p in precisions}
    run("fp32", x[:8]), run("bf16", x[:8])  # warm-up
    for _ in range(args.repeats):
        for precision in precisions:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model.config.precision = precision
            with torch.inference_mode():
                model.purify(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[precision].append(time.perf_counter() - start)

    reference, reference_code = run("fp32", x)
    reference_adv, _ = run("fp32", x_adv)
    rows: list[dict[str, Any]] = []
    for precision in precisions:
        purified, code = run(precision, x)
        purified_adv, _ = run(precision, x_adv)
        row = {
            "precision": precision,
            "images_per_second": len(x) / statistics.median(seconds[precision]),
            "code_bits_differing_from_fp32": float((code != reference_code).float().mean()),
            "psnr_vs_fp32_db": mean_psnr(purified, reference),
            "psnr_vs_clean_db": mean_psnr(purified, x),
            "pixels_off_by_more_than_1_255": float(
                ((purified - reference).abs() > 1 / 255).float().mean()
            ),
            "clean_accuracy": accuracy(purified),
            "robust_accuracy_pgd": accuracy(purified_adv),
            "adv_predictions_changed_vs_fp32": float(
                (
                    torch.cat([classifier(b).argmax(1) for b in purified_adv.split(500)])
                    != torch.cat([classifier(b).argmax(1) for b in reference_adv.split(500)])
                )
                .float()
                .mean()
            ),
        }
        rows.append(row)
    base = rows[0]["images_per_second"]
    print(
        f"model {args.model}, classifier {args.classifier}, {len(x)} images, "
        f"PGD {args.eps:g}/255 oblivious, {args.threads} threads, device {device}"
    )
    print(
        "| precision | images/s | speed vs fp32 | code bits != fp32 | PSNR vs fp32 (dB) "
        "| pixels > 1/255 from fp32 | PSNR vs clean (dB) | clean acc. | robust acc. (PGD) "
        "| adv. predictions changed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        psnr_fp32 = "=" if r["precision"] == "fp32" else f"{r['psnr_vs_fp32_db']:.1f}"
        print(f"| {r['precision']} | {r['images_per_second']:.0f} "
              f"| {r['images_per_second'] / base:.2f}x "
              f"| {100 * r['code_bits_differing_from_fp32']:.3f}% | {psnr_fp32} "
              f"| {100 * r['pixels_off_by_more_than_1_255']:.2f}% "
              f"| {r['psnr_vs_clean_db']:.2f} | {100 * r['clean_accuracy']:.1f}% "
              f"| {100 * r['robust_accuracy_pgd']:.1f}% "
              f"| {100 * r['adv_predictions_changed_vs_fp32']:.1f}% |")  # fmt: skip
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
