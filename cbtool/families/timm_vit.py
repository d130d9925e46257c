"""timm's plain Vision Transformers: ViT (CLIP, SigLIP, DINOv2, register, FlexiViT variants), DeiT (distilled),
DeiT3, EVA/EVA02, BEiT and NaFlexViT (mask-aware)."""

from __future__ import annotations

from torch import nn

from cbtool.families.base import NOT_APPLICABLE, TokenLayout, checked_blocks, class_name
from cbtool.families.timm_base import POST_NORM, PRE_NORM, AttentionProbe, TimmFamily, attn_drop_probe, timm_branch

_BLOCKS = {
    "timm.models.vision_transformer.Block": PRE_NORM,
    "timm.models.vision_transformer.ResPostBlock": POST_NORM,
    "timm.models.eva.EvaBlock": PRE_NORM,
    "timm.models.eva.EvaBlockPostNorm": POST_NORM,
    "timm.models.beit.Block": PRE_NORM,
    "timm.models.vision_transformer_relpos.RelPosBlock": PRE_NORM,
    "timm.models.vision_transformer_relpos.ResPostRelPosBlock": POST_NORM,
}

# timm's differential attention (``attn_layer='diff'``: vit_dwee, vit_dlittle) mixes two softmax maps per head.
_DIFFERENTIAL = "timm.layers.diff_attention.DiffAttention"
DIFFERENTIAL_REASON = (
    "differential attention: each head's map is softmax1 - lambda * softmax2, which has negative entries and is no "
    "distribution, so entropy and distance are not defined"
)


def patch_grid(embed: nn.Module, image_size: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """The patch-token grid of ``image_size`` and the pixels per token, from a timm patch embedding."""
    if hasattr(embed, "dynamic_feat_size"):
        rows, cols = embed.dynamic_feat_size(tuple(image_size))
    else:
        patch = embed.patch_size
        patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
        rows, cols = image_size[0] // int(patch[0]), image_size[1] // int(patch[1])
    return (int(rows), int(cols)), image_size[0] / max(int(rows), 1)


class TimmViT(TimmFamily):
    name = "timm-vit"
    classes = (
        "timm.models.vision_transformer.VisionTransformer",
        "timm.models.deit.VisionTransformerDistilled",
        "timm.models.eva.Eva",
        "timm.models.beit.Beit",
        "timm.models.vision_transformer_relpos.VisionTransformerRelPos",
    )
    cb_semantics = "mean over all of one image's tokens (class, distillation and register tokens included)"
    density_semantics = (
        "global self-attention over prefix and patch tokens; distances on the patch grid; differential attention "
        "(attn_layer='diff'): n/a, its maps are no distributions"
    )

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return checked_blocks(type(model).__name__, [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)], _BLOCKS)

    def branch(self, block: nn.Module, position: str):
        return timm_branch(block, position, _BLOCKS[class_name(block)])

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        grid, stride = patch_grid(self._embed(model), image_size)
        prefix = self.num_prefix_tokens(model)
        return [
            TokenLayout(prefix, grid, stride, int(block.attn.num_heads), kind=NOT_APPLICABLE, reason=DIFFERENTIAL_REASON)
            if class_name(block.attn) == _DIFFERENTIAL else TokenLayout(prefix, grid, stride, int(block.attn.num_heads))
            for _, block in self.blocks(model)
        ]

    def probes(self, model: nn.Module) -> list[AttentionProbe | None]:
        # A differential layer's softmaxes are its two components, not its map: it is not measured (None).
        return [None if class_name(block.attn) == _DIFFERENTIAL else attn_drop_probe(block.attn, f"{name}.attn")
                for name, block in self.blocks(model)]

    def _embed(self, model: nn.Module) -> nn.Module:
        return model.patch_embed


class TimmNaFlexViT(TimmViT):
    name = "timm-naflexvit"
    classes = ("timm.models.naflexvit.NaFlexVit",)
    cb_semantics = "mean over one image's valid tokens: padding excluded by the attention mask"
    density_semantics = "global self-attention; entropy over each query's valid keys; distances for image inputs"

    masked_tokens = True

    def _embed(self, model: nn.Module) -> nn.Module:
        return model.embeds

