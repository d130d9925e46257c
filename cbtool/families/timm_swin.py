"""timm's hierarchical Swin Transformers: blocks hold (B, H, W, C) maps and attend within windows."""

from __future__ import annotations

from torch import nn

from cbtool.families.base import TokenLayout
from cbtool.families.timm_vit import TimmViT


def _is_windowed(block: nn.Module) -> bool:
    return hasattr(block, "window_size") and hasattr(block, "input_resolution")


class TimmSwin(TimmViT):
    name = "timm-swin"
    description = "timm SwinTransformer (and V2): CB averages each block's H x W map"

    def matches(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        blocks = self.blocks(model)
        return bool(blocks) and all(_is_windowed(block) for _, block in blocks)

    def branch_module(self, block: nn.Module, position: str) -> nn.Module:
        # The attention module sees one window at a time, so its output is not the whole map.
        # drop_path1 receives the reassembled (B, H, W, C) branch output; CB commutes with drop
        # path (a per-sample scale), so applying it there equals applying it at the branch end.
        return {"mlp": block.mlp, "attn": block.drop_path1, "block": block}[position]

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        grid0 = image_size[0] // patch
        layouts = []
        for _, block in self.blocks(model):
            stride = patch * grid0 / block.input_resolution[0]
            window = tuple(int(w) for w in block.attn.window_size)
            layouts.append(
                TokenLayout(prefix=0, grid=window, pixels_per_token=float(stride), heads=int(block.attn.num_heads))
            )
        return layouts
