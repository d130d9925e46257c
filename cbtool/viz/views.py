"""What one attention layer shows about each image: (batch, heads, rows, cols) maps over the patch grid.

All views work on ``attention_maps`` output and the layer's ``TokenLayout``. Windowed layers (Swin) attend
within local windows folded into the batch, so no query sees the whole image: these whole-image views are
refused for them in one line rather than drawn misleadingly.
"""

from __future__ import annotations

import math

import torch

from cbtool.errors import VizError
from cbtool.families import TokenLayout

HEAD_FUSIONS = ("mean", "max", "min", "all")
VIEWS = ("class", "query", "entropy")


def check_heads(heads: str | int, count: int | None = None) -> str | int:
    """``mean``, ``max``, ``min``, ``all`` or a head index (checked against ``count`` when given)."""
    if isinstance(heads, str) and heads.lstrip("-").isdigit():
        heads = int(heads)
    if isinstance(heads, int):
        if count is not None and not -count <= heads < count:
            raise VizError(f"head {heads} is out of range for a layer with {count} heads (0..{count - 1})")
        return heads
    if heads not in HEAD_FUSIONS:
        raise VizError(f"--heads must be one of {', '.join(HEAD_FUSIONS)} or a head index, not {heads!r}")
    return heads


def fuse_heads(values: torch.Tensor, heads: str | int) -> torch.Tensor:
    """(batch, heads, ...) -> (batch, 1, ...) fused by mean/max/min or one head; ``all`` keeps every head."""
    heads = check_heads(heads, values.shape[1])
    if heads == "all":
        return values
    if isinstance(heads, int):
        index = heads % values.shape[1]
        return values[:, index : index + 1]
    if heads == "mean":
        return values.mean(dim=1, keepdim=True)
    reduce = torch.amax if heads == "max" else torch.amin
    return reduce(values, dim=1, keepdim=True)


def grid_of(layout: TokenLayout, keys: int) -> tuple[int, int]:
    """The (rows, cols) of the patch keys; a square when the layout does not say."""
    if layout.grid is not None:
        return layout.grid
    side = math.isqrt(keys - layout.prefix)
    return side, side


def check_view(layout: TokenLayout, view: str, where: str = "this layer") -> None:
    """Refuse, in one line, a view the layer's kind does not define."""
    if view not in VIEWS:
        raise VizError(f"unknown view {view!r}: choose one of {', '.join(VIEWS)}")
    if layout.kind == "window":
        raise VizError(
            f"{where} attends within local windows (Swin): no query sees the whole image, so the {view} picture "
            "is not defined; use `cbtool eval --density` for windowed models"
        )
    if layout.kind == "class" and view != "class":
        raise VizError(f"{where} is a class-attention layer with one query (CaiT): only the class picture is defined")
    if layout.kind not in ("global", "class"):
        raise VizError(f"{where} is not token attention ({layout.reason or layout.kind}): no picture is defined")


def check_query(layout: TokenLayout, query: tuple[int, int], where: str = "this layer") -> None:
    """Refuse a ``--query ROW,COL`` outside the layer's patch grid."""
    if layout.grid is None:
        return
    rows, cols = layout.grid
    if not (0 <= query[0] < rows and 0 <= query[1] < cols):
        raise VizError(f"--query {query[0]},{query[1]} is outside the {rows}x{cols} patch grid of {where} "
                       f"(rows 0..{rows - 1}, cols 0..{cols - 1})")


def over_patches(row: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(batch, heads, keys) over prefix + patch keys -> (batch, heads, rows, cols) over the patches."""
    rows, cols = grid_of(layout, row.shape[-1])
    return row[..., layout.prefix :].reshape(*row.shape[:2], rows, cols)


def class_attention(probs: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The class token's attention over the patches; the mean query's for models without a class token."""
    check_view(layout, "class")
    row = probs[:, :, 0] if layout.prefix > 0 else probs.mean(dim=2)
    return over_patches(row, layout)


def query_attention(probs: torch.Tensor, layout: TokenLayout, query: tuple[int, int]) -> torch.Tensor:
    """The attention of the patch at ``query`` (row, col) over the patches."""
    check_view(layout, "query")
    check_query(layout, query)
    rows, cols = grid_of(layout, probs.shape[-1])
    return over_patches(probs[:, :, layout.prefix + query[0] * cols + query[1]], layout)


def entropy_map(probs: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Each patch query's entropy over all keys, normalised to [0, 1] (1: uniform, dense; 0: one key, sharp)."""
    check_view(layout, "entropy")
    rows, cols = grid_of(layout, probs.shape[-1])
    queries = probs[:, :, layout.prefix :]
    entropy = -torch.special.xlogy(queries, queries).sum(dim=-1) / math.log(max(probs.shape[-1], 2))
    return entropy.reshape(*probs.shape[:2], rows, cols)


def layer_view(probs: torch.Tensor, layout: TokenLayout, view: str, query: tuple[int, int] | None = None) -> torch.Tensor:
    """Dispatch to :func:`class_attention`, :func:`query_attention` or :func:`entropy_map`."""
    if view == "query":
        if query is None:
            raise VizError("the query picture needs --query ROW,COL")
        return query_attention(probs, layout, query)
    return entropy_map(probs, layout) if view == "entropy" else class_attention(probs, layout)
