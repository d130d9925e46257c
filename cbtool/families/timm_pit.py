"""timm PiT: ViT stages whose patch grid is pooled between stages; class (and distillation) tokens throughout."""

from __future__ import annotations

import math

from torch import nn

from cbtool.families.base import TokenLayout, checked_blocks
from cbtool.families.timm_base import PRE_NORM, AttentionProbe, TimmFamily, attn_drop_probe, timm_branch

_BLOCKS = {"timm.models.vision_transformer.Block": PRE_NORM}


def _conv_out(size: int, conv: nn.Conv2d, axis: int) -> int:
    return math.floor((size + 2 * conv.padding[axis] - conv.kernel_size[axis]) / conv.stride[axis] + 1)


class TimmPiT(TimmFamily):
    name = "timm-pit"
    classes = ("timm.models.pit.PoolingVisionTransformer", "timm.models.pit.DistilledPoolingVisionTransformer")
    cb_semantics = "mean over one image's tokens of the current stage (class and distillation tokens included)"
    density_semantics = "global self-attention per stage; distances on each stage's pooled grid"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.cls_token.shape[1])

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = [(f"transformers.{s}.blocks.{i}", block)
                 for s, stage in enumerate(model.transformers) for i, block in enumerate(stage.blocks)]
        return checked_blocks("PoolingVisionTransformer", found, _BLOCKS)

    def branch(self, block: nn.Module, position: str):
        return timm_branch(block, position, PRE_NORM)

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        conv = model.patch_embed.conv
        rows, cols = _conv_out(image_size[0], conv, 0), _conv_out(image_size[1], conv, 1)
        prefix = self.num_prefix_tokens(model)
        layouts = []
        for stage in model.transformers:
            if stage.pool is not None:
                rows, cols = _conv_out(rows, stage.pool.conv, 0), _conv_out(cols, stage.pool.conv, 1)
            layouts += [TokenLayout(prefix, (rows, cols), image_size[0] / rows, int(block.attn.num_heads))
                        for block in stage.blocks]
        return layouts

    def probes(self, model: nn.Module) -> list[AttentionProbe]:
        return [attn_drop_probe(block.attn, f"{name}.attn") for name, block in self.blocks(model)]
