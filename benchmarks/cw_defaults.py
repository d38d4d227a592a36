"""C&W-L2 settings against DeepFool on the shipped Fashion-MNIST classifier (issue 15, item 6).

For each C&W setting: how many of the correctly classified images it fools (no budget) and the
median L2 norm of its perturbations, next to DeepFool's on the same images. Run:

    python benchmarks/cw_defaults.py --images 100 --threads 1

Each setting is ``lr:steps:binary_search_steps``; ``--settings`` takes several. The numbers in
docs/notes/attack-checks.md come from this script.
"""

from __future__ import annotations

import argparse
import time

import torch

from comdefend import load_dataset
from comdefend.attacks import CW, DeepFool
from comdefend.zoo import load_pretrained


def l2_norms(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    return (x_adv - x).flatten(1).norm(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100, help="first N sample images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["0.01:100:5", "0.05:100:5", "0.1:100:5"],
        help="C&W settings as lr:steps:binary_search_steps",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    classifier = load_pretrained("fashion-cnn").eval()
    images = load_dataset("fashion-mnist", "sample")
    x, y = images.float_images()[: args.images], images.labels[: args.images].long()
    with torch.no_grad():
        correct = classifier(x).argmax(1) == y
    x, y = x[correct], y[correct]
    saturated = ((x == 0) | (x == 1)).float().mean().item()
    print(
        f"{len(x)} of {args.images} sample images correctly classified; "
        f"{100 * saturated:.1f}% of their pixels are exactly 0 or 1"
    )

    def report(label: str, x_adv: torch.Tensor, seconds: float) -> torch.Tensor:
        with torch.no_grad():
            fooled = classifier(x_adv).argmax(1) != y
        norms = l2_norms(x, x_adv)[fooled]
        median = norms.median().item() if len(norms) else float("nan")
        print(
            f"{label:<34} fooled {int(fooled.sum()):>3}/{len(x)}  "
            f"median L2 {median:.3f}  ({seconds:.0f} s)"
        )
        return fooled

    start = time.perf_counter()
    x_df = DeepFool(classifier)(x, y)
    fooled_df = report("deepfool (defaults)", x_df, time.perf_counter() - start)
    df_norms = l2_norms(x, x_df)
    for setting in args.settings:
        lr, steps, rounds = setting.split(":")
        attack = CW(classifier, lr=float(lr), steps=int(steps), binary_search_steps=int(rounds))
        start = time.perf_counter()
        x_cw = attack(x, y)
        fooled = report(
            f"cw lr={lr} steps={steps} rounds={rounds}", x_cw, time.perf_counter() - start
        )
        both = fooled & fooled_df
        ratio = (l2_norms(x, x_cw)[both] / df_norms[both]).median().item()
        print(
            f"{'':<34} median per-image L2 ratio cw/deepfool {ratio:.3f} "
            f"on the {int(both.sum())} images both fool"
        )


if __name__ == "__main__":
    main()
