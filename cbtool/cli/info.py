"""``cbtool info``: describe a safetensors file from its header alone (never imports torch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def info_command(
    file: Annotated[Path, typer.Argument(help="A .safetensors file (cbtool's or plain).", dir_okay=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Show the source model, CB spec, parameter count and data config of FILE."""
    from cbtool.models.checkpoint import describe

    info = describe(file)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    typer.echo(f"file:        {info['file']}")
    typer.echo(f"parameters:  {info['parameters']:,} in {info['tensors']} tensors")
    if not info["cbtool"]:
        typer.echo("cbtool:      no (a plain safetensors file without cbtool metadata)")
        if info["metadata"]:
            typer.echo(f"metadata:    {json.dumps(info['metadata'], sort_keys=True)}")
        return
    source = info["source"]
    name = source.get("model_name") or source.get("architecture")
    seed = f", random weights from seed {source['seed']}" if source.get("seed") is not None else ""
    typer.echo(f"source:      {source.get('origin', name)} ({source['library']}: {name}{seed})")
    arguments = _architecture_arguments(source)
    if arguments:
        typer.echo(f"arguments:   {arguments}")
    spec = info["cb_spec"]
    if spec:
        typer.echo(f"cb:          {spec['variant']} at {spec['position']}, layers {spec['layers']}"
                   f" ({info['cb_parameters']:,} CB parameters)")
        for row in info.get("cb_scales") or []:
            typer.echo(f"  scale      {row['module']}: mean {row['mean']:.4f}, min {row['min']:.4f}, max {row['max']:.4f}")
    else:
        typer.echo("cb:          none (plain model)")
    data = info["data_config"] or {}
    if data:
        typer.echo(
            f"input:       {'x'.join(str(s) for s in data.get('input_size', []))}, {data.get('interpolation')}, "
            f"crop {data.get('crop_pct')} ({data.get('crop_mode')}), mean {data.get('mean')}, std {data.get('std')}"
        )
    if info.get("training"):
        for line in training_lines(info["training"]):
            typer.echo(line)
    typer.echo(f"written by:  cbtool {info.get('cbtool_version')}")


# The transformers config fields that say what a ViT-like model is (the rest are defaults of its class).
_HF_FIELDS = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_labels")


def _architecture_arguments(source: dict) -> str:
    """What the architecture was built with (timm create_model kwargs; key transformers config fields)."""
    if source.get("library") == "timm":
        kwargs = source.get("model_kwargs") or {}
    else:
        config = source.get("config") or {}
        kwargs = {key: config[key] for key in _HF_FIELDS if key in config}
        if "num_labels" not in kwargs and isinstance(config.get("id2label"), dict):
            kwargs["num_labels"] = len(config["id2label"])
    return " ".join(f"{key}={value}" for key, value in kwargs.items())


def _data_text(data: dict | None) -> str:
    """``sample (train, 4,500 images, 0.1 held out for validation)``: a training record's dataset."""
    if not data:
        return "none"
    parts = [str(data["split"])] if data.get("split") else []
    if data.get("num_samples") is not None:
        parts.append(f"{data['num_samples']:,} images")
    holdout = data.get("holdout")
    if holdout:
        taken = "held out" if holdout.get("part") == "validation" else "left after holding out"
        parts.append(f"{taken} {holdout.get('fraction'):g} of {holdout.get('from_split') or 'the training data'}")
    return f"{data.get('name', '?')} ({', '.join(parts)})" if parts else str(data.get("name", "?"))


def _number(value, spec: str = "g") -> str:
    return "-" if value is None else format(value, spec)


def training_lines(training: dict) -> list[str]:
    """A training record as aligned lines, like the rest of ``cbtool info`` (the whole record: ``--json``)."""
    t = training
    cb = f" (cbs scales {t['cb_lr']:g})" if t.get("cb_lr") is not None else ""
    ramp = f", CB ramped over {t['cb_ramp']} steps" if t.get("cb_ramp") else ""
    best = (f"; best {_number(t.get('best_top1'), '.2f')}% at step {t.get('best_step')}"
            if t.get("best_top1") is not None else "")
    known = {"dataset", "val_dataset", "steps", "epochs", "lr", "cb_lr", "cb_ramp", "min_lr", "warmup_steps",
             "weight_decay", "label_smoothing", "clip_grad", "batch_size", "grad_accum", "train",
             "trainable_parameters", "augmentation", "seed", "world_size", "amp", "final_top1", "final_loss",
             "best_top1", "best_step"}
    lines = [
        f"training:    {t.get('steps')} steps ({_number(t.get('epochs'))} epochs) on {_data_text(t.get('dataset'))}, "
        f"seed {t.get('seed')}",
        f"  recipe     train {t.get('train')} ({_number(t.get('trainable_parameters'), ',')} parameters), lr "
        f"{_number(t.get('lr'))}{cb} to {_number(t.get('min_lr'))}, warmup {t.get('warmup_steps')} steps{ramp}, "
        f"batch {t.get('batch_size')} (accumulated over {t.get('grad_accum')}), weight decay "
        f"{_number(t.get('weight_decay'))}, label smoothing {_number(t.get('label_smoothing'))}, clip "
        f"{_number(t.get('clip_grad'))}, amp {'on' if t.get('amp') else 'off'}, {t.get('world_size')} "
        f"process{'' if t.get('world_size') == 1 else 'es'}",
        f"  augment    {_augmentation_text(t.get('augmentation'))}",
        f"  validation {_data_text(t.get('val_dataset'))}: final top-1 {_number(t.get('final_top1'), '.2f')}%, "
        f"loss {_number(t.get('final_loss'), '.4f')}{best}",
    ]
    extra = {key: value for key, value in t.items() if key not in known}
    if extra:  # a newer record's fields, shown rather than dropped
        lines.append(f"  other      {json.dumps(extra, sort_keys=True)}")
    return lines


def _augmentation_text(augmentation) -> str:
    if not augmentation:
        return "none"
    if isinstance(augmentation, dict):
        return ", ".join(f"{key} {value}" for key, value in sorted(augmentation.items()))
    return str(augmentation)
