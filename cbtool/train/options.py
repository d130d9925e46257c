"""Run a fine-tune from command-line options: what ``cbtool finetune`` does with them, and what ``cbtool sweep``
does for each of its runs."""

from __future__ import annotations

import sys
from dataclasses import fields
from typing import Any

from cbtool.errors import CbtoolError
from cbtool.ranges import check_range
from cbtool.train.config import FinetuneConfig

# Options of ``cbtool finetune`` that are not FinetuneConfig settings: the model, the data and CB surgery.
_MODEL_AND_DATA = {"model": None, "dataset": None, "split": None, "val_split": None, "val_fraction": None,
                   "limit": None, "val_limit": None, "image_column": None, "label_column": None,
                   "skip_bad_images": False, "inject_cb": False, "variant": "cb", "position": "mlp", "layers": "all",
                   "scale_init": None, "no_pretrained": False, "checkpoint": None, "num_classes": None,
                   "img_size": None, "model_kwargs": None}  # fmt: skip
_CONFIG_ONLY = ("betas", "log_every", "run_info")  # settings the command does not take
_OPTION_NAMES = {"compile": "compile_model"}  # settings the command names otherwise


def option_defaults() -> dict[str, Any]:
    """Every option of ``cbtool finetune`` (by parameter name) with its default: what ``train_from_options`` reads.
    The tests hold it equal to the command's signature."""
    config = {_OPTION_NAMES.get(f.name, f.name): f.default for f in fields(FinetuneConfig) if f.name not in _CONFIG_ONLY}
    return {**_MODEL_AND_DATA, **config}


def train_from_options(o: dict[str, Any], shown: set[str] | None = None):
    """What ``cbtool finetune`` does with its options (``o``: parameter name -> value, as the command gets them):
    build or resume the model, resolve the data, train and save. Returns the ``FinetuneResult`` on the main rank
    (None on the others); Ctrl-C raises ``train.Interrupted`` with ``is_main`` set. ``cbtool sweep`` runs each
    of its runs through here, with one ``shown`` set of the notes already printed, so each is printed once."""
    from cbtool import distributed
    from cbtool.families import detect
    from cbtool.spec import CBSpec
    from cbtool.train.config import Interrupted
    from cbtool.train.data import resolve_training_data
    from cbtool.train.loop import finetune
    from cbtool.train.prepare import check_augmentation, check_new_head, check_run_outputs, fit_head, new_model
    from cbtool.train.resume import load_run, recordable

    info, _ = distributed.setup(o["device"])
    shown = set() if shown is None else shown
    note = (lambda text: print(text, file=sys.stderr)) if info.is_main and not o["quiet"] else (lambda text: None)
    if o.get("scale_init") is not None and not o["inject_cb"]:
        raise CbtoolError("--scale-init goes with --inject (it sets the cbs scales CB is inserted with)")
    spec = CBSpec.from_options(o["variant"], o["position"], o["layers"], o.get("scale_init")) if o["inject_cb"] else None
    config = FinetuneConfig(
        epochs=o["epochs"], steps=o["steps"], batch_size=o["batch_size"], grad_accum=o["grad_accum"], lr=o["lr"],
        cb_lr=o.get("cb_lr"), cb_ramp=o.get("cb_ramp"), min_lr=o["min_lr"], weight_decay=o["weight_decay"],
        warmup_steps=o["warmup_steps"], warmup_frac=o["warmup_frac"],
        label_smoothing=o["label_smoothing"], clip_grad=o["clip_grad"] or None, train=o["train"], seed=o["seed"],
        workers=o["workers"], augment=o["augment"], scale=o["scale"], hflip=o["hflip"],
        color_jitter=o["color_jitter"], auto_augment=o["auto_augment"], device=o["device"], amp=o["amp"],
        channels_last=o["channels_last"], compile=o["compile_model"], run_dir=_str(o["run_dir"]),
        save_every=o["save_every"], eval_every=o["eval_every"], log=_str(o["log"]), output=_str(o["output"]),
        save_best=_str(o["save_best"]), force=o["force"], density=o["density"], quiet=o["quiet"],
        resume=_str(o["resume"]), run_info=recordable(o),
    )  # fmt: skip
    check_range("--val-fraction", o["val_fraction"], 0, 1, low_open=True, high_open=True)
    if info.is_main:  # fail before a long download or a long run
        check_run_outputs(o["output"], save_best=o["save_best"], log=o["log"], run_dir=o["run_dir"],
                                resume=o["resume"], inputs=[o["model"], o["checkpoint"], o["resume"]], dataset=o["dataset"],
                                force=o["force"])  # fmt: skip

    if o["resume"] is not None:
        model, _ = load_run(o["resume"])
    else:
        model = new_model(
            o["model"], seed=o["seed"], spec=spec, pretrained=not o["no_pretrained"], checkpoint=o["checkpoint"],
            num_classes=o["num_classes"], img_size=o["img_size"], model_kwargs=o["model_kwargs"],
        )  # fmt: skip
    check_augmentation(model, config)  # before the data: an option that would do nothing is refused
    train_ds, val_ds, data_note = resolve_training_data(
        o["dataset"], split=o["split"], val_split=o["val_split"], val_fraction=o["val_fraction"], seed=o["seed"],
        limit=o["limit"], val_limit=o["val_limit"], num_model_classes=detect(model).num_classes(model),
        image_column=o["image_column"], label_column=o["label_column"], skip_bad_images=o["skip_bad_images"],
    )  # fmt: skip
    if data_note and data_note not in shown:
        shown.add(data_note)
        note(f"note: {data_note}")
    old = fit_head(model, train_ds.num_classes)
    if old is not None:
        note(f"note: the model's head has {old} classes and '{o['dataset']}' has {train_ds.num_classes}: "
             f"replaced it with a new {train_ds.num_classes}-class head")  # fmt: skip
        check_new_head(config.train)
    try:
        result = finetune(model, train_ds, val_ds, config)
    except Interrupted as stop:
        stop.is_main = info.is_main
        raise
    return result if info.is_main else None


def _str(path) -> str | None:
    return str(path) if path is not None else None
