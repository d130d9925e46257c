"""cbtool eval against timm's own evaluation pipeline on one image folder: equal top-1, and the throughput ratio.

Builds a class-folder dataset from Fashion-MNIST (the Debian package ``dataset-fashion-mnist``, else cbtool's
embedded ``sample``) as RGB PNGs under a temporary folder, then runs one randomly initialised model through

  cbtool:  cbtool.data.resolve_dataset -> build_transform -> build_loader -> cbtool.evaluation.evaluate
  timm:    timm.data.create_dataset('', root=folder) -> create_loader(use_prefetcher=False) -> a plain loop

with the same threads, workers and batch size, in interleaved repeats (medians). It asserts that both give the
same top-1 and the same per-sample correctness, and prints the throughput ratio cbtool/timm (target >= 1.0)
and the cost of ``--density`` as time(density) / time(plain) (target <= 1.3 on CPU). ``--profile`` splits the
density cost into the unfused attention path and the entropy/distance math, on one fixed batch.

    python benchmarks/eval_vs_timm.py                       # ~6 minutes on 2 CPU cores
    python benchmarks/eval_vs_timm.py --images 256 --repeats 2 --img-size 112   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Digit prefixes keep the class order the same under timm's natural sort and cbtool's plain sort.
CLASS_NAMES = ("0_tshirt", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker", "8_bag",
               "9_ankle_boot")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--images", type=int, default=160, help="images in the folder (the first N of the test split)")
    parser.add_argument("--png-size", type=int, default=224, help="side of the PNGs written (upscaled from 28 px)")
    parser.add_argument("--img-size", type=int, default=None, help="model input size (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers for both pipelines")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per pipeline, interleaved")
    parser.add_argument("--root", default=None, help="where to write the image folder (default: a temporary folder)")
    parser.add_argument("--no-density", action="store_true", help="skip the --density cost")
    parser.add_argument("--profile", action="store_true", help="split the density cost on one batch")
    return parser.parse_args(argv)


# ----- the image folder ----------------------------------------------------------------------------------------
def fashion_mnist(count: int):
    """The first ``count`` test images (uint8, 28x28) and labels."""
    from cbtool.data.idx import read_idx

    images_file = FASHION_MNIST / "t10k-images-idx3-ubyte.gz"
    if images_file.is_file():
        return read_idx(images_file)[:count], read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")[:count]
    from cbtool.data.embedded import read_sample

    source, _ = read_sample("test")
    return source.images[:count], source.labels[:count]


def write_folder(root: Path, count: int, size: int) -> Path:
    from PIL import Image

    images, labels = fashion_mnist(count)
    for index, (pixels, label) in enumerate(zip(images, labels)):
        path = root / CLASS_NAMES[int(label)] / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB").save(path)
    return root


# ----- the two pipelines -----------------------------------------------------------------------------------------
def cbtool_pass(model, folder: Path, args, *, density: bool) -> dict:
    from cbtool import data
    from cbtool.evaluation import evaluate

    ds = data.resolve_dataset(str(folder), num_model_classes=10)
    loader = data.build_loader(ds.with_transform(data.build_transform(model.cbtool_data_config)),
                               batch_size=args.batch_size, workers=args.workers)  # fmt: skip
    with clocks() as elapsed:
        (result,) = evaluate([model], loader, density=density, progress=False)
    return {"top1": result.metrics["top1"], "correct": result.metrics["correct"], "density": result.density, **elapsed}


def timm_pass(model, folder: Path, args) -> dict:
    import torch
    from timm.data import create_dataset, create_loader, resolve_model_data_config

    config = resolve_model_data_config(model, args={"img_size": args.img_size} if args.img_size else None)
    dataset = create_dataset("", root=str(folder))
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=args.batch_size, use_prefetcher=False,
                           interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                           crop_pct=config["crop_pct"], crop_mode=config["crop_mode"], num_workers=args.workers)  # fmt: skip
    hits = []
    with clocks() as elapsed, torch.inference_mode():
        for images, targets in loader:
            hits += (model(images).argmax(dim=1) == targets).tolist()
    return {"top1": 100.0 * sum(hits) / len(hits), "correct": "".join("1" if hit else "0" for hit in hits), **elapsed}


@contextmanager
def clocks():
    """Fills a dict with the wall and process CPU seconds of the block (CPU time is steadier on a shared machine)."""
    found: dict = {}
    wall, cpu = time.perf_counter(), time.process_time()
    yield found
    found["wall"], found["cpu"] = time.perf_counter() - wall, time.process_time() - cpu


def warm_up(model, args) -> None:
    """One forward on the fused and on the explicit attention path (thread pools, allocator); not timed."""
    import torch

    x = torch.randn(args.batch_size, 3, *model.cbtool_data_config["input_size"][1:])
    attention = [module for module in model.modules() if hasattr(module, "fused_attn")]
    flags = [module.fused_attn for module in attention]
    with torch.inference_mode():
        for fused in (True, False):
            for module in attention:
                module.fused_attn = fused
            model(x)
    for module, flag in zip(attention, flags):
        module.fused_attn = flag


# ----- where the density time goes ----------------------------------------------------------------------------
def profile_density(model, args, repeats: int = 5) -> dict[str, float]:
    """Median CPU ms per forward of one batch: fused attention, the explicit path alone, and with the measurement."""
    import torch

    from cbtool.families import detect
    from cbtool.metrics import DensityAccumulator

    family = detect(model)
    size = tuple(model.cbtool_data_config["input_size"][1:])
    x = torch.randn(args.batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    attention = [module for module in model.modules() if hasattr(module, "fused_attn")]

    def forward_ms() -> float:
        times = []
        with torch.inference_mode():
            model(x)  # warm-up
            for _ in range(repeats):
                started = time.process_time()
                model(x)
                times.append(time.process_time() - started)
        return 1000 * statistics.median(times)

    fused = forward_ms()
    flags = [module.fused_attn for module in attention]
    for module in attention:
        module.fused_attn = False
    explicit = forward_ms()
    for module, flag in zip(attention, flags):
        module.fused_attn = flag
    accumulator = DensityAccumulator(family.attention_layouts(model, size))
    with family.capture_attention(model, accumulator):
        measured = forward_ms()
    return {"fused": fused, "explicit": explicit, "measured": measured}


# ----- main -----------------------------------------------------------------------------------------------------------
def run_interleaved(passes: dict, repeats: int) -> dict[str, list[dict]]:
    """Each pass ``repeats`` times, round-robin, rotating which goes first so load drifts hit all alike."""
    names = list(passes)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            results[name].append(passes[name]())
            print(f"  repeat {repeat + 1} {name:16s} {results[name][-1]['wall']:7.2f} s wall "
                  f"{results[name][-1]['cpu']:7.2f} s cpu", flush=True)  # fmt: skip
    return results


def check_identical(results: dict[str, list[dict]]) -> dict:
    """Every cbtool pass has timm's top-1 and per-sample correctness; returns timm's first pass."""
    reference = results["timm"][0]
    for name, runs in results.items():
        for run in runs:
            assert run["top1"] == reference["top1"], f"{name}: top-1 {run['top1']} != timm {reference['top1']}"
            assert run["correct"] == reference["correct"], f"{name}: per-sample correctness differs from timm"
    return reference


def report(results: dict[str, list[dict]], images: int) -> None:
    def median(name: str, clock: str) -> float:
        return statistics.median(run[clock] for run in results[name])

    def ratio(numerator: str, denominator: str, clock: str) -> str:
        """Ratio of medians, then the median and range of the per-repeat (paired) ratios."""
        paired = sorted(a[clock] / b[clock] for a, b in zip(results[numerator], results[denominator]))
        return (f"{median(numerator, clock) / median(denominator, clock):.3f} "
                f"(paired: median {statistics.median(paired):.3f}, range {paired[0]:.3f}-{paired[-1]:.3f})")  # fmt: skip

    for name in results:
        print(f"{name:17s} median {median(name, 'wall'):7.2f} s wall ({images / median(name, 'wall'):6.1f} img/s), "
              f"{median(name, 'cpu'):7.2f} s cpu")  # fmt: skip
    for clock in ("wall", "cpu"):
        print(f"throughput ratio cbtool/timm ({clock}): {ratio('timm', 'cbtool', clock)}  (target >= 1.0)")
    if "cbtool --density" in results:
        for clock in ("wall", "cpu"):
            print(f"--density cost, time(density)/time(plain) ({clock}): {ratio('cbtool --density', 'cbtool', clock)}  (target <= 1.3)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from cbtool.models import resolve as sources

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    torch.manual_seed(0)
    model = sources.resolve(args.model, pretrained=False, num_classes=10, img_size=args.img_size).eval()
    with tempfile.TemporaryDirectory(prefix="eval-vs-timm-", dir=args.root) as tmp:
        folder = write_folder(Path(tmp) / "fashion", args.images, args.png_size)
        print(f"{args.model} at {model.cbtool_data_config['input_size'][1]} px, {args.images} images of {args.png_size} px, "
              f"batch {args.batch_size}, {args.workers} workers, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"load average {os.getloadavg()[0]:.2f} at start", flush=True)  # fmt: skip
        passes = {"timm": lambda: timm_pass(model, folder, args),
                  "cbtool": lambda: cbtool_pass(model, folder, args, density=False)}  # fmt: skip
        if not args.no_density:
            passes["cbtool --density"] = lambda: cbtool_pass(model, folder, args, density=True)
        warm_up(model, args)
        results = run_interleaved(passes, args.repeats)

    reference = check_identical(results)
    print(f"\ntop-1: timm {reference['top1']:.2f}%, cbtool {results['cbtool'][0]['top1']:.2f}% "
          f"(identical, with identical per-sample correctness over {len(reference['correct'])} images)")  # fmt: skip
    report(results, args.images)
    if args.profile:
        split = profile_density(model, args)
        print(f"\none batch of {args.batch_size}, CPU ms per forward: fused attention {split['fused']:.1f}, "
              f"explicit attention {split['explicit']:.1f} (x{split['explicit'] / split['fused']:.3f}), "
              f"explicit + density {split['measured']:.1f} (x{split['measured'] / split['fused']:.3f})")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} at end; {time.perf_counter() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
