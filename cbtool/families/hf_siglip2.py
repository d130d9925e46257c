"""transformers SigLIP2 (NaFlex): pre-norm CLIP-style layers over patch sequences with padding.

A SigLIP2 vision tower takes no images but patch sequences: ``pixel_values`` (B, N, C * p * p),
``pixel_attention_mask`` (B, N; 0 for padding) and ``spatial_shapes`` (B, 2: each image's patch rows and columns),
as its image processor makes them. cbtool feeds it (B, C, H, W) images of one size (``model_inputs`` cuts them into
patches in the processor's order, every patch valid), and CB is mask-aware, as for timm's NaFlexViT: the token mean
takes in only the tokens the layer's attention mask leaves some query to attend to, so padded inputs that a user
feeds straight from the processor give each image's own result. Attention density reads the same mask: padded
keys do not count in log N and padded queries are not measured.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import allowed_pairs
from cbtool.families.hf_vit import HfViT, _MODELS, _vision_config, attention_mask_argument

_SIGLIP2 = f"{_MODELS}.siglip2.modeling_siglip2"


class HfSiglip2(HfViT):
    name = "hf-siglip2"
    classes = (f"{_SIGLIP2}.Siglip2VisionModel", f"{_SIGLIP2}.Siglip2Model", f"{_SIGLIP2}.Siglip2ForImageClassification")
    cb_semantics = ("mean over one image's valid patch tokens (no class token): padding excluded by the attention "
                    "mask; cbtool feeds square images of the data config's size, all patches valid")
    density_semantics = ("global self-attention over the valid patch tokens; padded keys and queries are not "
                         "measured; distances on the image's patch grid (none for padded inputs)")
    layer_classes = {f"{_SIGLIP2}.Siglip2EncoderLayer": ("self_attn", "mlp")}

    masked_tokens = True

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        patches = int(_vision_config(model).num_patches)
        if math.isqrt(patches) ** 2 != patches:  # the position embeddings are a square grid, resized per image
            raise UnsupportedModelError(f"{type(model).__name__} has num_patches {patches}, not a square number: its "
                                        "position embeddings cannot form the square grid SigLIP2 resizes per image")
        return super().blocks(model)

    def block_mask(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        return attention_mask_argument(args, kwargs)  # Siglip2Encoder: layer(hidden_states, attention_mask, ...)

    def mask_to_allowed(self, mask: Optional[torch.Tensor], probs: torch.Tensor) -> Optional[torch.Tensor]:
        allowed = allowed_pairs(mask)  # a (B, N) padding mask (flash attention): every valid key, for every query
        if allowed is None:
            return None
        valid = allowed.any(dim=-2).any(dim=1)
        return allowed & valid[:, None, :, None]  # a padded query allows no key: it is not measured

    def input_geometry(self, model: nn.Module) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        patch = int(_vision_config(model).patch_size)
        return None, (patch, patch)  # the position embeddings are resized to every image's patch grid

    def input_note(self, model: nn.Module, input_size) -> str | None:
        height, width = int(input_size[-2]), int(input_size[-1])
        return (f"SigLIP2 gets every image resized to {height}x{width} px; its image processor keeps each image's "
                "aspect ratio within max_num_patches patches, so on non-square images the figures differ from the "
                "processor's")

    def model_inputs(self, model: nn.Module, images: torch.Tensor) -> tuple[tuple, dict]:
        return (), patch_inputs(images, int(_vision_config(model).patch_size))


def patch_inputs(images: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """SigLIP2's inputs for (B, C, H, W) images: the patches in the image processor's order, none of them padding.

    Each patch is flattened as (row, column, channel), as ``convert_image_to_patches`` in transformers' SigLIP2
    image processor does, and the patches run row by row.
    """
    if images.ndim != 4:
        raise UnsupportedModelError(f"SigLIP2 inputs are cut from (B, C, H, W) images, not a {images.ndim}-d tensor")
    batch, channels, height, width = images.shape
    if height % patch or width % patch:
        raise UnsupportedModelError(f"{height}x{width} px images do not divide into the model's {patch} px patches")
    rows, cols = height // patch, width // patch
    patches = images.reshape(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
    return {
        "pixel_values": patches.reshape(batch, rows * cols, patch * patch * channels),
        "pixel_attention_mask": torch.ones(batch, rows * cols, dtype=torch.int32, device=images.device),
        "spatial_shapes": torch.tensor([[rows, cols]], dtype=torch.long, device=images.device).repeat(batch, 1),
    }
