"""transformers Swinv2 (post-norm) and the Swin backbone: (B, H * W, C) layers attending within shifted windows.

Swinv2 normalises each branch after it (``layernorm_before`` after the attention, ``layernorm_after`` after the
MLP) and adds it through one ``drop_path`` shared by both branches, so the branch ends are the two LayerNorms.
"""

from __future__ import annotations

from torch import nn

from cbtool.families.base import Branch
from cbtool.families.hf_swin import HfSwin
from cbtool.families.hf_vit import _MODELS

_SWINV2 = f"{_MODELS}.swinv2.modeling_swinv2"


class HfSwinv2(HfSwin):
    name = "hf-swinv2"
    classes = (f"{_SWINV2}.Swinv2Model", f"{_SWINV2}.Swinv2ForImageClassification", f"{_SWINV2}.Swinv2Backbone")
    cb_semantics = "mean over the whole H x W map of the stage (never per window), after the branch's post-norm"
    layer_classes = {f"{_SWINV2}.Swinv2Layer": ("attention", "mlp")}

    def branch(self, block: nn.Module, position: str) -> Branch:
        if position == "block":
            return Branch(block, (1,), tuple_output=True)
        norm = block.layernorm_before if position == "attn" else block.layernorm_after
        return Branch(norm, (1,), norm_end=True)

    def heads(self, block: nn.Module) -> int:
        return int(block.attention.self.num_attention_heads)
