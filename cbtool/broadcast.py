"""The Context Broadcasting operations: uniform attention as a token mean, mixed back into every token.

An operation is registered as the child ``cb`` of the module whose output it rewrites (the end of a
branch) and applied there by a forward hook. The hooks are plain typed functions that reach the
operation as ``module.cb``, so a CB model stays traceable (``torch.fx``, timm's feature extraction,
``torch.compile``, ``torch.export``) and, at the ``mlp`` and ``attn`` positions, scriptable
(``torch.jit.script``; TorchScript types a hook by its module's full signature, and a timm block, whose
signature has ``attn_mask`` and ``is_causal``, is called with ``x`` alone, so no hook on a block can be scripted).
"""

from typing import Any, List, Optional, Tuple

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

# The child name of the operation on its hooked module: cbs scales are saved as ``<module>.cb.scale``.
CHILD_NAME = "cb"


def _tracing() -> bool:
    """True while torch.fx traces: a traced graph may later run with autograd, so it must not mix in place."""
    return is_fx_symbolic_tracing()


class _Broadcast(nn.Module):
    """Shared by both variants: the token mean over ``token_dims`` and how it is mixed into the output.

    token_dims: the dims of one image's tokens in the hooked output: ``[1]`` for (B, N, C) sequences,
        ``[1, 2]`` for (B, H, W, C) maps (Swin). Fixed at injection, so tracing sees no shape checks.
    overwrite_output: set when the hooked output is a fresh branch output that nothing else reads (the ends
        of the MLP and attention branches, not a block's output). Without autograd the mix then overwrites
        it: the same values, without allocating (and page-faulting) a new activation-sized tensor.
    token_weights: set per forward for families with padding tokens (NaFlexViT): (B, N, 1), 1 for the
        tokens that count in the mean; None averages every token.
    ramping, ramp: while ``ramping`` (``finetune --cb-ramp``), the mixing weight is multiplied by the 0-dim
        buffer ``ramp`` in [0, 1]: 0 leaves the output unchanged. A tensor, so a compiled model does not
        recompile as it rises; not persistent, so a saved model always has the full weight.
    """

    token_weights: Optional[torch.Tensor]

    def __init__(self, token_dims: Tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.token_dims: List[int] = [int(d) for d in token_dims]
        self.overwrite_output = False
        self.token_weights = None
        self.ramping = False
        self.register_buffer("ramp", torch.ones(()), persistent=False)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """The uniform-attention output: the mean of one image's (valid) tokens, broadcast over them."""
        weights = self.token_weights
        if weights is None:
            return x.mean(dim=self.token_dims, keepdim=True)
        weights = weights.to(x.dtype)
        return (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x, False)

    @torch.jit.unused
    def set_ramp(self, factor: Optional[float]) -> None:
        """Scale the mixing weight by ``factor`` in [0, 1]; None restores the full weight."""
        self.ramping = factor is not None
        self.ramp.fill_(1.0 if factor is None else float(factor))

    def apply_to_output(self, x: torch.Tensor) -> torch.Tensor:
        """The operation as the hook applies it: in place where that is safe."""
        inplace = self.overwrite_output and not torch.is_grad_enabled()
        if inplace and not torch.jit.is_scripting():
            inplace = not _tracing()
        return self.mix(x, inplace)

    def mix(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"token_dims={tuple(self.token_dims)}"


class ContextBroadcast(_Broadcast):
    """``cb``: ``y = 0.5 * x + 0.5 * mean_tokens(x)``. No parameters."""

    variant = "cb"

    def mix(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        context = self.context(x)
        if self.ramping:
            return torch.lerp(x, context, self.ramp.to(x.dtype) * 0.5)
        if inplace:
            return x.lerp_(context, 0.5)
        return torch.lerp(x, context, 0.5)


class ScaledContextBroadcast(_Broadcast):
    """``cbs`` (CB_S): ``y = x + s * (mean_tokens(x) - x)`` with ``s`` a learned per-channel vector."""

    variant = "cbs"

    def __init__(self, dim: int, init: float = 0.5, token_dims: Tuple[int, ...] = (1,)) -> None:
        super().__init__(token_dims)
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def mix(self, x: torch.Tensor, inplace: bool) -> torch.Tensor:
        context = self.context(x)
        scale = self.scale.to(x.dtype)
        if self.ramping:
            scale = scale * self.ramp.to(x.dtype)
        if inplace:
            return x.lerp_(context, scale)
        return torch.lerp(x, context, scale)

    def extra_repr(self) -> str:
        return f"dim={self.scale.numel()}, token_dims={tuple(self.token_dims)}"


def tensor_output_hook(module: nn.Module, args: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    """Forward hook for modules that return a tensor (timm): apply ``module.cb`` to it."""
    return module.cb.apply_to_output(output)


def tuple_output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook for modules that return a tuple whose first item is the branch output (transformers)."""
    if isinstance(output, tuple):
        return (module.cb.apply_to_output(output[0]), *output[1:])
    return module.cb.apply_to_output(output)


class BranchEnd(nn.Module):
    """Stands in for a parameterless ``torch.nn`` module (``Identity``, ``Dropout``) that ends a branch.

    torch.fx treats ``torch.nn`` modules as leaves and drops their hooks; this module is not a leaf, so
    the CB hook on it is traced. It adds no state-dict keys, and ``remove`` puts the original back.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def make_broadcast(variant: str, dim: int, scale_init: float = 0.5, token_dims: Tuple[int, ...] = (1,)) -> nn.Module:
    """Build the operation for ``variant`` at channel width ``dim``."""
    if variant == "cb":
        return ContextBroadcast(token_dims)
    if variant == "cbs":
        return ScaledContextBroadcast(dim, scale_init, token_dims)
    raise ValueError(f"unknown variant {variant!r}")


def is_broadcast(module: nn.Module) -> bool:
    return isinstance(module, _Broadcast)
