"""timm CaiT: self-attention blocks with talking heads, then class-attention blocks over the class token."""

from __future__ import annotations

from torch import nn

from cbtool.families.base import CLASS, TokenLayout, checked_blocks
from cbtool.families.timm_base import PRE_NORM, AttentionProbe, TimmFamily, attn_drop_probe, timm_branch
from cbtool.families.timm_vit import patch_grid

_BLOCKS = {"timm.models.cait.LayerScaleBlock": PRE_NORM}


class TimmCaiT(TimmFamily):
    name = "timm-cait"
    classes = ("timm.models.cait.Cait",)
    cb_semantics = (
        "mean over one image's patch tokens in the self-attention blocks; the class-attention blocks, whose "
        "MLP sees only the class token, are not rewritten"
    )
    density_semantics = (
        "self-attention layers: softmax before the talking-heads mix; class-attention layers labelled 'class' "
        "(one query), excluded from the means"
    )

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0  # the class token joins only in the class-attention blocks

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return checked_blocks("Cait", [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], _BLOCKS)

    def branch(self, block: nn.Module, position: str):
        return timm_branch(block, position, PRE_NORM)

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        grid, stride = patch_grid(model.patch_embed, image_size)
        layouts = [TokenLayout(0, grid, stride, int(block.attn.num_heads)) for block in model.blocks]
        layouts += [TokenLayout(1, grid, stride, int(block.attn.num_heads), kind=CLASS)
                    for block in model.blocks_token_only]
        return layouts

    def probes(self, model: nn.Module) -> list[AttentionProbe]:
        # Talking heads mix the heads after the softmax (proj_w); the probabilities are proj_w's input,
        # laid out (batch, queries, keys, heads).
        probes = [AttentionProbe(block.attn, block.attn.proj_w, to_probs=lambda x: x.permute(0, 3, 1, 2))
                  for block in model.blocks]
        probes += [attn_drop_probe(block.attn, f"blocks_token_only.{i}.attn")
                   for i, block in enumerate(model.blocks_token_only)]
        return probes
