"""A classification head for a headless transformers encoder (``--num-classes`` on ViTModel, CLIP, SigLIP, ...)."""

from __future__ import annotations

import copy

from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.hf_vit import HEADED

# Vision-tower configs that the classification model wraps in its full (vision + text) config class.
_OUTER_CONFIG = {"CLIPVisionModel": "CLIPConfig", "CLIPVisionModelWithProjection": "CLIPConfig",
                 "SiglipVisionModel": "SiglipConfig", "Siglip2VisionModel": "Siglip2Config"}
# Models whose vision tower (``vision_model``) moves into the classifier (a text tower or projection is dropped).
_TOWER_ONLY = ("CLIPModel", "SiglipModel", "Siglip2Model", "CLIPVisionModelWithProjection")


def add_head(model: nn.Module, num_classes: int) -> nn.Module:
    """The ``*ForImageClassification`` model of ``model``'s architecture with its encoder weights and a fresh head."""
    import transformers

    architecture = type(model).__name__
    target = HEADED.get(architecture)
    if target is None:
        raise UnsupportedModelError(f"cbtool cannot add a classification head to {architecture}")
    config = copy.deepcopy(model.config)
    if architecture in _OUTER_CONFIG:
        config = getattr(transformers, _OUTER_CONFIG[architecture])(vision_config=config.to_dict())
    config.num_labels = num_classes
    config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
    config.label2id = {label: i for i, label in config.id2label.items()}
    headed = getattr(transformers, target)(config)
    # CLIPModel / SiglipModel: only the vision tower moves over; the text tower (or the projection) is dropped.
    source = model.vision_model if architecture in _TOWER_ONLY else model
    encoder = next(m for m in headed.modules() if type(m) is type(source) and m is not headed)
    result = encoder.load_state_dict(source.state_dict(), strict=False)
    # A pooler belongs to the head: the encoder's own is dropped, or the classifier's is new (Data2Vec's pool norm).
    unexpected = [key for key in result.unexpected_keys if not key.startswith("pooler.")]
    missing = [key for key in result.missing_keys if not key.startswith("pooler.")]
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise UnsupportedModelError(f"cannot move the {architecture} weights into {target} (e.g. {key})")
    return headed.to(next(model.parameters()).dtype).eval()
