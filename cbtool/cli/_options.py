"""Option aliases shared by the commands, so that help texts read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or notes on stderr.")]
JsonOut = Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON to this file.", dir_okay=False)]
Force = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output file.")]
Device = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU).")]
BatchSize = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch (per process under torchrun).")]
Amp = Annotated[bool, typer.Option("--amp", help="Mixed precision (bf16 autocast on CUDA; fp16 with a scaler where bf16 is missing).")]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="Use the channels-last memory format.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the model first.")]
MarkdownOut = Annotated[
    Optional[Path],
    typer.Option("--markdown", help="Append a markdown summary to this file (e.g. $GITHUB_STEP_SUMMARY).", dir_okay=False),
]
Plot = Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG plot here (needs the 'plot' extra).", dir_okay=False)]

# Model-source options, shared by inject, eval, finetune, bench and viz.
NoPretrained = Annotated[bool, typer.Option("--no-pretrained", help="Random initialisation instead of the Hub's pretrained weights.")]
Checkpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="Weights for a timm name: .safetensors, or .pth/.bin (read with weights_only=True).")]
NumClasses = Annotated[Optional[int], typer.Option("--num-classes", min=1, help="Reset the classifier head to this many classes.")]
ImgSize = Annotated[Optional[int], typer.Option("--img-size", min=1, help="The model's input size in pixels: builds a timm model at this size (a saved or Hugging Face model must already take it); preprocessing follows the model.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for random weights (--no-pretrained, a new head): the same seed gives the same weights.")]
ModelKwargs = Annotated[Optional[list[str]], typer.Option("--model-kwargs", help="key=value architecture arguments for timm's create_model (repeatable).")]

# Context Broadcasting spec options, shared by inject, finetune --inject and bench.
ScaleInit = Annotated[Optional[float], typer.Option("--scale-init", help="cbs only: the scales' initial value in [0, 1] (default 0.5; 0 keeps the model's function).")]
Variant = Annotated[str, typer.Option("--variant", help="cb (0.5*x + 0.5*mean) or cbs (learned per-channel scale).")]
Position = Annotated[str, typer.Option("--position", help="mlp (end of the MLP branch, as in the paper), attn, or block.")]
Layers = Annotated[str, typer.Option("--layers", help="all, or indices and ranges like 0,2,5-7 (negative counts from the end).")]
