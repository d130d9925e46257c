"""The transformers side of the zoo: every vision class the ``AutoModel*`` mappings list for the model types cbtool
supports is either supported, with a hand-written reference test in ``test_family_reference``, or refused in one
line that says why (and leaves the model untouched)."""

from __future__ import annotations

import pytest
import torch
from test_family_reference import CASES
from test_zoo import refusal

from cbtool.families import REFUSED, REGISTRY

# The model types of the registered transformers classes, and those whose classes cbtool refuses as a whole.
MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model", "siglip",
               "siglip_vision_model", "beit", "swin", "swinv2", "data2vec-vision", "vit_mae", "vit_msn", "ijepa",
               "dinov3_vit", "siglip2", "siglip2_vision_model")  # fmt: skip

_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
_SWIN = dict(image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[1, 2], window_size=4)
_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
_TINY = {"swin": _SWIN, "swinv2": _SWIN, "dinov2": {**_VIT, "mlp_ratio": 2}, "dinov2_with_registers": {**_VIT, "mlp_ratio": 2},
         "clip": dict(vision_config=_VIT, text_config=_TEXT), "siglip": dict(vision_config=_VIT, text_config=_TEXT),
         "siglip2": dict(vision_config=_VIT, text_config=_TEXT)}  # fmt: skip


def auto_classes() -> dict[str, str]:
    """class name -> model type, over every ``MODEL_*_MAPPING_NAMES`` of transformers' auto classes."""
    from transformers.models.auto import modeling_auto

    found: dict[str, str] = {}
    for name in dir(modeling_auto):
        mapping = getattr(modeling_auto, name)
        if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            for model_type in MODEL_TYPES:
                value = mapping.get(model_type)
                for cls in [value] if isinstance(value, str) else list(value or ()):
                    found[cls] = model_type
    return dict(sorted(found.items()))


AUTO = auto_classes()
REGISTERED = {name.rsplit(".", 1)[-1] for name, family in REGISTRY.items() if family.library == "transformers"}


def build(cls: str, model_type: str):
    import transformers

    tiny = _TINY.get(model_type, _VIT)
    if cls.endswith("SemanticSegmentation"):  # the head asks for four distinct feature maps
        tiny = {**tiny, "num_hidden_layers": 4, "out_indices": [1, 2, 3, 4]}
    config = transformers.AutoConfig.for_model(model_type, **tiny)
    if cls.endswith("Backbone"):
        config.out_features = config.stage_names[-1:]
    if model_type == "vit_mae":
        config.mask_ratio = 0.0  # cbtool refuses random masking (tests/test_families.py)
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


def test_every_model_type_and_supported_class_is_in_the_auto_mappings():
    assert set(AUTO.values()) == set(MODEL_TYPES)
    assert set(REFUSED) <= set(AUTO)
    not_auto = REGISTERED - set(AUTO)  # supported, but no AutoModel* mapping lists them
    assert not_auto == {"CLIPVisionModelWithProjection"}


def test_every_supported_transformers_class_has_a_reference_case():
    built = {type(case[0]()).__name__ for case_id, case in CASES.items() if case_id.startswith("hf-")}
    assert REGISTERED - built == set(), "a supported transformers class has no hand-written reference test"


@pytest.mark.parametrize(("cls", "model_type"), AUTO.items(), ids=AUTO.keys())
def test_auto_class_is_supported_or_refused_in_one_line(cls, model_type):
    model = build(cls, model_type)
    if cls in REGISTERED:
        assert refusal(model) is None  # inject accepts it (the reference test checks the values)
        return
    message = refusal(model)  # one line, names the class and `cbtool families`, model untouched
    assert message is not None, f"{cls} is accepted but not registered"
    if cls in REFUSED:
        assert REFUSED[cls] in message
