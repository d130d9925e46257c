"""The family registry: every model class cbtool supports, the adapter that knows it, and ``detect``.

A model is supported only when its exact class is registered here; nothing is accepted because it
looks like a ViT (``cbtool families`` prints the matrix).
"""

from __future__ import annotations

from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import Branch, Family, Support, TokenLayout, class_name
from cbtool.families.hf_data2vec import HfData2VecVision
from cbtool.families.hf_mae import HfViTMAE
from cbtool.families.hf_siglip2 import HfSiglip2
from cbtool.families.hf_swin import HfSwin
from cbtool.families.hf_swinv2 import HfSwinv2
from cbtool.families.hf_vit import HfViT
from cbtool.families.timm_cait import TimmCaiT
from cbtool.families.timm_pit import TimmPiT
from cbtool.families.timm_sam import TimmSAM
from cbtool.families.timm_swin import TimmSwin, TimmSwinV2Cr
from cbtool.families.timm_vit import TimmNaFlexViT, TimmViT

FAMILIES: tuple[Family, ...] = (
    TimmViT(), TimmNaFlexViT(), TimmCaiT(), TimmPiT(), TimmSAM(), TimmSwin(), TimmSwinV2Cr(),
    HfViT(), HfViTMAE(), HfSiglip2(), HfData2VecVision(), HfSwin(), HfSwinv2(),
)
REGISTRY: dict[str, Family] = {cls: family for family in FAMILIES for cls in family.classes}

SUPPORTED = "; ".join(
    f"{family.library} {', '.join(name.rsplit('.', 1)[-1] for name in family.classes)}" for family in FAMILIES
)


# Why some vision classes of the supported transformers model types are refused (the rest: not registered).
_PRETRAINING = "a masked-image-modeling pre-training model; load its encoder ({}) instead"
_SEGMENTATION = ("a semantic-segmentation model, and cbtool evaluates image classification; load its encoder ({}) "
                 "instead")
REFUSED: dict[str, str] = {
    "ViTForMaskedImageModeling": _PRETRAINING.format("ViTModel"),
    "DeiTForMaskedImageModeling": _PRETRAINING.format("DeiTModel"),
    "SwinForMaskedImageModeling": _PRETRAINING.format("SwinModel"),
    "Swinv2ForMaskedImageModeling": _PRETRAINING.format("Swinv2Model"),
    "ViTMAEForPreTraining": "MAE pre-training (random masking and a decoder); load ViTMAEModel with mask_ratio 0 "
                            "instead (by name or folder, cbtool loads the encoder: add --model-kwargs mask_ratio=0)",
    "BeitForSemanticSegmentation": _SEGMENTATION.format("BeitModel or BeitBackbone"),
    "Data2VecVisionForSemanticSegmentation": _SEGMENTATION.format("Data2VecVisionModel"),
}


def detect(model: nn.Module) -> Family:
    """The family adapter registered for ``model``'s class; any other class is refused in one line."""
    family = REGISTRY.get(class_name(model))
    if family is None:
        name = type(model).__name__
        reason = REFUSED.get(name) if type(model).__module__.startswith("transformers.") else None
        why = reason or ("Context Broadcasting and attention density are defined per family")
        raise UnsupportedModelError(
            f"{name} ({type(model).__module__}) is not a model class cbtool supports: {why}; run `cbtool families` "
            "for the list"
        )
    return family


def require_head(model: nn.Module, name: str = "the model") -> int:
    """The class count of ``model``'s head; a headless model is refused in one line saying how to add one."""
    classes = detect(model).num_classes(model)
    if classes is None:
        raise UnsupportedModelError(
            f"{name} has no classification head; give it one with --num-classes at inject, then finetune")
    return classes


def support_matrix() -> list[Support]:
    """One row per family: library, classes, what CB means and what density means."""
    return [family.support() for family in FAMILIES]


def hf_architectures() -> tuple[str, ...]:
    """The transformers class names cbtool can build and rewrite."""
    return tuple(name.rsplit(".", 1)[-1] for family in FAMILIES if family.library == "transformers"
                 for name in family.classes)


__all__ = ["FAMILIES", "REFUSED", "REGISTRY", "Branch", "Family", "Support", "TokenLayout", "detect",
           "hf_architectures", "require_head", "support_matrix", "SUPPORTED"]
