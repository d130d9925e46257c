"""timm transformers whose blocks have ``attn`` and ``mlp`` children: ViT, DeiT (distilled), Eva, BEiT, and kin."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import AttentionCallback, Family, TokenLayout, find_blocks


class TimmViT(Family):
    name = "timm-vit"
    description = "timm VisionTransformer, VisionTransformerDistilled, Eva, Beit and other blocks with attn/mlp"

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("timm.") and bool(self.blocks(model))

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return find_blocks(model, "attn", "mlp")

    def branch_module(self, block: nn.Module, position: str) -> nn.Module:
        # timm: x = x + drop_path(ls(attn(norm(x)))); the branch ends at attn / mlp, before layer scale.
        return {"mlp": block.mlp, "attn": block.attn, "block": block}[position]

    def block_dim(self, block: nn.Module) -> int:
        norm = getattr(block, "norm1", None)
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        fc2 = getattr(block.mlp, "fc2", None)
        if isinstance(fc2, nn.Linear):
            return fc2.out_features
        raise UnsupportedModelError(f"cannot tell the channel width of block {type(block).__name__}")

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))

    def num_classes(self, model: nn.Module) -> int | None:
        n = getattr(model, "num_classes", None)
        return int(n) if n else None

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        model.reset_classifier(num_classes)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        head = model.get_classifier()
        heads = list(head) if isinstance(head, (tuple, list)) else [head]  # distilled models have two
        return [h for h in heads if isinstance(h, nn.Module)]

    def _attention_modules(self, model: nn.Module) -> list[nn.Module]:
        modules = []
        for name, block in self.blocks(model):
            attn = block.attn
            if not isinstance(getattr(attn, "attn_drop", None), nn.Module):
                raise UnsupportedModelError(
                    f"attention module {name}.attn ({type(attn).__name__}) has no attn_drop, "
                    "so its probabilities cannot be captured"
                )
            modules.append(attn)
        return modules

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
        stride = float(patch[0] if isinstance(patch, (tuple, list)) else patch)
        grid = (image_size[0] // int(stride), image_size[1] // int(stride))
        prefix = self.num_prefix_tokens(model)
        return [
            TokenLayout(prefix=prefix, grid=grid, pixels_per_token=stride, heads=int(attn.num_heads))
            for attn in self._attention_modules(model)
        ]

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
        with ExitStack() as stack:
            for index, attn in enumerate(self._attention_modules(model)):
                stack.enter_context(_explicit_attention(attn, index, callback))
            yield


@contextmanager
def _explicit_attention(attn: nn.Module, index: int, callback: AttentionCallback) -> Iterator[None]:
    """Route ``attn`` through its explicit softmax path and report the probabilities entering ``attn_drop``."""
    had_flag = "fused_attn" in attn.__dict__
    previous = attn.__dict__.get("fused_attn")
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_pre_hook(lambda _module, args: callback(index, args[0]))
    try:
        yield
    finally:
        handle.remove()
        if had_flag:
            attn.fused_attn = previous
        else:
            del attn.fused_attn
