"""Healing after surgery, measured on the embedded Fashion-MNIST sample (README "Healing after surgery").

Trains a small plain ViT from scratch (the "checkpoint"), inserts CB into it, and heals it for the same
budget in several ways, against the plain model trained for the same extra steps:

    plain +E      the plain checkpoint trained further (the control)
    cb            CB inserted, no healing / healed
    cb ramp       healed with --cb-ramp (the CB weight rises from 0 over the first half)
    cbs s0        cbs inserted with --scale-init 0 (the plain function), healed with the default --cb-lr
    cbs s0 lr=    the same with --cb-lr equal to the backbone's lr (the scales barely move)

Every healing run is repeated over ``--seeds`` (data order); results are on the sample's 1,000 test
images, which no run trains or selects on. Prints a Markdown table and writes ``--json``.

    OMP_NUM_THREADS=1 python scripts/healing_experiment.py --out runs/healing --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

TINY = ["patch_size=4", "embed_dim=96", "depth=4", "num_heads=3"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/healing"))
    parser.add_argument("--base-epochs", type=int, default=10, help="training of the plain checkpoint")
    parser.add_argument("--heal-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4, help="healing learning rate of the backbone")
    parser.add_argument("--cb-lrs", type=float, nargs="*", default=[1e-3, 1e-2, 1e-1],
                        help="extra cbs s0 runs (first seed) that choose the default --cb-lr")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def evaluate(path: Path) -> dict:
    from cbtool import evaluate_dataset

    doc = evaluate_dataset([str(path)], "sample", density=True, workers=0, progress=False)
    model = doc["models"][0]
    scales = model.get("cb_scales")
    return {"top1": model["metrics"]["top1"], "loss": model["metrics"]["loss"],
            "entropy": model["density"]["entropy_mean"],
            "scale_mean": statistics.fmean(r["mean"] for r in scales) if scales else None,
            "scale_range": [min(r["min"] for r in scales), max(r["max"] for r in scales)] if scales else None}


def train(model, out: Path, *, epochs: int, seed: int, lr: float, **options) -> Path:
    from cbtool.train import FinetuneConfig, finetune, resolve_training_data

    train_ds, val_ds, _ = resolve_training_data("sample", seed=seed)
    config = FinetuneConfig(epochs=epochs, lr=lr, seed=seed, workers=0, quiet=True, force=True,
                            run_dir=str(out.with_suffix("")), output=str(out), **options)  # fmt: skip
    finetune(model, train_ds, val_ds, config)
    return out


def main(argv=None) -> None:
    from cbtool import CBSpec, inject, load
    from cbtool.models.resolve import resolve

    args = parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "plain.safetensors"
    if not base.exists():
        torch.manual_seed(0)
        model = resolve("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=28, model_kwargs=TINY)
        train(model, base, epochs=args.base_epochs, seed=0, lr=1e-3)
    rows: dict[str, list[dict]] = {"plain checkpoint": [evaluate(base)]}
    injected = args.out / "cb-injected.safetensors"
    from cbtool import save

    save(inject(load(base), CBSpec("cb")), injected, force=True)
    rows["cb injected, no healing"] = [evaluate(injected)]

    heal = dict(epochs=args.heal_epochs, lr=args.lr)
    ramp_steps = None
    runs = {
        "plain, trained further": (None, {}),
        "cb": (CBSpec("cb"), {}),
        "cb --cb-ramp": (CBSpec("cb"), {"cb_ramp": "half"}),
        "cbs --scale-init 0": (CBSpec("cbs", scale_init=0.0), {}),
        f"cbs --scale-init 0 --cb-lr {args.lr:g}": (CBSpec("cbs", scale_init=0.0), {"cb_lr": args.lr}),
    }
    for name, (spec, extra) in runs.items():
        for seed in args.seeds:
            model = load(base)
            if spec is not None:
                inject(model, spec)
            if extra.get("cb_ramp") == "half":
                from cbtool.train import resolve_training_data

                train_size = len(resolve_training_data("sample", seed=seed)[0])
                ramp_steps = (train_size // 64) * args.heal_epochs // 2
                extra = {**extra, "cb_ramp": ramp_steps}
            slug = name.replace(" ", "_").replace("-", "").replace(",", "")
            path = train(model, args.out / f"{slug}-seed{seed}.safetensors", seed=seed, **heal, **extra)
            rows.setdefault(name, []).append(evaluate(path))
            print(f"{name} seed {seed}: {rows[name][-1]}", flush=True)
    for cb_lr in args.cb_lrs:
        name = f"cbs --scale-init 0 --cb-lr {cb_lr:g} (seed {args.seeds[0]})"
        model = inject(load(base), CBSpec("cbs", scale_init=0.0))
        path = train(model, args.out / f"cbs_s0_cblr{cb_lr:g}.safetensors", seed=args.seeds[0], cb_lr=cb_lr, **heal)
        rows[name] = [evaluate(path)]
        print(f"{name}: {rows[name][-1]}", flush=True)

    print(f"\n{len(args.seeds)} seed(s) per healing run, {args.heal_epochs} epochs at lr {args.lr:g}"
          f"{f', ramp {ramp_steps} steps' if ramp_steps else ''}; the sample's 1,000 test images\n")
    print("| model | top-1 % | loss | entropy | cbs scales: mean [min, max] |")
    print("|---|---:|---:|---:|---|")
    for name, results in rows.items():
        print(f"| {name} | {_cell(results, 'top1', 1)} | {_cell(results, 'loss', 3)} | {_cell(results, 'entropy', 3)} "
              f"| {_scales(results)} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _cell(results: list[dict], key: str, digits: int) -> str:
    values = [r[key] for r in results]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _scales(results: list[dict]) -> str:
    if results[0]["scale_mean"] is None:
        return ""
    mean = statistics.fmean(r["scale_mean"] for r in results)
    low = min(r["scale_range"][0] for r in results)
    high = max(r["scale_range"][1] for r in results)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    main()
