"""A classification head for a headless transformers encoder (``--num-classes`` on ViTModel, CLIP, SigLIP, ...)."""

from __future__ import annotations

import copy

from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.hf_vit import HEADED

# Vision-tower configs that the classification model wraps in its full (vision + text) config class.
_OUTER_CONFIG = {"CLIPVisionModel": "CLIPConfig", "SiglipVisionModel": "SiglipConfig"}


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
    # CLIPModel / SiglipModel: only the vision tower moves over; the text tower is dropped.
    source = model.vision_model if architecture in ("CLIPModel", "SiglipModel") else model
    encoder = next(m for m in headed.modules() if type(m) is type(source) and m is not headed)
    result = encoder.load_state_dict(source.state_dict(), strict=False)
    unexpected = [key for key in result.unexpected_keys if not key.startswith("pooler.")]
    if result.missing_keys or unexpected:
        key = (result.missing_keys or unexpected)[0]
        raise UnsupportedModelError(f"cannot move the {architecture} weights into {target} (e.g. {key})")
    return headed.to(next(model.parameters()).dtype).eval()
