"""Training throughput of cbtool's fine-tuning loop against a plain PyTorch loop, with and without CB.

Both loops run the same timm model (random weights), the same data (the ``sample`` dataset through the
model's eval transform, or ``--synthetic`` images), the same batch size, workers and threads, and the same
step: forward, label-smoothed cross-entropy, backward, gradient clipping, AdamW. The cbtool loop is
``cbtool.train.finetune`` (validation off, one checkpoint at the end, as in a real run). The four
configurations run interleaved, rotating their order each round; each figure is the median over rounds.

Targets: cbtool / plain >= 0.95 images/s; CB / no CB >= 0.98 (CB costs at most 2%). On a machine shared
with other jobs, ``--threads 1`` gives steadier figures: idle OpenMP threads that spin while another process
holds the core can slow a 2-thread run tenfold.

    python benchmarks/train_step.py                       # the quickstart's tiny ViT on the sample, CPU
    python benchmarks/train_step.py --model vit_small_patch16_224 --img-size 224 --synthetic --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

QUICKSTART_KWARGS = ["patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=28)
    parser.add_argument("--model-kwargs", nargs="*", default=None, help="key=value (default: the quickstart's tiny ViT)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--synthetic", action="store_true", help="random images at the model's size instead of the sample")
    parser.add_argument("--variant", default="cb")
    args = parser.parse_args(argv)
    if args.model_kwargs is None:
        args.model_kwargs = QUICKSTART_KWARGS if args.model == "vit_tiny_patch16_224" else []
    return args


class _RandomImages:
    """A dataset source of seeded random RGB images (for ``ResolvedDataset.from_source``)."""

    def __init__(self, count: int, size: int, num_classes: int):
        import numpy as np

        rng = np.random.default_rng(0)
        self.pixels = rng.integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)
        self.labels = rng.integers(0, num_classes, size=count)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.pixels[i])

    def sample_id(self, i: int) -> str:
        return f"random/{i}"


def build(args, with_cb: bool):
    import torch

    from cbtool.models.resolve import parse_model_kwargs, resolve
    from cbtool.spec import CBSpec
    from cbtool.surgery import inject

    torch.manual_seed(0)
    model = resolve(args.model, pretrained=False, num_classes=10, img_size=args.img_size,
                    model_kwargs=parse_model_kwargs(args.model_kwargs))  # fmt: skip
    if with_cb:
        inject(model, CBSpec(variant=args.variant))
    return model


def dataset(args, model):
    from cbtool.data import build_transform, resolve_dataset
    from cbtool.data.dataset import ResolvedDataset

    count = args.batch_size * (args.steps + 1)
    if args.synthetic:
        source = _RandomImages(count, args.img_size, 10)
        resolved = ResolvedDataset.from_source(source, label_map=list(range(10)), name="synthetic", kind="sample",
                                               split="train", num_classes=10, class_names=[str(i) for i in range(10)])  # fmt: skip
    else:
        resolved = resolve_dataset("sample", purpose="train", limit=min(count, 5000))
    return resolved.with_transform(build_transform(model.cbtool_data_config))


def plain_loop(model, data, args, device) -> float:
    """The reference: a DataLoader and the same step written out by hand. Returns images per second."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    def collate(batch):
        return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])

    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                        collate_fn=collate, generator=generator, pin_memory=device.type == "cuda")  # fmt: skip
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp)
    steps = 0
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast:
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
        if steps == args.steps:
            break
    loss.item()  # wait for the device
    return steps * args.batch_size / (time.perf_counter() - start)


def cbtool_loop(model, data, args, device, run_dir: Path) -> float:
    """``cbtool.train.finetune`` over the same data and steps. Returns images per second."""
    from cbtool.train import FinetuneConfig, finetune

    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, workers=args.workers,
                            augment=False, device=str(device), amp=args.amp, quiet=True, run_dir=str(run_dir),
                            force=True, warmup_steps=0)  # fmt: skip
    start = time.perf_counter()
    finetune(model, data, None, config)
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from cbtool.distributed import pick_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    models = {cb: build(args, cb) for cb in (False, True)}
    data = dataset(args, models[False])
    print(f"{args.model} {' '.join(args.model_kwargs)} at {args.img_size}px, batch {args.batch_size}, {args.steps} steps "
          f"per run, {args.rounds} rounds, device {device}, {torch.get_num_threads()} threads, workers {args.workers}, "
          f"{'synthetic' if args.synthetic else 'sample'} data; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")  # fmt: skip
    configurations = [("plain", False), ("cbtool", False), ("plain", True), ("cbtool", True)]
    rates: dict[tuple[str, bool], list[float]] = {c: [] for c in configurations}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds + 1):  # round 0 warms up every path and is not counted
            order = configurations[round_index % 4:] + configurations[: round_index % 4]
            for loop, cb in order:
                model = models[cb]
                initial = {k: v.clone() for k, v in model.state_dict().items()}
                if loop == "plain":
                    rate = plain_loop(model, data, args, device)
                else:
                    rate = cbtool_loop(model, data, args, device, Path(folder) / f"r{round_index}-{int(cb)}")
                model.load_state_dict(initial)  # every run starts from the same weights
                for p in model.parameters():
                    p.requires_grad_(True)
                if round_index:
                    rates[(loop, cb)].append(rate)
            if round_index:
                line = "  ".join(f"{loop}{'+cb' if cb else ''} {rates[(loop, cb)][-1]:7.1f}" for loop, cb in configurations)
                print(f"round {round_index}: images/s  {line}", file=sys.stderr)

    median = {c: statistics.median(v) for c, v in rates.items()}

    def paired(a, b) -> float:  # the median of per-round ratios: robust to a machine that speeds up or slows down
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    print("images/s (median):  " + "  ".join(f"{loop}{'+cb' if cb else ''} {median[(loop, cb)]:.1f}" for loop, cb in configurations))
    print(f"cbtool / plain, no CB:   {paired(('cbtool', False), ('plain', False)):.3f}   (target >= 0.95)")
    print(f"cbtool / plain, with CB: {paired(('cbtool', True), ('plain', True)):.3f}   (target >= 0.95)")
    print(f"CB / no CB, cbtool loop: {paired(('cbtool', True), ('cbtool', False)):.3f}   (target >= 0.98)")
    print(f"CB / no CB, plain loop:  {paired(('plain', True), ('plain', False)):.3f}")


if __name__ == "__main__":
    main()
