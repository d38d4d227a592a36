"""APGD-CE and APGD-DLR against torchattacks' APGD and our PGD on the shipped Fashion-MNIST CNN.

Robust accuracy of ``fashion-cnn`` on the first N embedded sample images under each attack, at a
few L-inf budgets (units of 1/255). torchattacks is optional (``pip install --no-deps
torchattacks``); without it its rows are skipped. Run:

    python benchmarks/apgd_crosscheck.py --images 100 --eps 2 4 --steps 100 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from comdefend import load_dataset
from comdefend.attacks import APGD, APGDDLR, PGD
from comdefend.zoo import load_pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--eps", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier = load_pretrained("fashion-cnn").eval()
    images = load_dataset("fashion-mnist", "sample")
    x, y = images.float_images()[: args.images], images.labels[: args.images].long()
    try:
        import torchattacks
    except ImportError:
        torchattacks = None

    def accuracy(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return (classifier(x_adv).argmax(1) == y).float().mean().item()

    print(f"clean accuracy {accuracy(x):.3f} on {len(x)} images; steps {args.steps}")
    for eps255 in args.eps:
        eps = eps255 / 255
        attacks = {
            "pgd (ours, 2.5 eps/steps)": PGD(classifier, eps=eps, steps=args.steps),
            "apgd-ce (ours)": APGD(classifier, eps=eps, steps=args.steps),
            "apgd-dlr (ours)": APGDDLR(classifier, eps=eps, steps=args.steps),
        }
        if torchattacks is not None:
            for loss in ("ce", "dlr"):
                attacks[f"apgd-{loss} (torchattacks)"] = torchattacks.APGD(
                    classifier, norm="Linf", eps=eps, steps=args.steps, loss=loss, seed=0
                )
        for label, attack in attacks.items():
            start = time.perf_counter()
            x_adv = attack(x, y)
            seconds = time.perf_counter() - start
            linf = (x_adv - x).abs().max().item() * 255
            print(
                f"eps {eps255:g}/255  {label:<28} robust accuracy {accuracy(x_adv):.3f}  "
                f"max |delta| {linf:.3f}/255  ({seconds:.0f} s)"
            )


if __name__ == "__main__":
    main()
