"""Model families behind one interface; ``detect`` picks the adapter for a model."""

from __future__ import annotations

from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import Family, TokenLayout
from cbtool.families.hf_vit import HfViT
from cbtool.families.timm_swin import TimmSwin
from cbtool.families.timm_vit import TimmViT

# Order matters: the more specific adapter first.
FAMILIES: tuple[Family, ...] = (HfViT(), TimmSwin(), TimmViT())

SUPPORTED = (
    "timm VisionTransformer (vit_*, deit3_*, register-token models), VisionTransformerDistilled (deit_*_distilled), "
    "Eva, Beit, SwinTransformer; transformers ViT, DeiT and Dinov2"
)


def detect(model: nn.Module) -> Family:
    """The family adapter for ``model``; a model with no transformer blocks is refused."""
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise UnsupportedModelError(
        f"{type(model).__name__} has no transformer blocks cbtool can rewrite; supported: {SUPPORTED}"
    )


__all__ = ["FAMILIES", "Family", "TokenLayout", "detect", "SUPPORTED"]
