"""Train the same small ViT from scratch with and without Context Broadcasting on Fashion-MNIST.

Same seed, recipe and budget for both; prints test top-1 and per-layer attention entropy of each, through
the real CLI (``cbtool finetune`` then ``cbtool eval --density``). Needs the Debian package
``dataset-fashion-mnist`` (real images, MIT licence) unless ``--dataset sample`` is given.

    python benchmarks/cb_vs_plain.py                       # full 60k/10k set, 3 epochs each
    python benchmarks/cb_vs_plain.py --dataset sample --epochs 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from cbtool.data.idx import read_idx

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
MODEL_ARGS = ["vit_tiny_patch16_224", "--no-pretrained", "--num-classes", "10", "--img-size", "28",
              "--model-kwargs", "patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"]


def write_folder(root: Path) -> Path:
    """train/ and test/ split folders of class folders of PNGs, from the Debian idx files."""
    from PIL import Image

    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(FASHION / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(FASHION / f"{prefix}-labels-idx1-ubyte.gz")
        for name in CLASSES:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(root / split / CLASSES[label] / f"{i:05d}.png")
    return root


def cbtool(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cbtool", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="a dataset for cbtool (default: the full Fashion-MNIST folder)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/cb_vs_plain"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        dataset = args.dataset or str(write_folder(Path(scratch) / "fashion-mnist"))
        results = {}
        for name, extra in (("plain", []), ("cb", ["--inject"])):
            model_file = args.out / f"{name}.safetensors"
            started = time.perf_counter()
            cbtool("finetune", *MODEL_ARGS, *extra, "--dataset", dataset, "--epochs", str(args.epochs),
                   "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
                   "--run-dir", str(args.out / f"run-{name}"), "-o", str(model_file), "--force", "--quiet")
            train_seconds = time.perf_counter() - started
            json_file = args.out / f"{name}.json"
            cbtool("eval", str(model_file), "--dataset", dataset, "--split", "test", "--density",
                   "--json", str(json_file), "--quiet")
            results[name] = (json.loads(json_file.read_text())["models"][0], train_seconds)

    print(f"\n{'model':6} {'test top-1':>10} {'loss':>7} {'entropy':>8} {'train s':>8}  entropy per layer")
    for name, (model, seconds) in results.items():
        density = model["density"]
        layers = " ".join(f"{v:.3f}" for v in density["entropy_per_layer"])
        print(f"{name:6} {model['metrics']['top1']:10.2f} {model['metrics']['loss']:7.4f} "
              f"{density['entropy_mean']:8.4f} {seconds:8.0f}  {layers}")
    plain, cb = results["plain"][0], results["cb"][0]
    print(f"\nCB - plain: top-1 {cb['metrics']['top1'] - plain['metrics']['top1']:+.2f} points, "
          f"mean entropy {cb['density']['entropy_mean'] - plain['density']['entropy_mean']:+.4f}")


if __name__ == "__main__":
    main()
