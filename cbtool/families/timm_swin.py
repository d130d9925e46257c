"""timm's hierarchical Swin Transformers (V1 and V2): blocks hold (B, H, W, C) maps and attend within windows."""

from __future__ import annotations

from torch import nn

from cbtool.families.base import WINDOW, Branch, TokenLayout, checked_blocks, class_name, window_allowed
from cbtool.families.timm_base import POST_NORM, PRE_NORM, AttentionProbe, TimmFamily

_BLOCKS = {
    "timm.models.swin_transformer.SwinTransformerBlock": PRE_NORM,
    "timm.models.swin_transformer_v2.SwinTransformerV2Block": POST_NORM,
    "timm.models.swin_transformer_v2_cr.SwinTransformerV2CrBlock": POST_NORM,
}


class TimmSwin(TimmFamily):
    name = "timm-swin"
    classes = (
        "timm.models.swin_transformer.SwinTransformer",
        "timm.models.swin_transformer_v2.SwinTransformerV2",
    )
    cb_semantics = "mean over the whole H x W map of the stage (never per window); V2: after the post-norm"
    density_semantics = (
        "window attention: entropy over each query's valid keys (shifted-window masks excluded), distances on "
        "the window grid in pixels of that stage"
    )

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(f"layers.{s}.blocks.{i}", block)
                 for s, stage in enumerate(model.layers) for i, block in enumerate(stage.blocks)]
        return checked_blocks(type(model).__name__, found, _BLOCKS)

    def branch(self, block: nn.Module, position: str) -> Branch:
        # The attention module sees one window at a time; drop_path1 receives the reassembled (B, H, W, C)
        # branch output (after norm1 in V2). The MLP branch is (B, H * W, C); the block output a map.
        if position == "block":
            return Branch(block, (1, 2))
        if position == "attn":
            return Branch(block.drop_path1, (1, 2))
        return Branch(block.mlp if _BLOCKS[class_name(block)] == PRE_NORM else block.drop_path2, (1,))

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        patch = model.patch_embed.patch_size
        patch = patch[0] if isinstance(patch, (tuple, list)) else patch
        grid0 = model.patch_embed.grid_size[0]
        layouts = []
        for _, block in self.blocks(model):
            stride = patch * grid0 / self.resolution(block)[0]
            window = tuple(int(w) for w in block.attn.window_size)
            layouts.append(TokenLayout(0, window, float(stride), int(block.attn.num_heads), kind=WINDOW))
        return layouts

    def resolution(self, block: nn.Module) -> tuple[int, int]:
        """The (H, W) of the map the block was built for."""
        return block.input_resolution

    def probes(self, model: nn.Module) -> list[AttentionProbe]:
        return [AttentionProbe(block.attn, block.attn.attn_drop, mask_arg="mask", to_allowed=window_allowed)
                for _, block in self.blocks(model)]


class TimmSwinV2Cr(TimmSwin):
    """timm's SwinTransformerV2Cr: post-norm blocks in ``stages`` (a block's optional ``norm3`` is inside it)."""

    name = "timm-swinv2-cr"
    classes = ("timm.models.swin_transformer_v2_cr.SwinTransformerV2Cr",)
    cb_semantics = "mean over the whole H x W map of the stage (never per window), after the branch's post-norm"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(f"stages.{s}.blocks.{i}", block)
                 for s, stage in enumerate(model.stages) for i, block in enumerate(stage.blocks)]
        return checked_blocks(type(model).__name__, found, _BLOCKS)

    def resolution(self, block: nn.Module) -> tuple[int, int]:
        return block.feat_size
