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

    def output_hook(self, _module: nn.Module, _args: tuple, output: object) -> object:
        """Forward hook: apply the operation to the hooked module's output (the first item of a tuple)."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


class ContextBroadcast(_Broadcast):
    """``cb``: ``y = 0.5 * x + 0.5 * mean_tokens(x)``. No parameters."""

    variant = "cb"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(dim=_token_dims(x), keepdim=True)
        return torch.lerp(x, context, 0.5)


class ScaledContextBroadcast(_Broadcast):
    """``cbs`` (CB_S): ``y = x + s * (mean_tokens(x) - x)`` with ``s`` a learned per-channel vector."""

    variant = "cbs"

    def __init__(self, dim: int, init: float = 0.5) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x.mean(dim=_token_dims(x), keepdim=True)
        return torch.lerp(x, context, self.scale.to(x.dtype))

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
