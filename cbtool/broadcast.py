"""The Context Broadcasting operations: uniform attention as a token mean, mixed back into every token."""

from __future__ import annotations

import torch
from torch import nn


def _token_dims(x: torch.Tensor) -> tuple[int, ...]:
    # (B, N, C) sequences average over N; (B, H, W, C) maps (Swin) over H and W.
    if x.ndim < 3:
        raise ValueError(f"context broadcasting needs (B, tokens..., C) inputs, got shape {tuple(x.shape)}")
    return tuple(range(1, x.ndim - 1))


class _Broadcast(nn.Module):
    """Shared by both variants: how the operation attaches to the module whose output it rewrites."""

    # Set by surgery when the hooked output is a fresh branch output that nothing else reads (the ends of
    # the MLP and attention branches, not a block's output). Without autograd the mix may then overwrite
    # it: the same values, without allocating (and page-faulting) a new activation-sized tensor.
    overwrite_output: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, inplace=False)

    def mix(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        raise NotImplementedError

    def output_hook(self, _module: nn.Module, _args: tuple, output: object) -> object:
        """Forward hook: apply the operation to the hooked module's output (the first item of a tuple)."""
        inplace = self.overwrite_output and not torch.is_grad_enabled()
        if isinstance(output, tuple):
            return (self.mix(output[0], inplace), *output[1:])
        return self.mix(output, inplace)


class ContextBroadcast(_Broadcast):
    """``cb``: ``y = 0.5 * x + 0.5 * mean_tokens(x)``. No parameters."""

    variant = "cb"

    def mix(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        context = x.mean(dim=_token_dims(x), keepdim=True)
        return x.lerp_(context, 0.5) if inplace else torch.lerp(x, context, 0.5)


class ScaledContextBroadcast(_Broadcast):
    """``cbs`` (CB_S): ``y = x + s * (mean_tokens(x) - x)`` with ``s`` a learned per-channel vector."""

    variant = "cbs"

    def __init__(self, dim: int, init: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def mix(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        context = x.mean(dim=_token_dims(x), keepdim=True)
        scale = self.scale.to(x.dtype)
        return x.lerp_(context, scale) if inplace else torch.lerp(x, context, scale)

    def extra_repr(self) -> str:
        return f"dim={self.scale.numel()}"


def make_broadcast(variant: str, dim: int, scale_init: float = 0.5) -> nn.Module:
    """Build the operation for ``variant`` at channel width ``dim``."""
    if variant == "cb":
        return ContextBroadcast()
    if variant == "cbs":
        return ScaledContextBroadcast(dim, scale_init)
    raise ValueError(f"unknown variant {variant!r}")


def is_broadcast(module: nn.Module) -> bool:
    return isinstance(module, _Broadcast)
