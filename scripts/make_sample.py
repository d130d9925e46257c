"""Build cbtool's embedded ``sample`` dataset: a class-balanced slice of Fashion-MNIST.

Reads the idx files of the Debian package ``dataset-fashion-mnist`` and writes
``cbtool/data/sample/fashion_mnist_sample.npz`` (uint8 arrays, deflate-compressed).
The slice is deterministic: for each split and class, a seeded permutation of that
class's source indices picks the first ``per_class`` of them; the picked samples keep
their order in the source file.

    python scripts/make_sample.py [--source /usr/share/datasets/fashion-mnist] [--train-per-class 500] [--test-per-class 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from cbtool.data.idx import read_idx

SOURCE = Path("/usr/share/datasets/fashion-mnist")
OUTPUT = Path(__file__).resolve().parents[1] / "cbtool" / "data" / "sample" / "fashion_mnist_sample.npz"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SEED = 0


def pick_balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Source indices of ``per_class`` samples of every class, in source order."""
    rng = np.random.default_rng(seed)
    picked = []
    for cls in range(len(CLASS_NAMES)):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(f"class {cls} has only {len(members)} samples, {per_class} requested")
        picked.append(rng.permutation(members)[:per_class])
    return np.sort(np.concatenate(picked))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args(argv)

    arrays: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, prefix, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(args.source / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(args.source / f"{prefix}-labels-idx1-ubyte.gz")
        keep = pick_balanced(labels, per_class, SEED)
        arrays[f"{split}_images"] = np.ascontiguousarray(images[keep])
        arrays[f"{split}_labels"] = labels[keep].astype(np.uint8)
        arrays[f"{split}_source_index"] = keep.astype(np.uint16)  # 60,000 < 2**16

    # Write beside the target and rename, so a failed run never leaves half a file.
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=args.output.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file ships in the package
        os.replace(tmp, args.output)
    except BaseException:
        os.unlink(tmp)
        raise
    sizes = ", ".join(f"{s}: {len(arrays[f'{s}_labels'])}" for s in ("train", "test"))
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB; {sizes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
