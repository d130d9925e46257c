"""transformers ViTMAEModel: ViT layers behind MAE's random masking, which cbtool only accepts switched off.

MAE's embeddings keep a random ``1 - mask_ratio`` of the patches and shuffle them in every forward. With
``mask_ratio = 0`` no patch is dropped and the encoder sees all of them in a random order: CB's token mean and the
attention entropy do not depend on the order, and while attention is measured the patches are kept in grid order
(MAE's own ``noise`` argument) so that distances are read on the right grid.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import AttentionCallback
from cbtool.families.hf_vit import HfViT, _MODELS


class HfViTMAE(HfViT):
    name = "hf-vit-mae"
    classes = (f"{_MODELS}.vit_mae.modeling_vit_mae.ViTMAEModel",)
    cb_semantics = "mean over the class token and every patch (mask_ratio must be 0: no patch is dropped)"
    density_semantics = "global self-attention over the class and patch tokens, measured with the patches in grid order"

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        ratio = float(getattr(model.config, "mask_ratio", 0.0))
        if ratio > 0:
            raise UnsupportedModelError(
                f"{type(model).__name__} drops a random {ratio:g} of the patches in every forward (MAE pre-training), "
                "so CB would average a different subset each call; set model.config.mask_ratio = 0 "
                "(on the command line: --model-kwargs mask_ratio=0)"
            )
        return super().blocks(model)

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback,
                          query_chunks: bool = False) -> Iterator[None]:
        handle = model.embeddings.register_forward_pre_hook(_grid_order, with_kwargs=True)
        try:
            with super().capture_attention(model, callback, query_chunks):
                yield
        finally:
            handle.remove()


def _grid_order(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Give MAE's random shuffle increasing noise (the identity permutation) where the caller gave none."""
    if kwargs.get("noise") is not None or len(args) > 1:
        return None
    pixels = args[0] if args else kwargs["pixel_values"]
    patches = _patches(_module, pixels)
    noise = torch.arange(patches, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], -1)
    return args, {**kwargs, "noise": noise}


def _patches(embeddings: nn.Module, pixels: torch.Tensor) -> int:
    patch = embeddings.patch_embeddings.patch_size
    patch = patch if isinstance(patch, (tuple, list)) else (patch, patch)
    return (pixels.shape[-2] // int(patch[0])) * (pixels.shape[-1] // int(patch[1]))
