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
    typer.echo(f"source:      {source.get('origin', name)} ({source['library']}: {name})")
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
        typer.echo(f"training:    {json.dumps(info['training'], sort_keys=True)}")
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
