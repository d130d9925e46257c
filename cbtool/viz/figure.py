"""Attention pictures of several models on the same images: every check first, then the forwards, then the grid.

Rows are images; the first column is the image as the first model sees it (resized, cropped), then for each
model (plain beside CB when two are given), each chosen layer and each view, one heatmap per fused head or
per head, and a rollout column per model when asked.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cbtool.errors import VizError
from cbtool.viz.maps import attention_maps, choose_layers, layouts_of
from cbtool.viz.pictures import Panel, compose, save_png
from cbtool.viz.rollout import attention_rollout, check_rollout, check_rollout_options
from cbtool.viz.scales import ColourScale, check_scale, panel_limits, scale_line, view_scale
from cbtool.viz.views import check_heads, check_query, check_view, fuse_heads, layer_view


@dataclass(frozen=True)
class VizOptions:
    """What to draw. ``layers``: ``--layers`` text or indices (default: the last layer); ``heads``: mean, max, min,
    all or an index; ``query``: (row, col) of a patch; ``entropy``: per-query entropy; ``rollout`` with
    ``head_fusion`` and ``discard_ratio`` (default mean and 0: Abnar & Zuidema's rollout; above 0: vit-explain's
    variant; refused without ``rollout``); ``class_map``: the class-token (mean-query) picture; ``scale``:
    ``shared`` (one colour scale per view, with a colour bar) or ``per-panel`` (each panel stretched to its own min
    and max, said in its title). Checked when made: a bad scale or rollout setting is one ``VizError`` line."""

    layers: Sequence[int] | str | None = None
    heads: str | int = "mean"
    query: tuple[int, int] | None = None
    entropy: bool = False
    rollout: bool = False
    head_fusion: str | None = None
    discard_ratio: float | None = None
    class_map: bool = True
    scale: str = "shared"

    def __post_init__(self) -> None:
        check_scale(self.scale)
        fusion, ratio = check_rollout_options(self.head_fusion, self.discard_ratio, rollout=self.rollout)
        if self.rollout:  # the settings drawn, defaults filled in
            object.__setattr__(self, "head_fusion", fusion)
            object.__setattr__(self, "discard_ratio", ratio)

    def views(self) -> list[str]:
        return (["class"] if self.class_map else []) + (["query"] if self.query else []) + (["entropy"] if self.entropy else [])


def preprocess(model: nn.Module, images: Sequence) -> tuple[torch.Tensor, list[np.ndarray]]:
    """PIL images -> the model's eval batch (``cbtool eval``'s transform) and, per image, what it sees in [0, 1]."""
    from cbtool.data import build_transform

    preprocessing = _preprocessing(model)
    batch = torch.stack([build_transform(preprocessing)(image) for image in images])
    mean = torch.tensor(preprocessing["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"]).view(1, 3, 1, 1)
    shown = (batch * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return batch, list(shown)


def _plan(model: nn.Module, label: str, size: tuple[int, int], options: VizOptions) -> list[int]:
    """The model's layer indices to draw, after checking that every asked picture is defined for them."""
    from cbtool.families import detect

    count = len(detect(model).attention_layouts(model, size))
    layers = choose_layers(options.layers if options.layers is not None else [-1], count)
    for index, layout in zip(layers, layouts_of(model, size, layers)):
        where = f"layer {index} of {label}"
        for view in options.views():
            check_view(layout, view, where)
        if options.query is not None:
            check_query(layout, options.query, where)
        check_heads(options.heads, layout.heads)
    if options.rollout:
        check_rollout(model, label)
    return layers


def check_options(models: Sequence[nn.Module], labels: Sequence[str], options: VizOptions) -> None:
    """Every asked picture against every model's layers at its input size (which the model must take, as eval
    checks it): one ``CbtoolError`` line before any image."""
    from cbtool.models.fit import check_input_size

    if not options.views() and not options.rollout:
        raise VizError("nothing to draw: ask for the class map, --query, --entropy or --rollout")
    for model, label in zip(models, labels):
        size = tuple(_preprocessing(model)["input_size"][-2:])
        check_input_size(model, size, label, option="the input size")
        _plan(model, label, size, options)


def _preprocessing(model: nn.Module) -> dict:
    """The model's eval preprocessing (``cbtool eval``'s), from its data config."""
    from cbtool.data import resolve_preprocessing
    from cbtool.models import provenance

    config = provenance.data_config_of(model)
    if config is None:
        raise VizError(f"{type(model).__name__} has no data config; build it with cbtool.models.resolve.resolve or cbtool.load")
    return resolve_preprocessing(config)


def attention_panels(models: Sequence[nn.Module], images: Sequence, *, labels: Sequence[str] | None = None,
                     names: Sequence[str] | None = None, options: VizOptions = VizOptions()) -> list[list[Panel]]:
    """One row of panels per image (PIL RGB images): the image, then every model's attention pictures, each
    coloured on its view's scale (:func:`attention_figure` draws the colour bars too)."""
    return _drawn(models, images, labels, names, options)[0]


