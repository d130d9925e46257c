"""Build a model's architecture from a source record (timm name and arguments, or a transformers class and
config), offline and with random weights; which transformers classes cbtool builds at all."""

from __future__ import annotations

from typing import Any

from torch import nn

from cbtool.models import provenance
from cbtool.errors import ModelSourceError, UnsupportedModelError, first_line
from cbtool.families import hf_architectures

# transformers classes cbtool builds: exactly those the family registry supports; anything else is refused.
HF_ARCHITECTURES = hf_architectures()
# model_type -> the class to build when a config names no architecture.
_DEFAULT_ARCHITECTURE = {
    "vit": "ViTForImageClassification", "deit": "DeiTForImageClassification", "dinov2": "Dinov2Model",
    "dinov2_with_registers": "Dinov2WithRegistersModel", "beit": "BeitForImageClassification",
    "swin": "SwinForImageClassification", "clip": "CLIPModel", "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipModel", "siglip_vision_model": "SiglipVisionModel", "swinv2": "Swinv2ForImageClassification",
    "data2vec-vision": "Data2VecVisionForImageClassification", "vit_mae": "ViTMAEModel", "vit_msn": "ViTMSNModel",
    "ijepa": "IJepaModel", "dinov3_vit": "DINOv3ViTModel", "siglip2": "Siglip2Model",
    "siglip2_vision_model": "Siglip2VisionModel",
}


def rebuild(record: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture of a source record with random weights, offline."""
    library = record.get("library")
    if library == "timm":
        import timm

        try:
            model = timm.create_model(record["model_name"], pretrained=False, **record.get("model_kwargs", {}))
        except Exception as error:  # whatever the architecture code raises for these arguments
            raise ModelSourceError(f"cannot rebuild timm model {record.get('model_name')!r}: {first_line(error)}") from None
    elif library == "transformers":
        model = build_transformers(record["architecture"], record["config"])
    else:
        raise ModelSourceError(f"unknown model library {library!r} in the source record")
    return provenance.attach(model, source=record)


def import_transformers():
    try:
        import transformers
    except ImportError:
        raise ModelSourceError(
            "Hugging Face models need the transformers package: pip install 'cbtool[hf]'"
        ) from None
    return transformers


# Pre-training classes whose encoder cbtool supports -> (the encoder class, the state-dict prefixes of the
# pre-training head). A Hub or folder name whose config lists one builds the encoder, as ``AutoModel`` does, and
# the head's weights are left out (``pretraining_head``).
PRETRAINING_ENCODERS = {"ViTMAEForPreTraining": ("ViTMAEModel", ("decoder.",))}


def choose_architecture(config, name: str) -> str:
    """The transformers class to build for ``config``: the first supported one its ``architectures`` list, the encoder
    of a pre-training class, or the model type's default; anything else is refused in one line saying why."""
    from cbtool.families import REFUSED

    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures:
        default = _DEFAULT_ARCHITECTURE.get(config.model_type)
        architectures = [default] if default else []
    for architecture in architectures:
        if architecture in HF_ARCHITECTURES:
            return architecture
    for architecture in architectures:
        if architecture in PRETRAINING_ENCODERS:
            return PRETRAINING_ENCODERS[architecture][0]
    for architecture in architectures:
        if architecture in REFUSED:
            raise UnsupportedModelError(f"{name} is a {architecture}, {REFUSED[architecture]}")
    listed = ", ".join(architectures) or config.model_type
    raise UnsupportedModelError(f"{name} is a {listed} model, which cbtool does not support; run `cbtool families` "
                                "for the classes it does")


def pretraining_head(config, architecture: str) -> tuple[str, ...]:
    """The state-dict prefixes of the pre-training head left out when ``architecture`` is built from a checkpoint of
    a pre-training class (``PRETRAINING_ENCODERS``); empty otherwise."""
    listed = list(getattr(config, "architectures", None) or [])
    if architecture not in listed:
        for name in listed:
            encoder, prefixes = PRETRAINING_ENCODERS.get(name, (None, ()))
            if encoder == architecture:
                return prefixes
    return ()


def build_transformers(architecture: str, config: dict) -> nn.Module:
    transformers = import_transformers()
    if architecture not in HF_ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported transformers architecture {architecture!r}")
    config = dict(config)
    model_type = config.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **config)
    return getattr(transformers, architecture)(hf_config)
