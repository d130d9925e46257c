"""Cost of ``--density`` against a plain eval of the same batches, by token count (target: at most 1.3x).

Runs ``cbtool.evaluate`` on the same random batches with and without density, interleaved, at several
resolutions of one timm model (random weights), and prints the ratio of medians per resolution together
with the peak resident memory each configuration adds to the process (one fresh process per configuration
and resolution, ``--memory``). One thread and CPU time give steady ratios on a shared machine.

    python benchmarks/density_cost.py --model vit_small_patch16_224 --sizes 224 384 512 --batch-size 16 --memory
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
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
    parser.add_argument("--memory", action="store_true", help="also measure each configuration's peak memory")
    parser.add_argument("--peak-of", choices=("plain", "density"), help=argparse.SUPPRESS)  # the child process
    return parser.parse_args(argv)


def timed(run, clock: str) -> float:
    start = time.process_time() if clock == "cpu" else time.perf_counter()
    run()
    return (time.process_time() if clock == "cpu" else time.perf_counter()) - start


def setup(args: argparse.Namespace, size: int):
    import timm

    model = timm.create_model(args.model, pretrained=False, img_size=size, num_classes=10).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, size, size, generator=generator),
                torch.zeros(args.batch_size, dtype=torch.long)) for _ in range(args.batches)]
    return model, batches


def peak_added_mb(args: argparse.Namespace, size: int, config: str) -> float:
    """Peak resident memory one eval adds above what the process held before it, in a fresh process."""
    command = [sys.executable, __file__, "--model", args.model, "--sizes", str(size), "--batch-size",
               str(args.batch_size), "--batches", str(args.batches), "--threads", str(args.threads), "--peak-of", config]
    return float(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def print_peak(args: argparse.Namespace) -> None:
    from cbtool.evaluation import evaluate

    model, batches = setup(args, args.sizes[0])
    with torch.inference_mode():
        model(batches[0][0][:1])  # allocator and kernels warmed up before the baseline is read
    with open("/proc/self/clear_refs", "w") as clear:  # Linux: the peak (VmHWM) restarts from the current size
        clear.write("5")
    before = _status_mb("VmRSS")
    evaluate([model], batches, progress=False, density=args.peak_of == "density")
    print(_status_mb("VmHWM") - before)


def main(argv: list[str] | None = None) -> None:
    from cbtool.evaluation import evaluate

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return print_peak(args)
    print(f"# {args.model}, batch {args.batch_size} x {args.batches}, {args.threads} thread(s), {args.clock} time, "
          f"median of {args.repeats} interleaved repeats; torch {torch.__version__}")
    memory = " plain MB | density MB |" if args.memory else ""
    print(f"| input | tokens | plain s | density s | density / plain |{memory}")
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.memory else ""))
    for size in args.sizes:
        model, batches = setup(args, size)
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
        peaks = "".join(f" {peak_added_mb(args, size, name):.0f} |" for name in runs) if args.memory else ""
        print(f"| {size} | {tokens} | {plain:.3f} | {density:.3f} | {density / plain:.3f} |{peaks}", flush=True)


if __name__ == "__main__":
    main()