def _drawn(models: Sequence[nn.Module], images: Sequence, labels: Sequence[str] | None, names: Sequence[str] | None,
           options: VizOptions) -> tuple[list[list[Panel]], list[ColourScale]]:
    """The panels, scaled per view, and the colour scale of each view drawn."""
    if not models:
        raise VizError("give at least one model")
    if not images:
        raise VizError("no images: pass --images FILE ... or --dataset")
    labels = list(labels) if labels is not None else [f"model{i}" for i in range(len(models))]
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    check_options(models, labels, options)
    batches = [preprocess(model, images) for model in models]
    plans = [_plan(m, label, tuple(b.shape[-2:]), options) for m, label, (b, _) in zip(models, labels, batches)]
    rows: list[list[Panel]] = [[Panel(name, shown)] for name, shown in zip(names, batches[0][1])]
    pending: list[tuple[int, str, int, Panel]] = []  # (row, view, keys N, panel before its scale is known)
    mean_query_models: set[str] = set()
    for model, label, (batch, shown), layers in zip(models, labels, batches, plans):
        size = tuple(batch.shape[-2:])
        wanted = None if options.rollout else layers  # rollout needs every layer
        maps = attention_maps(model, batch, wanted)
        by_layer = dict(zip(layers, maps)) if wanted is not None else {i: maps[i] for i in layers}
        layouts = dict(zip(layers, layouts_of(model, size, layers)))
        for index in layers:
            keys = by_layer[index].shape[-1]
            for view in options.views():
                fused = fuse_heads(layer_view(by_layer[index], layouts[index], view, options.query), options.heads)
                where = f"query ({options.query[0]},{options.query[1]})" if view == "query" else view
                if view == "class" and layouts[index].prefix == 0:  # no class token: the mean query's attention
                    where = MEAN_QUERY
                    mean_query_models.add(label)
                marker = (*options.query, *fused.shape[-2:]) if view == "query" else None
                for head in range(fused.shape[1]):
                    head_name = f"h{head}" if fused.shape[1] > 1 else _heads_text(options.heads)
                    for b in range(len(rows)):
                        title = f"{label}\nL{index} {where} {head_name}"
                        pending.append((b, view, keys, Panel(title, shown[b], fused[b, head].cpu().numpy(),
                                                             marker=marker)))
        if options.rollout:
            rolled = attention_rollout(maps, layouts_of(model, size), head_fusion=options.head_fusion,
                                       discard_ratio=options.discard_ratio)
            title = f"{label}\nrollout, heads {options.head_fusion}\n{discard_text(options.discard_ratio)}"
            for b in range(len(rows)):
                pending.append((b, "rollout", maps[0].shape[-1], Panel(title, shown[b], rolled[b].cpu().numpy())))
    scales = {}
    for view in dict.fromkeys(view for _, view, _, _ in pending):
        drawn = [(keys, p.heat) for _, v, keys, p in pending if v == view]
        scales[view] = view_scale(view, [h for _, h in drawn], [k for k, _ in drawn], options.scale)
    if "class" in scales and mean_query_models:  # the bar names what its panels show
        both = len(mean_query_models) < len(labels)
        scales["class"] = replace(scales["class"], name=f"{'class / ' if both else ''}{MEAN_QUERY} attention")
    for b, view, _, cell in pending:
        low, high = panel_limits(cell.heat, scales[view])
        title = f"{cell.title}\n{scale_line(cell.heat, scales[view])}"
        rows[b].append(replace(cell, title=title, low=low, high=high))
    query_marks = [p.marker for _, view, _, p in pending if view == "query"]
    if query_marks:  # the query patch on the image too, on the first model's grid (the image is as it sees it)
        rows = [[replace(row[0], marker=query_marks[0], title=f"{row[0].title}\nquery ({options.query[0]},"
                 f"{options.query[1]}) outlined"), *row[1:]] for row in rows]
    colour_bars = list(scales.values())
    if options.scale == "per-panel":
        colour_bars = [replace(colour_bars[0], name="every view")]  # one bar, "each panel's min to max", for all
    return rows, colour_bars


def _heads_text(heads: str | int) -> str:
    """A panel's heads in its title: ``head 3`` for one chosen head, ``heads mean`` (max, min) for a fusion."""
    return f"head {heads}" if isinstance(heads, int) else f"heads {heads}"


MEAN_QUERY = "mean-query"
"""The class view of a model without a class token: the mean over the queries of each key's attention."""


def discard_text(ratio: float) -> str:
    """How rollout treated weak attention, for a title: all kept (Abnar & Zuidema) or vit-explain's discarding."""
    return "discard 0 (Abnar & Zuidema)" if ratio == 0 else f"discard {ratio:g} (vit-explain)"


def attention_figure(models: Sequence[nn.Module], images: Sequence, path: str | os.PathLike[str] | None = None, *,
                     labels: Sequence[str] | None = None, names: Sequence[str] | None = None,
                     options: VizOptions = VizOptions(), panel: int = 160, cmap: str = "inferno"):
    """The attention picture grid as a ``PIL.Image``, with one colour bar per view below it; written as PNG
    (atomically) when ``path`` is given."""
    rows, scales = _drawn(models, images, labels, names, options)
    picture = compose(rows, panel=panel, cmap=cmap, scales=scales)
    if path is not None:
        save_png(picture, Path(path))
    return picture


def load_images(paths: Sequence[str | os.PathLike[str]]) -> list:
    """RGB ``PIL.Image`` per file; a missing or undecodable file is one ``VizError`` line."""
    from cbtool.data.images import BadImage, open_rgb

    found = []
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise VizError(f"image {path} does not exist")
        try:
            found.append(open_rgb(str(path)))
        except BadImage as error:
            raise VizError(f"cannot decode image {path} ({error})") from None
    return found
