"""Hugging Face transformers 5.x ViT-style models: ViT, DeiT (with teacher), Dinov2 (layers with attention/mlp)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import AttentionCallback, Family, TokenLayout, find_blocks

_HEAD_NAMES = ("classifier", "cls_classifier", "distillation_classifier")


class HfViT(Family):
    name = "hf-vit"
    description = "transformers ViT, DeiT (with teacher) and Dinov2 models"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and bool(self.blocks(model))

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return find_blocks(model, "attention", "mlp")

    def branch_module(self, block: nn.Module, position: str) -> nn.Module:
        # ViT/DeiT: attention -> dropout -> +residual; Dinov2: attention -> layer_scale -> drop_path -> +residual.
        # CB commutes with the per-channel layer scale and per-sample drop path, so the branch ends at
        # the attention/mlp outputs for every family here.
        return {"mlp": block.mlp, "attn": block.attention, "block": block}[position]

    def block_dim(self, block: nn.Module) -> int:
        return int(block.attention.config.hidden_size)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        embeddings = self._embeddings(model)
        prefix = 1 if getattr(embeddings, "cls_token", None) is not None else 0
        prefix += 1 if getattr(embeddings, "distillation_token", None) is not None else 0
        registers = getattr(embeddings, "register_tokens", None)
        return prefix + (registers.shape[1] if registers is not None else 0)

    def num_classes(self, model: nn.Module) -> int | None:
        if not any(isinstance(getattr(model, name, None), nn.Module) for name in _HEAD_NAMES):
            return None
        return int(model.config.num_labels)

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        heads = [name for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
        if not heads:  # a headless backbone (ViTModel, Dinov2Model)
            raise UnsupportedModelError(
                f"{type(model).__name__} has no classification head; use the *ForImageClassification model"
            )
        for name in heads:
            old = getattr(model, name)
            in_features = old.in_features if isinstance(old, nn.Linear) else _head_in_features(model)
            setattr(model, name, nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity())
        model.config.num_labels = num_classes
        model.config.id2label = {i: f"LABEL_{i}" for i in range(num_classes)}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        return [getattr(model, name) for name in _HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]

    def logits(self, output: object) -> torch.Tensor:
        logits = getattr(output, "logits", None)
        if logits is None:
            raise UnsupportedModelError("this model returns no logits; it needs a classification head")
        return logits

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        patch = int(model.config.patch_size)
        layout = TokenLayout(
            prefix=self.num_prefix_tokens(model),
            grid=(image_size[0] // patch, image_size[1] // patch),
            pixels_per_token=float(patch),
            heads=int(model.config.num_attention_heads),
        )
        return [layout for _ in self.blocks(model)]

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
        # The eager path returns the softmax probabilities as the attention module's second output
        # (dropout is off in eval mode); sdpa/flash return none, so switch for the measurement.
        config = model.config
        previous = config._attn_implementation
        config._attn_implementation = "eager"
        handles = [
            block.attention.register_forward_hook(_report(index, callback))
            for index, (_, block) in enumerate(self.blocks(model))
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            config._attn_implementation = previous

    def _embeddings(self, model: nn.Module) -> nn.Module:
        base = getattr(model, getattr(model, "base_model_prefix", ""), model)
        return getattr(base, "embeddings", base)


def _report(index: int, callback: AttentionCallback):
    def hook(_module: nn.Module, _args: tuple, output: tuple) -> None:
        probs = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if probs is None:
            raise UnsupportedModelError("the attention module returned no probabilities in eager mode")
        callback(index, probs)

    return hook


def _head_in_features(model: nn.Module) -> int:
    return int(model.config.hidden_size)
