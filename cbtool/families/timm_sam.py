"""timm's VisionTransformerSAM (the SAM image encoder): (B, H, W, C) maps, windowed blocks and a few global ones.

A windowed block cuts the normalised map into (zero-padded) windows, attends within each and puts the map back
together inside its own forward: no module receives the whole attention branch, so CB at ``attn`` is only placed
in the global blocks and refused in windowed ones. ``mlp`` and ``block`` see the whole map in every block.
"""

from __future__ import annotations

from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import GLOBAL, WINDOW, Branch, TokenLayout, checked_blocks
from cbtool.families.timm_base import PRE_NORM, AttentionProbe, TimmFamily
from cbtool.families.timm_vit import patch_grid

_BLOCKS = {"timm.models.vision_transformer_sam.Block": PRE_NORM}


class TimmSAM(TimmFamily):
    name = "timm-sam"
    classes = ("timm.models.vision_transformer_sam.VisionTransformerSAM",)
    cb_semantics = ("mean over the whole H x W map (never per window); attn only in the global blocks, whose "
                    "attention branch exists whole")
    density_semantics = ("windowed blocks: window attention over each window's keys (the zero padding to whole "
                         "windows included: the model attends to it); global blocks: global over the patch grid")

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return checked_blocks(type(model).__name__, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], _BLOCKS)

    def branch(self, block: nn.Module, position: str) -> Branch:
        if position == "block":
            return Branch(block, (1, 2))
        if position == "mlp":
            return Branch(block.mlp, (1,))  # the MLP runs on the whole (B, H * W, C) map
        if block.window_size > 0:
            raise UnsupportedModelError(
                f"a windowed {type(block).__name__} of VisionTransformerSAM puts its attention branch back together "
                "inside its forward, where no module receives it whole; use --position mlp or block, or --layers "
                "with the global blocks (see `cbtool families`)"
            )
        end = block.ls1 if isinstance(getattr(block, "ls1", None), nn.Module) else block.attn
        return Branch(end, (1, 2))  # (B, H, W, C): the attention output before layer scale and drop path

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        grid, stride = patch_grid(model.patch_embed, image_size)
        layouts = []
        for _, block in self.blocks(model):
            heads = int(block.attn.num_heads)
            if block.window_size > 0:
                window = (int(block.window_size),) * 2
                layouts.append(TokenLayout(0, window, stride, heads, kind=WINDOW))
            else:
                layouts.append(TokenLayout(0, grid, stride, heads, kind=GLOBAL))
        return layouts

    def probes(self, model: nn.Module) -> list[AttentionProbe]:
        # SAM folds the heads into the batch: (batch * heads, queries, keys) before attn_drop.
        return [AttentionProbe(block.attn, block.attn.attn_drop, to_probs=_unfold_heads(int(block.attn.num_heads)))
                for _, block in self.blocks(model)]


def _unfold_heads(heads: int):
    return lambda probs: probs.reshape(-1, heads, *probs.shape[-2:])
