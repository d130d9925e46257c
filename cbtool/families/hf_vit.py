"""Hugging Face transformers 5.x vision transformers: ViT, DeiT (with teacher), Dinov2 (with registers),
the CLIP and SigLIP vision towers, and BEiT. Swin lives in ``hf_swin``, SigLIP2 (patch-sequence inputs) in
``hf_siglip2``."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import AttentionCallback, Branch, Family, TokenLayout, class_name

_HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier")
_MODELS = "transformers.models"

# Encoder layer class -> (attention child, MLP child). All are pre-norm: the branch ends at these modules'
# outputs, before the layer scale / dropout / drop path that follow (each commutes with a token mean).
_LAYERS = {
    f"{_MODELS}.vit.modeling_vit.ViTLayer": ("attention", "mlp"),
    f"{_MODELS}.deit.modeling_deit.DeiTLayer": ("attention", "mlp"),
    f"{_MODELS}.dinov2.modeling_dinov2.Dinov2Layer": ("attention", "mlp"),
    f"{_MODELS}.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersLayer": ("attention", "mlp"),
    f"{_MODELS}.clip.modeling_clip.CLIPEncoderLayer": ("self_attn", "mlp"),
    f"{_MODELS}.siglip.modeling_siglip.SiglipEncoderLayer": ("self_attn", "mlp"),
    f"{_MODELS}.beit.modeling_beit.BeitLayer": ("attention", "mlp"),
    f"{_MODELS}.vit_msn.modeling_vit_msn.ViTMSNLayer": ("attention", "mlp"),
    f"{_MODELS}.ijepa.modeling_ijepa.IJepaLayer": ("attention", "mlp"),
    f"{_MODELS}.vit_mae.modeling_vit_mae.ViTMAELayer": ("attention", "mlp"),
    f"{_MODELS}.dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayer": ("attention", "mlp"),
}

# Headless encoder -> the classification model of the same architecture (``--num-classes`` adds a head).
HEADED = {
    "ViTModel": "ViTForImageClassification",
    "DeiTModel": "DeiTForImageClassification",
    "Dinov2Model": "Dinov2ForImageClassification",
    "Dinov2WithRegistersModel": "Dinov2WithRegistersForImageClassification",
    "BeitModel": "BeitForImageClassification",
    "SwinModel": "SwinForImageClassification",
    "CLIPVisionModel": "CLIPForImageClassification",
    "CLIPModel": "CLIPForImageClassification",
    "SiglipVisionModel": "SiglipForImageClassification",
    "SiglipModel": "SiglipForImageClassification",
    "ViTMSNModel": "ViTMSNForImageClassification",
    "IJepaModel": "IJepaForImageClassification",
    "Data2VecVisionModel": "Data2VecVisionForImageClassification",
    "Swinv2Model": "Swinv2ForImageClassification",
    "CLIPVisionModelWithProjection": "CLIPForImageClassification",
    "Siglip2VisionModel": "Siglip2ForImageClassification",
    "Siglip2Model": "Siglip2ForImageClassification",
}

# The embeddings transformers keeps free of weight decay.
_NO_DECAY_LEAVES = {"cls_token", "position_embeddings", "register_tokens", "mask_token", "class_embedding",
                    "distillation_token"}  # fmt: skip


def _classes(*pairs: tuple[str, str]) -> tuple[str, ...]:
    return tuple(f"{_MODELS}.{module}.{name}" for module, names in pairs for name in names.split())


class HfViT(Family):
    name = "hf-vit"
    library = "transformers"
    classes = _classes(
        ("vit.modeling_vit", "ViTForImageClassification ViTModel"),
        ("deit.modeling_deit", "DeiTForImageClassification DeiTForImageClassificationWithTeacher DeiTModel"),
        ("dinov2.modeling_dinov2", "Dinov2ForImageClassification Dinov2Model Dinov2Backbone"),
        ("dinov2_with_registers.modeling_dinov2_with_registers",
         "Dinov2WithRegistersForImageClassification Dinov2WithRegistersModel Dinov2WithRegistersBackbone"),
        ("clip.modeling_clip", "CLIPVisionModel CLIPVisionModelWithProjection CLIPModel CLIPForImageClassification"),
        ("siglip.modeling_siglip", "SiglipVisionModel SiglipModel SiglipForImageClassification"),
        ("beit.modeling_beit", "BeitForImageClassification BeitModel BeitBackbone"),
        ("vit_msn.modeling_vit_msn", "ViTMSNForImageClassification ViTMSNModel"),
        ("ijepa.modeling_ijepa", "IJepaForImageClassification IJepaModel"),
        ("dinov3_vit.modeling_dinov3_vit", "DINOv3ViTModel DINOv3ViTBackbone"),
    )
    cb_semantics = "mean over all of one image's tokens (class, distillation and register tokens included)"
    density_semantics = "global self-attention over prefix and patch tokens; distances on the patch grid"
    layer_classes = _LAYERS

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        root_name, root = _vision_root(model)
        prefix = f"{root_name}." if root_name else ""
        found = [(prefix + name, m) for name, m in root.named_modules() if class_name(m) in self.layer_classes]
        if not found:
            raise UnsupportedModelError(f"{type(model).__name__} has no encoder layers cbtool knows")
        return found

    def branch(self, block: nn.Module, position: str) -> Branch:
        if position == "block":
            return Branch(block, (1,), tuple_output=False)
        attention, mlp = self.layer_classes[class_name(block)]
        if position == "attn":
            return Branch(getattr(block, attention), (1,), tuple_output=True)
        return Branch(getattr(block, mlp), (1,))

    def block_dim(self, block: nn.Module) -> int:
        return int(_vision_config(block).hidden_size)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        embeddings = self._embeddings(model)
        prefix = 1 if getattr(embeddings, "cls_token", None) is not None else 0
        prefix += 1 if getattr(embeddings, "class_embedding", None) is not None else 0  # CLIP
        prefix += 1 if getattr(embeddings, "distillation_token", None) is not None else 0
        registers = getattr(embeddings, "register_tokens", None)
        return prefix + (registers.shape[1] if registers is not None else 0)

    def no_weight_decay_names(self, model: nn.Module) -> set[str]:
        names = super().no_weight_decay_names(model)
        return names | {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES}

    def num_classes(self, model: nn.Module) -> int | None:
        if not self.head_modules(model):
            return None
        return int(model.config.num_labels)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        heads = [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
        if not heads:
            raise UnsupportedModelError(
                f"{type(model).__name__} has no classification head; pass --num-classes N to add one"
            )
        for name in heads:
            old = getattr(model, name)
            in_features = old.in_features if isinstance(old, nn.Linear) else _vision_config(model).hidden_size
            setattr(model, name, nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity())
        model.config.num_labels = num_classes
        model.config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(model, name) for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]

    def input_geometry(self, model: nn.Module) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        config = _vision_config(model)
        if getattr(config, "patch_size", None) is None:
            return None, None
        patch = (int(config.patch_size),) * 2
        if getattr(config, "model_type", None) in ("dinov2", "dinov2_with_registers", "dinov3_vit"):
            return None, patch  # interpolates its position embeddings (DINOv3: rotary, any grid)
        return (int(getattr(config, "image_size", 224)),) * 2, patch

    def head_prefixes(self, model: nn.Module) -> list[str]:
        return [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]

    def logits(self, output: object) -> torch.Tensor:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise UnsupportedModelError("this model returns no logits; it needs a classification head (--num-classes N)")
        return logits

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        config = _vision_config(model)
        patch = int(config.patch_size)
        layout = TokenLayout(self.num_prefix_tokens(model), (image_size[0] // patch, image_size[1] // patch),
                             float(patch), int(config.num_attention_heads))
        return [layout for _ in self.blocks(model)]

    def entry(self, model: nn.Module) -> nn.Module:
        if isinstance(getattr(model, "text_model", None), nn.Module):  # CLIPModel / SiglipModel: the vision tower
            return model.vision_model
        return model

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that return ``(output, probabilities)`` on the eager path, one per layer."""
        return [getattr(block, self.layer_classes[class_name(block)][0]) for _, block in self.blocks(model)]

    def mask_to_allowed(self, mask: Optional[torch.Tensor], probs: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback,
                          query_chunks: bool = False) -> Iterator[None]:
        # The eager path returns the softmax probabilities as the attention module's second output
        # (dropout is off in eval mode); sdpa/flash return none, so switch every config for the measurement.
        configs = {id(c): c for m in model.modules() if _is_config(c := getattr(m, "config", None))}
        previous = {key: config._attn_implementation for key, config in configs.items()}
        for config in configs.values():
            config._attn_implementation = "eager"
        handles = []
        for index, attention in enumerate(self.attention_modules(model)):
            mask: list[Optional[torch.Tensor]] = [None]
            handles.append(attention.register_forward_pre_hook(_remember_mask(mask), with_kwargs=True))
            handles.append(attention.register_forward_hook(_report(index, callback, mask, self.mask_to_allowed)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for key, config in configs.items():
                config._attn_implementation = previous[key]

    def _embeddings(self, model: nn.Module) -> nn.Module:
        for _, module in _vision_root(model)[1].named_modules():
            if type(module).__name__.endswith("Embeddings") and "Patch" not in type(module).__name__:
                return module
        return model


def _vision_root(model: nn.Module) -> tuple[str, nn.Module]:
    """CLIP and SigLIP models hold a text tower too: only the vision tower is searched for layers and embeddings."""
    if isinstance(getattr(model, "vision_model", None), nn.Module):
        return "vision_model", model.vision_model
    return "", model


def _is_config(value: object) -> bool:
    return value is not None and hasattr(value, "_attn_implementation") and hasattr(value, "to_dict")


def _vision_config(module: nn.Module):
    config = module.config if hasattr(module, "config") else None
    if config is None:  # a layer: find the config on one of its children
        config = next(m.config for m in module.modules() if _is_config(getattr(m, "config", None)))
    return getattr(config, "vision_config", None) or config


def attention_mask_argument(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The ``attention_mask`` a transformers layer or attention module is called with (keyword or second argument)."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if torch.is_tensor(mask) else None


def _remember_mask(store: list):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        store[0] = attention_mask_argument(args, kwargs)
        if "output_attentions" in kwargs:  # layers written before transformers 5 return the maps only when asked
            return args, {**kwargs, "output_attentions": True}
        return None

    return hook


def _report(index: int, callback: AttentionCallback, mask: list, to_allowed):
    def hook(_module: nn.Module, _args: tuple, output: tuple) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise UnsupportedModelError("the attention module returned no probabilities in eager mode")
        callback(index, probs, to_allowed(mask[0], probs))

    return hook
