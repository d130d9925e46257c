"""Forward overhead of Context Broadcasting on ViT-S/16 and ViT-B/16 at batch 32: the ratio cb / plain per model.

Random weights (nothing is downloaded). Runs on the CPU, and on CUDA in fp32 and with bf16 autocast when a GPU
is present. Each configuration times the plain model and the same weights with CB in alternating repeats
(see cbtool.benchmark.measure_overhead). The target is a ratio of at most 1.01.

    python benchmarks/cb_overhead.py                  # full run: about 5 minutes on 2 CPU cores
    python benchmarks/cb_overhead.py --quick          # a smoke test: 3 repeats per configuration
    python benchmarks/cb_overhead.py --devices cuda --json cuda.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
# Settings that change CPU timings and are easy to forget: thread counts, and glibc malloc trimming, which can
# cost more than the CB op itself at small sizes (see docs/benchmarks.md).
TIMING_ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "LD_PRELOAD", "MALLOC_TRIM_THRESHOLD_",
                      "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def environment_note() -> str:
    settings = [f"{name}={os.environ[name]}" for name in TIMING_ENVIRONMENT if name in os.environ]
    return "environment: " + (" ".join(settings) if settings else "no thread or malloc settings")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--devices", nargs="+", default=None,
                        help="devices to run on (default: cpu, plus cuda when available)")
    parser.add_argument("--variant", default="cb")
    parser.add_argument("--position", default="mlp")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--repeats", type=int, default=30, help="most timed repeats per model and configuration")
    parser.add_argument("--max-time", type=float, default=120.0,
                        help="stop a configuration's repeats after this many timed seconds (at least 3 repeats)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up forwards per model (default: 1 on CPU, 3 on GPU)")
    parser.add_argument("--number", type=int, default=None, help="forwards per timed repeat (default: ~50 ms worth)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: CPU time, steadier on a shared machine (CPU runs only; GPU runs use the wall clock)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-amp", action="store_true", help="on CUDA, skip the bf16 autocast runs")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 repeats and 1 warm-up per configuration")
    parser.add_argument("--target", type=float, default=1.01, help="the ratio cb/plain to stay within")
    parser.add_argument("--fail-above-target", action="store_true", help="exit 1 when a ratio exceeds --target")
    parser.add_argument("--json", default=None, help="write every result to this file (a JSON list)")
    parser.add_argument("--quiet", action="store_true", help="no per-repeat progress on stderr")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 3, 1
    return args


def configurations(devices: list[str] | None, amp: bool) -> list[tuple[str, bool]]:
    """(device, amp) pairs: CPU in fp32; CUDA in fp32 and, unless told otherwise, with bf16 autocast."""
    import torch

    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs = []
    for device in devices:
        pairs.append((device, False))
        if device.startswith("cuda") and amp:
            pairs.append((device, True))
    return pairs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from cbtool.models import resolve as sources
    from cbtool.benchmark import measure_overhead
    from cbtool.files import write_json_atomic
    from cbtool.report import format_table
    from cbtool.spec import CBSpec

    spec = CBSpec(variant=args.variant, position=args.position, layers=args.layers)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} logical CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start", file=sys.stderr)
    results = []
    for device, amp in configurations(args.devices, not args.no_amp):
        for name in args.models:
            model = sources.resolve(name, pretrained=False)
            warmup = args.warmup if args.warmup is not None else (1 if device == "cpu" else 3)
            print(f"== {name} on {device}{' with amp' if amp else ''}", file=sys.stderr, flush=True)
            result = measure_overhead(
                model, spec, batch_size=args.batch_size, device=device, amp=amp, compile=args.compile,
                channels_last=args.channels_last, repeats=args.repeats, warmup=warmup, number=args.number,
                max_seconds=args.max_time, clock=args.clock if device == "cpu" else "wall", threads=args.threads,
                label=name,
                progress=None if args.quiet else (lambda message: print("   " + message, file=sys.stderr, flush=True)),
            )
            print(result.describe(), file=sys.stderr)
            print(result.table(), file=sys.stderr, flush=True)
            results.append(result)
            del model

    rows = [
        [r.model, r.device_name if r.device.startswith("cuda") else r.device, r.amp_dtype or "fp32", r.threads,
         r.clock, r.repeats,
         f"{r.plain.median_ms:.2f} ({r.plain.q1_ms:.2f}-{r.plain.q3_ms:.2f})",
         f"{r.cb.median_ms:.2f} ({r.cb.q1_ms:.2f}-{r.cb.q3_ms:.2f})",
         f"{r.ratio:.4f}", f"{r.paired_ratio_q1:.4f}-{r.paired_ratio_q3:.4f}",
         "yes" if r.ratio <= args.target else "NO"]
        for r in results
    ]
    headers = ["model", "device", "dtype", "threads", "clock", "repeats", "plain ms (IQR)", f"{spec.variant} ms (IQR)", "ratio",
               "paired IQR", f"<= {args.target:g}"]
    print(f"batch {args.batch_size}, {spec.variant} at {spec.position}, layers {spec.layers}; "
          f"torch {torch.__version__} (default threads {torch.get_num_threads()}); "
          f"load average {os.getloadavg()[0]:.2f} at end; {time.perf_counter() - started:.0f} s in all")
    print(environment_note())
    print(format_table(headers, rows))
    if args.json:
        write_json_atomic(args.json, [r.to_dict() for r in results])
        print(f"wrote {args.json}", file=sys.stderr)
    over = [r for r in results if r.ratio > args.target]
    return 1 if over and args.fail_above_target else 0


if __name__ == "__main__":
    sys.exit(main())
