"""Cost of each corruption relative to a ViT-S/16 forward, per image, measured in the same run.

For every corruption, the time to corrupt a batch (averaged over the chosen severities) divided by the
time of one forward of timm's vit_small_patch16_224 (random weights, nothing is downloaded) on the same
batch and device. The target is a ratio of at most 1. Images are real: Fashion-MNIST garments from
cbtool's embedded sample as R, G, B planes, upsampled to the model's 224 px.

    OMP_NUM_THREADS=1 python benchmarks/corruption_cost.py              # CPU, one thread, CPU time
    python benchmarks/corruption_cost.py --device cuda --json cuda.json  # GPU, wall clock
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--corruptions", default="all", help="all, a group, or names separated by commas")
    parser.add_argument("--severities", default="1-5", help="1-5, 3 or 1,3,5: the cost is their mean")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the median counts)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None,
                        help="cpu: process CPU time, steady on a shared machine (default on CPU); wall on GPUs")
    parser.add_argument("--json", default=None, help="write the results to this file")
    return parser.parse_args(argv)


def images(batch: int, size: int):
    """(batch, 3, size, size) real images in [0, 1] from the embedded Fashion-MNIST sample."""
    import importlib.resources

    import numpy as np
    import torch

    with importlib.resources.files("cbtool.data").joinpath("sample", "fashion_mnist_sample.npz").open("rb") as handle:
        planes = np.load(handle)["test_images"][: 3 * batch]
    x = torch.from_numpy(planes).float().reshape(batch, 3, 28, 28) / 255
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def timer(device: str, clock: str) -> Callable[[Callable[[], object]], float]:
    """A function that runs a callable once and returns its seconds on the chosen clock."""
    import torch

    def run(work: Callable[[], object]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.process_time() if clock == "cpu" else time.perf_counter()
        work()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        return (time.process_time() if clock == "cpu" else time.perf_counter()) - start

    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import timm
    import torch

    from cbtool.robustness import corrupt, parse_corruptions, parse_severities

    torch.set_num_threads(args.threads)
    clock = args.clock or ("cpu" if args.device == "cpu" else "wall")
    measure = timer(args.device, clock)
    names, severities = parse_corruptions(args.corruptions), parse_severities(args.severities)
    model = timm.create_model(args.model, pretrained=False).eval().to(args.device)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    x = images(args.batch_size, size).to(args.device)

    def forward_seconds() -> float:
        with torch.inference_mode():
            return statistics.median(measure(lambda: model(x)) for _ in range(args.repeats))

    with torch.inference_mode():
        model(x)  # warm-up
    model_before = forward_seconds()
    rows = []
    for name in names:
        per_severity = []
        for severity in severities:
            # The corruption alone; ImageNet-C's JPEG round trip (on by default in corrupt) is timed once below.
            corrupt(x, name, severity, range(args.batch_size), jpeg_quality=None)  # warm-up: caches, kernels
            times = [measure(lambda r=r: corrupt(x, name, severity, range(r * 1000, r * 1000 + len(x)),
                                                 jpeg_quality=None)) for r in range(args.repeats)]  # fmt: skip
            per_severity.append(statistics.median(times))
        rows.append((name, statistics.mean(per_severity), max(per_severity)))
        print(f"  {name}: {1000 * rows[-1][1] / len(x):.1f} ms/image", file=sys.stderr, flush=True)
    from cbtool.robustness.corruptions import save_as_jpeg

    save_as_jpeg(x, 85)
    jpeg_times = [measure(lambda: save_as_jpeg(x, 85)) for _ in range(args.repeats)]
    rows.append(("+ JPEG q85 step", statistics.median(jpeg_times), max(jpeg_times)))
    model_seconds = (model_before + forward_seconds()) / 2  # before and after, for drift

    per_image = 1000 * model_seconds / len(x)
    print(f"{args.model} forward: {per_image:.1f} ms/image ({args.device}, batch {len(x)}, {size} px, "
          f"{clock} time, {torch.get_num_threads()} thread(s)); severities {','.join(map(str, severities))}")  # fmt: skip
    print(f"{'corruption':<18} {'ms/image':>9} {'ratio':>6} {'worst':>6}")
    results = []
    for name, mean_seconds, worst_seconds in rows:
        ratio, worst = mean_seconds / model_seconds, worst_seconds / model_seconds
        flag = "  > 1" if worst > 1 else ""
        print(f"{name:<18} {1000 * mean_seconds / len(x):>9.2f} {ratio:>6.3f} {worst:>6.3f}{flag}")
        results.append({"corruption": name, "ms_per_image": 1000 * mean_seconds / len(x), "ratio": ratio, "worst_ratio": worst})
    if args.json:
        document = {"model": args.model, "device": args.device, "batch_size": len(x), "clock": clock,
                    "threads": torch.get_num_threads(), "model_ms_per_image": per_image, "results": results}  # fmt: skip
        with open(args.json, "w") as handle:
            json.dump(document, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
