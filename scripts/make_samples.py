"""Build the embedded evaluation samples (run once; the outputs are committed).

    python scripts/make_samples.py --cifar-dir ../shared/data/cifar10

For each dataset: 100 test images of each of the 10 classes, drawn without replacement with
``class_balanced_indices(labels, 100, seed=0)`` and stored in test-set order, as uint8.
"""

from __future__ import annotations

import argparse

from comdefend.checkpoint import save_checkpoint, sha256_of
from comdefend.data.datasets import class_balanced_indices, find_dataset, load_dataset
from comdefend.data.samples import SAMPLE_FOLDER

PER_CLASS = 100
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-dir", default=None)
    parser.add_argument("--fashion-dir", default=None)
    args = parser.parse_args()
    for dataset, data_dir in (("fashion-mnist", args.fashion_dir), ("cifar10", args.cifar_dir)):
        test = load_dataset(dataset, "test", data_dir)
        indices = class_balanced_indices(test.labels, PER_CLASS, seed=SEED)
        sample = test.subset(indices)
        source = find_dataset(dataset, data_dir)
        source_files = sorted(p for p in source.iterdir() if "test" in p.name or "t10k" in p.name)
        metadata = {
            "kind": "sample",
            "dataset": dataset,
            "split": "test",
            "images": len(sample),
            "per_class": PER_CLASS,
            "selection": f"class_balanced_indices(test labels, {PER_CLASS}, seed={SEED}), sorted",
            "classes": test.classes,
            "source_files_sha256": {p.name: sha256_of(p) for p in source_files if p.is_file()},
        }
        tensors = {"images": sample.images, "labels": sample.labels, "indices": indices}
        path = save_checkpoint(SAMPLE_FOLDER / f"{dataset}-sample.safetensors", tensors, metadata)
        print(f"{path}: {len(sample)} images, sha256 {sha256_of(path)}")


if __name__ == "__main__":
    main()
