"""A sweep from its options: the plan (finetune's options with their defaults, the grid, the evaluation), every
check before the first run, then the runs and the summary (``summary.json``)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from cbtool.errors import CbtoolError, OutputError
from cbtool.sweep.plan import (
    LOCK_FILE, PLAIN, SUMMARY_FILE, SweepPlan, check_claim, claim_folder, grid, parse_layers, parse_positions,
    parse_seeds, parse_variants, read_plan,
)  # fmt: skip

# finetune options that the sweep sets for each run (its cell, seed and folder), or that it cannot pass on.
OWNED = ("ctx", "inject_cb", "variant", "position", "layers", "seed", "output", "run_dir", "resume", "save_best",
         "log", "force")  # fmt: skip
# finetune options that are not about training: the model, how to read the data, where and how fast to run.
NOT_TRAINING = ("model", "dataset", "no_pretrained", "checkpoint", "num_classes", "img_size", "model_kwargs",
                "scale_init", "image_column", "label_column", "skip_bad_images", "batch_size", "workers", "device",
                "amp", "channels_last", "compile_model", "density", "quiet")  # fmt: skip
RUNTIME = ("device", "workers", "quiet")


def finetune_defaults() -> dict[str, Any]:
    """Every option of ``cbtool finetune`` a sweep passes on, with its default (``train.options.option_defaults``,
    which the tests hold equal to the command's signature: options added to finetune reach every run)."""
    from cbtool.train.options import option_defaults

    return {name: value for name, value in option_defaults().items() if name not in OWNED}


def training_only() -> list[str]:
    """The finetune options that mean something only when the runs train (``--lr``, ``--epochs``, ...)."""
    return [name for name in finetune_defaults() if name not in NOT_TRAINING]


def make_plan(model: str, dataset: str, *, variants: str | Sequence[str] = "plain,cb",
              positions: str | Sequence[str] = "mlp", layers: str | Sequence[str] | None = None,
              seeds: str | Sequence[int] = "0", eval_dataset: str | None = None, eval_split: str | None = None,
              eval_limit: int | None = None, corruptions: str | Sequence[str] | None = None,
              severities: str | Sequence[int] | None = None, density: bool = True, finetune: bool = True,
              processes: int = 1, **options: Any) -> SweepPlan:
    """The plan of a sweep of ``model`` trained on ``dataset``; ``options`` are ``cbtool finetune``'s (parameter
    names, e.g. ``lr=1e-3, steps=2000``) and every run gets them; ``processes``: per run (``--torchrun N``), part of
    the recipe since it sets the global batch. Checks the grid's syntax; ``check_plan`` checks it against the model
    and the data."""
    from cbtool.pipeline import check_corruption_options

    defaults = finetune_defaults()
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise CbtoolError(f"unknown finetune option(s) for a sweep: {', '.join(unknown)}")
    merged = {**defaults, **options, "model": model, "dataset": dataset, "density": density}
    runtime = {name: merged.pop(name) for name in RUNTIME}
    cells = grid(_items(variants, parse_variants), _items(positions, parse_positions),
                 parse_layers([layers] if isinstance(layers, str) else layers))  # fmt: skip
    names, levels = check_corruption_options(corruptions, severities)
    evaluation = {"dataset": eval_dataset or dataset, "split": eval_split, "limit": eval_limit,
                  "corruptions": names or None, "severities": levels or None, "density": density}  # fmt: skip
    seed_list = parse_seeds(seeds) if isinstance(seeds, str) else parse_seeds(",".join(map(str, seeds)))
    has_cbs = any(cell.variant == "cbs" for cell in cells)
    for name, flag in (("scale_init", "--scale-init"), ("cb_lr", "--cb-lr")):
        if merged.get(name) is not None and not has_cbs:
            raise CbtoolError(f"{flag} is for the learned scales of cbs; --variants has no cbs")
    if merged.get("cb_ramp") is not None:
        if all(cell.variant == PLAIN for cell in cells):
            raise CbtoolError("--cb-ramp raises the CB weight of the CB runs; --variants has only plain")
        if merged.get("steps") is not None and merged["cb_ramp"] >= merged["steps"]:
            raise CbtoolError(f"--cb-ramp {merged['cb_ramp']} leaves no step of the runs ({merged['steps']} steps) at "
                              "the full CB weight; use a shorter ramp or more --steps")  # fmt: skip
    return SweepPlan(cells, seed_list, _json_values(merged), _json_values(evaluation), finetune, runtime, processes)


def _items(value: str | Sequence[str], parse) -> list[str]:
    return parse(value if isinstance(value, str) else ",".join(value))


def _json_values(data: dict[str, Any]) -> dict[str, Any]:
    """Paths as strings, tuples as lists: what the record reads back as, so that two starts compare equal."""
    return json.loads(json.dumps(data, default=str))


def check_plan(plan: SweepPlan) -> None:
    """Everything that can be checked before the first run: the recipe's ranges and, on the model built once
    (without downloading weights), every cell's CB spec and the input size corruptions need."""
    from cbtool.models import provenance
    from cbtool.ranges import check_range
    from cbtool.models.resolve import resolve
    from cbtool.spec import CBSpec
    from cbtool.surgery import inject, remove

    o = plan.options
    if plan.finetune:
        from cbtool.optim import parse_train_parts
        from cbtool.train import FinetuneConfig

        FinetuneConfig.from_dict({**o, **plan.runtime_finetune_options()})  # the ranges finetune checks
        check_range("--val-fraction", o.get("val_fraction"), 0, 1, low_open=True, high_open=True)
        if "cb" in parse_train_parts(o["train"]) and any(cell.variant != "cbs" for cell in plan.cells):
            raise CbtoolError(f"--train {o['train']} trains the cbs scales, and the plain and cb runs have none; "
                              "sweep only cbs, or train other parts (e.g. --train head,norm)")  # fmt: skip
    _check_data(plan)
    model = resolve(o["model"], pretrained=False, num_classes=o["num_classes"], img_size=o["img_size"],
                    model_kwargs=o["model_kwargs"])  # fmt: skip
    for cell in plan.cells:
        if cell.variant != PLAIN:
            scale_init = o.get("scale_init") if cell.variant == "cbs" else None
            inject(model, CBSpec.from_options(cell.variant, cell.position, cell.layers, scale_init))
            remove(model)
    if plan.evaluation["corruptions"]:
        from cbtool.pipeline import check_corruptible_size

        config = provenance.data_config_of(model) or {}
        if config.get("input_size"):
            check_corruptible_size(config["input_size"])


def _check_data(plan: SweepPlan) -> None:
    """The data exist, the runs are not evaluated on the images they train on, and --cb-ramp fits the runs."""
    from cbtool.data import resolve_dataset

    o, ev = plan.options, plan.evaluation
    common = dict(image_column=o.get("image_column"), label_column=o.get("label_column"),
                  skip_bad_images=bool(o.get("skip_bad_images")))  # fmt: skip
    evaluated = resolve_dataset(ev["dataset"], ev["split"], purpose="eval", **common)
    if not plan.finetune:
        return
    from cbtool.train import resolve_training_data

    trained = resolve_dataset(o["dataset"], o.get("split"), purpose="train", **common)
    if _same_place(o["dataset"], ev["dataset"]) and evaluated.split == trained.split:
        where = f"split {trained.split!r} of {o['dataset']}" if trained.split else str(o["dataset"])
        raise CbtoolError(f"the runs would be evaluated on {where}, which they train on; give held-out data with "
                          "--eval-dataset or --eval-split")  # fmt: skip
    if o.get("cb_ramp") is not None and o.get("steps") is None:
        train, _, _ = resolve_training_data(o["dataset"], split=o.get("split"), val_split=o.get("val_split"),
                                            val_fraction=o.get("val_fraction"), seed=plan.seeds[0], limit=o.get("limit"),
                                            **common)  # fmt: skip
        per_epoch = len(train) // plan.processes // o["batch_size"] // o["grad_accum"]
        total = (o.get("epochs") or 1) * per_epoch
        if per_epoch and o["cb_ramp"] >= total:
            raise CbtoolError(f"--cb-ramp {o['cb_ramp']} leaves no step of the runs ({total} steps) at the full CB "
                              "weight; use a shorter ramp or more --epochs")  # fmt: skip


def _same_place(a: str, b: str) -> bool:
    """Whether two --dataset values name the same data (the same folder however written, or the same name)."""
    first, second = Path(a).expanduser(), Path(b).expanduser()
    if first.exists() and second.exists():
        return first.resolve() == second.resolve()
    return a == b


def run_sweep(plan: SweepPlan, root: str | Path, *, devices: Sequence[str] | None = None,
              torchrun: int | None = None, note=None) -> dict[str, Any]:
    """Check the plan, claim ``root`` (a new folder, or one holding this sweep: finished runs are kept), run what is
    left and write ``summary.json``; returns the summary. ``devices``/``torchrun`` run each run in a subprocess."""
    from cbtool.sweep.jobs import refuse_if_jobs_run
    from cbtool.sweep.runner import check_gpus, device_slots, run_in_subprocesses, run_sequential

    note = note or (lambda text: None if plan.runtime.get("quiet") else print(text, file=sys.stderr))
    if (torchrun or 1) != plan.processes:
        raise ValueError(f"the plan was made for {plan.processes} process(es) per run, not --torchrun {torchrun}")
    check_plan(plan)
    slots = device_slots(list(devices) if devices else None, torchrun)
    refuse_if_jobs_run(root)
    check_gpus(list(devices) if devices else None)
    with claimed_folder(root, plan):
        if devices or torchrun:
            run_in_subprocesses(plan, root, slots=slots, torchrun=torchrun, note=note)
        else:
            run_sequential(plan, root, quiet=bool(plan.runtime.get("quiet")), note=note)
        return write_summary(root, plan)


@contextmanager
def claimed_folder(root: str | Path, plan: SweepPlan) -> Iterator[bool]:
    """Hold ``root``'s lock with ``plan`` recorded in ``root`` (``claim_folder``); yields whether it held this sweep.

    The lock is taken before ``sweep.json`` is written: a second start, with other settings, of a sweep whose runs
    have not produced anything yet would otherwise replace its plan before the lock refused it. The checks run once
    before the lock too, so that a folder that is not a sweep's is refused before a lock file is made in it.
    """
    check_claim(root, plan)
    Path(root).mkdir(parents=True, exist_ok=True)
    with folder_lock(root):
        yield claim_folder(root, plan)  # checked again, now that no other start can change the folder


@contextmanager
def folder_lock(root: str | Path) -> Iterator[None]:
    """Hold ``root/.lock`` while the sweep runs, so that a second start of it is refused instead of training the
    same runs into the same folders. Not under torchrun (every rank runs the sweep) or where flock is missing."""
    import os

    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        yield
        return
    with open(Path(root) / LOCK_FILE, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise OutputError(f"another cbtool sweep is running in {root}; wait for it to end, or use another -o folder") from None
        yield


def write_summary(root: str | Path, plan: SweepPlan | None = None) -> dict[str, Any]:
    """Rebuild the summary from the run folders in ``root`` and write ``summary.json`` there; returns it."""
    from cbtool.files import write_json_atomic
    from cbtool.sweep.summary import summarize

    plan = plan or read_plan(root)
    summary = summarize(plan, root)
    write_json_atomic(Path(root) / SUMMARY_FILE, summary)
    return summary


def run_child(root: str | Path, name: str, *, quiet: bool = False) -> None:
    """One run of the sweep in ``root`` (what ``--devices`` and ``--torchrun`` start in each subprocess), with the
    settings its ``sweep.json`` records; ``quiet`` silences it even if the sweep was not started ``--quiet``."""
    from cbtool.sweep.runner import run_one

    plan = read_plan(root)
    plan.runtime["quiet"] = quiet or bool(plan.runtime.get("quiet"))
    run_one(plan, plan.run(name), root, quiet=plan.runtime["quiet"])
