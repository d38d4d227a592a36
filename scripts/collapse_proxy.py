"""A cheap, reproducible proxy of the plain recipe's collapse, for comparing stabilizers.

The plain ComDefend recipe collapses late on CIFAR-10 / Fashion-MNIST at lr 1e-3 (thousands of
iterations, hours on this CPU). At the authors' PyTorch learning rate (Adam 1e-2, betas
(0.5, 0.999)) the same model collapses the same way within a few hundred iterations: the code
logits grow, the decoder's output sigmoid saturates and every gradient becomes exactly zero.
This script trains the plain Fashion-MNIST model on random P x P crops (fully convolutional, so
the same network; crops only make each iteration cheaper) and logs, every ``--log-every``
iterations, the loss, the largest code logit, the fraction of saturated output pixels, the
gradient norm and the held-out PSNR on the first test images (full 28 x 28).

    python scripts/collapse_proxy.py --seed 0 --stabilize clip-grad --out docs/collapse/x.jsonl

It reuses the library's pieces (model, loss, deterministic batches, stabilizers), so what it
measures is what ``comdefend train --stabilize`` does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from comdefend.data.datasets import load_dataset
from comdefend.losses import comdefend_loss
from comdefend.metrics import mean_psnr
from comdefend.models.comdefend import ComDefend, ComDefendConfig
from comdefend.training.batches import iteration_generator
from comdefend.training.engine import COLLAPSE_MARGIN, is_collapse
from comdefend.training.stabilizers import Stabilization, parse_stabilizers


def summarize(paths: list[Path], at: tuple[int, ...] = (10, 20, 40)) -> str:
    """A markdown table of finished proxy runs (one row per file written by ``--out``):
    held-out PSNR and the largest code logit at the iterations ``at`` and at the last one;
    "collapsed at": the first evaluation :data:`COLLAPSE_MARGIN` (6) dB below the best before it
    (the engine's rule, :func:`is_collapse`); "dead from": the first
    with a zero gradient or more than 99% of the output saturated."""
    marks = " / ".join(str(i) for i in at)
    rows = [
        f"| run | stabilize | lr | seed | iterations | held-out PSNR at {marks} / last (dB) "
        f"| largest code logit at {marks} / last | output saturated at last | collapsed at "
        "| dead from |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for path in sorted(paths):
        run = json.loads(path.read_text())
        by_it = {r["iteration"]: r for r in run["records"]}
        last = run["records"][-1]

        def value(i: int, key: str, form: str, by_it: dict = by_it) -> str:
            return format(by_it[i][key], form) if i in by_it else "-"

        dead = next(
            (
                r["iteration"]
                for r in run["records"]
                if r["grad_norm"] == 0 or r["saturated_output_fraction"] > 0.99
            ),
            None,
        )
        psnrs = " / ".join(value(i, "heldout_psnr_db", ".2f") for i in at)
        logits = " / ".join(value(i, "max_abs_logit", ".3g") for i in at)
        rows.append(
            f"| {path.stem} | {run['args']['stabilize'] or 'none'} | {run['args']['lr']} "
            f"| {run['args']['seed']} | {last['iteration']} "
            f"| {psnrs} / {last['heldout_psnr_db']:.2f} "
            f"| {logits} / {last['max_abs_logit']:.3g} "
            f"| {last['saturated_output_fraction']:.2f} | {run.get('collapsed_at') or '-'} "
            f"| {dead or '-'} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--crop", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta1", type=float, default=0.5)
    parser.add_argument("--stabilize", default="")
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summarize", type=Path, nargs="+", help="print a table of runs")
    parser.add_argument(
        "--at", default="10,20,40", help="with --summarize: the iterations the table shows"
    )
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize, tuple(int(i) for i in args.at.split(","))))
        return
    if args.out is None:
        parser.error("--out is required")

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    chosen = parse_stabilizers(args.stabilize)
    stabilization = Stabilization.from_names(chosen)
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test").head(args.eval_images).float_images()
    torch.manual_seed(args.seed)
    model = ComDefend(ComDefendConfig(preset="plain", image_channels=1))
    optimizer = stabilization.optimizer(list(model.parameters()), args.lr, (args.beta1, 0.999))
    last_conv = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    captured: dict[str, torch.Tensor] = {}
    last_conv.register_forward_hook(lambda _m, _i, out: captured.__setitem__("pre", out))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.time()
    best = -1.0
    collapsed_at = None
    for iteration in range(args.iterations):
        generator = iteration_generator(args.seed, iteration, stream=1)
        index = torch.randint(len(train), (args.batch_size,), generator=generator)
        images = train.float_images(index)
        top, left = torch.randint(28 - args.crop + 1, (2,), generator=generator).tolist()
        x = images[:, :, top : top + args.crop, left : left + args.crop]
        for group in optimizer.param_groups:
            group["lr"] = args.lr * stabilization.lr_factor(iteration, args.iterations)
        model.train()
        unbounded = model.code_logits(x)
        logits = stabilization.bound_logits(unbounded)
        code = model.binarizer(logits, generator=iteration_generator(args.seed, iteration, 2))
        reconstruction = model.decode(code)
        loss, mse, _ = comdefend_loss(reconstruction, x, code, 1e-4)
        penalty = stabilization.penalty(unbounded)
        if penalty is not None:
            loss = loss + penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        grad_norm = float(torch.cat(grads).norm())
        stabilization.clip(list(model.parameters()))
        optimizer.step()
        done = iteration + 1
        if done % args.log_every == 0 or done == args.iterations:
            model.eval()
            with torch.no_grad():
                unbounded = model.code_logits(x)
                held_out, _ = model.reconstruct(test)
            psnr = mean_psnr(held_out, test)
            best = max(best, psnr)
            saturated = float((captured["pre"].detach().abs() > 15).float().mean())
            record = {
                "iteration": done,
                "loss": float(loss.detach()),
                "max_abs_logit": float(unbounded.abs().max()),
                "saturated_output_fraction": saturated,
                "grad_norm": grad_norm,
                "heldout_psnr_db": psnr,
                "seconds": round(time.time() - started, 1),
            }
            if collapsed_at is None and is_collapse(psnr, best, "max", COLLAPSE_MARGIN):
                collapsed_at = done
            records.append(record)
            print(json.dumps(record), flush=True)
    summary = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "stabilize": chosen,
        "collapsed_at": collapsed_at,
        "best_psnr_db": best,
        "final_psnr_db": records[-1]["heldout_psnr_db"],
        "records": records,
    }
    args.out.write_text(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
