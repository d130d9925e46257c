"""Attention density: normalized entropy and mean attention distance, accumulated batch by batch.

Normalized entropy, for each image, head and query: ``-sum_j p_j log p_j / log(N)`` with N keys
(1.0 is uniform attention, 0.0 one-hot). Mean attention distance, for patch queries: the distance in
pixels to the patch keys, weighted by the attention renormalized over those keys. Only per-head sums
are kept, never the maps.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from cbtool.distributed import all_reduce_sum
from cbtool.families.base import CLASS, GLOBAL, NOT_APPLICABLE, WINDOW, TokenLayout


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dim divided by ``log(N)``; shape ``probs.shape[:-1]``."""
    keys = probs.shape[-1]
    if keys < 2:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    return torch.special.entr(probs).sum(dim=-1) / math.log(keys)


def _entropy_sums(probs: torch.Tensor, log_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized entropy summed over images and queries, per head.

    ``log_keys``: per-query ``log(valid keys)`` broadcastable to (batch, heads, queries), with 0 for queries
    that are not measured; None normalises every query by ``log(keys)``. The log is done in place on one
    scratch tensor (1/2 to 2/3 of the time of ``entr`` on CPU); clamping at the smallest normal float makes
    ``p = 0`` contribute 0, as in ``entr``.
    """
    keys = probs.shape[-1]
    if keys < 2:
        return torch.zeros(probs.shape[1], dtype=probs.dtype, device=probs.device)
    entropy = -probs.clamp_min(torch.finfo(probs.dtype).tiny).log_().mul_(probs).sum(dim=-1)
    if log_keys is None:
        return (entropy / math.log(keys)).sum(dim=(0, 2))
    measured = log_keys > 0
    return torch.where(measured, entropy / torch.where(measured, log_keys, 1.0), 0.0).sum(dim=(0, 2))


def _distance_sums(patch_probs: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Mean distance of each patch query, attention renormalized over patch keys, summed per head."""
    weight = patch_probs.sum(dim=-1).clamp_min(1e-12)
    per_query = (patch_probs * distances).sum(dim=-1) / weight  # (batch, heads, patch queries)
    return per_query.sum(dim=(0, 2))


_CPU_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32


def _pieces(probs: torch.Tensor) -> list[tuple[slice, slice]]:
    """(images, queries) slices that cut the maps into cache-sized pieces on the CPU; the whole map elsewhere.

    Reducing a map that does not fit in the CPU caches costs several times more per element (ViT-S at 224 px,
    batch 64: a 60 MB map per layer; at 384 px one image's map alone is 8 MB), so large maps are cut by
    images and, when one image is too large, by queries. On a GPU more pieces would only mean more launches.
    """
    batch, _heads, queries, _keys = probs.shape
    if probs.device.type != "cpu" or batch == 0:
        return [(slice(None), slice(None))]
    per_query = max(1, probs[0, :, 0].numel())
    query_step = max(1, min(queries, _CPU_CHUNK_ELEMENTS // per_query))
    image_step = max(1, _CPU_CHUNK_ELEMENTS // (per_query * queries)) if query_step == queries else 1
    return [(slice(b, b + image_step), slice(q, q + query_step))
            for b in range(0, batch, image_step) for q in range(0, queries, query_step)]


@lru_cache(maxsize=16)
def _grid_distances(rows: int, cols: int, device: str) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    return torch.cdist(points, points).float().to(device)


class DensityAccumulator:
    """Collects per-layer, per-head entropy and distance sums from ``capture_attention`` callbacks."""

    def __init__(self, layouts: list[TokenLayout]) -> None:
        self.layouts = layouts
        self.num_layers = len(layouts)
        self._entropy: list[torch.Tensor | None] = [None] * self.num_layers
        self._distance: list[torch.Tensor | None] = [None] * self.num_layers
        self._entropy_count = torch.zeros(self.num_layers, dtype=torch.float64)
        self._distance_count = torch.zeros(self.num_layers, dtype=torch.float64)

    @torch.no_grad()
    def __call__(self, layer: int, probs: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        layout = self.layouts[layer]
        if layout.kind == NOT_APPLICABLE:
            return
        probs = probs.float()  # (batch, heads, queries, keys)
        log_keys = None
        if allowed is not None:  # masked keys (shifted windows, padding) do not count in log N
            log_keys = allowed.sum(dim=-1, dtype=torch.float32).clamp_min(1.0).log().expand(
                probs.shape[0], -1, -1)
        patches = probs.shape[-1] - layout.prefix
        rows, cols = _grid_for(patches, layout)
        with_distance = layout.kind != CLASS and rows * cols == patches >= 1 and probs.shape[2] == probs.shape[3]
        if with_distance:
            distances = _grid_distances(rows, cols, str(probs.device)) * layout.pixels_per_token
        entropy = torch.zeros(probs.shape[1], dtype=torch.float64)
        distance = torch.zeros(probs.shape[1], dtype=torch.float64)
        for images, queries in _pieces(probs):
            part = probs[images, :, queries]
            part_log_keys = None if log_keys is None else log_keys[images, :, queries]
            entropy += _entropy_sums(part, part_log_keys).double().cpu()
            if with_distance:
                start = queries.start or 0
                first = max(start, layout.prefix)  # patch queries only
                stop = start + part.shape[2]
                if first < stop:
                    patch_part = part[:, :, first - start :, layout.prefix :]
                    rows_of = distances[first - layout.prefix : stop - layout.prefix]
                    distance += _distance_sums(patch_part, rows_of).double().cpu()

        measured = probs.shape[0] * probs.shape[2] if log_keys is None else int((log_keys[:, 0] > 0).sum())
        self._entropy[layer] = entropy if self._entropy[layer] is None else self._entropy[layer] + entropy
        self._entropy_count[layer] += measured
        if with_distance:
            self._distance[layer] = distance if self._distance[layer] is None else self._distance[layer] + distance
            self._distance_count[layer] += probs.shape[0] * patches

    def result(self) -> dict:
        """Per-layer and per-head means reduced over ranks; ``None`` entries for layers never seen."""
        entropy = self._reduce(self._entropy, self._entropy_count)
        distance = self._reduce(self._distance, self._distance_count)
        per_layer = [sum(h) / len(h) if h else None for h in entropy]
        per_layer_distance = [sum(h) / len(h) if h else None for h in distance]
        # The means cover self-attention (global or windowed); class-attention layers have one query each.
        self_attention = [layout.kind in (GLOBAL, WINDOW) for layout in self.layouts]
        seen = [v for v, use in zip(per_layer, self_attention) if v is not None and use]
        seen_distance = [v for v, use in zip(per_layer_distance, self_attention) if v is not None and use]
        return {
            "layer_kinds": [layout.kind for layout in self.layouts],
            "not_applicable": {str(i): layout.reason for i, layout in enumerate(self.layouts)
                               if layout.kind == NOT_APPLICABLE},
            "entropy_mean": sum(seen) / len(seen) if seen else None,
            "entropy_per_layer": per_layer,
            "entropy_per_layer_head": entropy,
            "distance_mean": sum(seen_distance) / len(seen_distance) if seen_distance else None,
            "distance_per_layer": per_layer_distance,
            "distance_per_layer_head": distance,
        }

    def _reduce(self, sums: list[torch.Tensor | None], counts: torch.Tensor) -> list[list[float]]:
        # Ranks must reduce tensors of one shape, also for layers a rank never saw.
        heads = max((layout.heads for layout in self.layouts), default=0)
        stacked = torch.zeros(self.num_layers, heads, dtype=torch.float64)
        for layer, values in enumerate(sums):
            if values is not None:
                stacked[layer, : values.numel()] = values
        stacked = all_reduce_sum(stacked)
        counts = all_reduce_sum(counts.clone())
        return [
            (stacked[layer, : self.layouts[layer].heads] / counts[layer]).tolist() if counts[layer] > 0 else []
            for layer in range(self.num_layers)
        ]


def _grid_for(patches: int, layout: TokenLayout) -> tuple[int, int]:
    if layout.grid and layout.grid[0] * layout.grid[1] == patches:
        return layout.grid
    side = math.isqrt(max(patches, 0))
    return side, side
