"""Attention rollout (Abnar & Zuidema, 2020): attention flowed through the residual stream, layer by layer.

Rollout assumes every layer is global self-attention over one fixed token set with a residual connection
around it (``0.5 * A + 0.5 * I``), which holds for plain ViTs only: Swin (windows, patch merging), PiT
(pooling changes the tokens) and CaiT (class attention, talking heads) are refused in one line.

By default nothing is discarded, as in Abnar & Zuidema. A ``discard_ratio`` above 0 is the variant of
jacobgil/vit-explain: in each layer's head-fused map the weakest ``int(ratio * N * N)`` entries are zeroed,
except the class token's attention to itself (entry [0, 0]). Unlike vit-explain's code, the rows are then
renormalised (its ``a / a.sum(dim=-1)`` broadcasts to divide column j by row j's sum) and every image of a batch
is discarded alike (it discards in the first image only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cbtool.errors import VizError
from cbtool.families import TokenLayout, detect
from cbtool.viz.views import HEAD_FUSIONS, over_patches

ROLLOUT_FAMILIES = ("timm-vit", "hf-vit")


def check_rollout(model: nn.Module, label: str = "the model") -> None:
    """Refuse, in one line, a model whose family rollout is not defined for."""
    family = detect(model)
    if family.name not in ROLLOUT_FAMILIES:
        raise VizError(f"attention rollout is defined for residual ViTs with global attention ({', '.join(ROLLOUT_FAMILIES)}); "
                       f"{label} is {family.name}")


def check_rollout_options(head_fusion: str | None = None, discard_ratio: float | None = None, *,
                          rollout: bool = True) -> tuple[str, float]:
    """The head fusion and discard ratio rollout is drawn with (``None``: mean, 0), checked: the one check of
    them, for the command, ``VizOptions`` and :func:`attention_rollout` alike. One ``VizError`` line for a fusion
    rollout does not define, a ratio outside [0, 1), or either of them set to another value than its default when no
    rollout is drawn."""
    if not rollout:  # the defaults themselves change nothing: VizOptions(rollout=True) can be replace()d without
        given = [flag for flag, value, default in (("--head-fusion", head_fusion, "mean"),
                                                   ("--discard-ratio", discard_ratio, 0.0))
                 if value is not None and value != default]
        if given:
            raise VizError(f"{given[0]} sets how attention rollout is drawn; add --rollout, or drop {given[0]}")
    head_fusion = "mean" if head_fusion is None else head_fusion
    discard_ratio = 0.0 if discard_ratio is None else discard_ratio
    if head_fusion not in HEAD_FUSIONS[:3]:
        raise VizError(f"rollout fuses heads by mean, max or min (--head-fusion), not {head_fusion!r}")
    if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) or not 0.0 <= discard_ratio < 1.0:
        raise VizError(f"--discard-ratio must be in [0, 1), not {discard_ratio}")
    return head_fusion, float(discard_ratio)


def attention_rollout(maps: Sequence[torch.Tensor], layouts: Sequence[TokenLayout], *, head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """(batch, rows, cols): the class token's (else the mean token's) rolled-out attention over the patches.

    ``maps`` are every layer's probabilities from the first layer on. Per layer the heads are fused (mean, max
    or min); with ``discard_ratio`` > 0 the weakest entries of each image's map are zeroed (vit-explain's variant:
    the class token's attention to itself is kept); the identity is added for the residual, and the rows are
    renormalised. ``discard_ratio=0`` (the default) is Abnar & Zuidema's rollout.
    """
    check_rollout_options(head_fusion, discard_ratio)
    if not maps:
        raise VizError("rollout needs the maps of every layer")
    if any(layout.kind != "global" for layout in layouts) or len({m.shape[-1] for m in maps}) > 1:
        raise VizError("rollout needs global attention over the same tokens in every layer")
    batch, tokens = maps[0].shape[0], maps[0].shape[-1]
    identity = torch.eye(tokens, dtype=torch.float64, device=maps[0].device)
    result = identity.expand(batch, tokens, tokens)
    for probs in maps:
        fused = probs.double().mean(dim=1) if head_fusion == "mean" else (
            probs.double().amax(dim=1) if head_fusion == "max" else probs.double().amin(dim=1))
        if discard_ratio > 0:
            flat = fused.reshape(batch, -1)
            weakest = flat.topk(int(flat.shape[1] * discard_ratio), dim=1, largest=False).indices
            drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, weakest, True)
            if layouts[0].prefix > 0:
                drop[:, 0] = False  # the class token's attention to itself, as vit-explain keeps it
            fused = flat.masked_fill(drop, 0.0).view_as(fused)
        mixed = 0.5 * fused + 0.5 * identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        result = mixed @ result
    layout = layouts[0]
    row = result[:, 0] if layout.prefix > 0 else result.mean(dim=1)
    return over_patches(row.unsqueeze(1), layout)[:, 0].float()
