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
from cbtool.families.base import CLASS, GLOBAL, NOT_APPLICABLE, WINDOW, TokenLayout, map_pieces


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dim divided by ``log(N)``; shape ``probs.shape[:-1]``."""
    keys = probs.shape[-1]
    if keys < 2:
        return torch.zeros(probs.shape[:-1], dtype=probs.dtype, device=probs.device)
    return torch.special.entr(probs).sum(dim=-1) / math.log(keys)


def _entropy_sums(probs: torch.Tensor, log_keys: torch.Tensor | None = None,
                  scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized entropy summed over images and queries, per head.

    ``log_keys``: per-query ``log(valid keys)`` broadcastable to (batch, heads, queries), with 0 for queries
    that are not measured; None normalises every query by ``log(keys)``. The log is done in place on one
    scratch tensor (1/2 to 2/3 of the time of ``entr`` on CPU); clamping at the smallest normal float makes
    ``p = 0`` contribute 0, as in ``entr``. ``scratch``, a buffer of ``probs``' shape, saves the allocation
    (on the CPU, the page faults of a fresh map-sized tensor cost about as much as the log).
    """
    keys = probs.shape[-1]
    if keys < 2:
        return torch.zeros(probs.shape[1], dtype=probs.dtype, device=probs.device)
    clamped = torch.clamp_min(probs, torch.finfo(probs.dtype).tiny, out=scratch) if scratch is not None else \
        probs.clamp_min(torch.finfo(probs.dtype).tiny)
    entropy = -torch.linalg.vecdot(clamped.log_(), probs)
    if log_keys is None:
        return (entropy / math.log(keys)).sum(dim=(0, 2))
    measured = log_keys > 0
    return torch.where(measured, entropy / torch.where(measured, log_keys, 1.0), 0.0).sum(dim=(0, 2))


def _distance_sums(patch_probs: torch.Tensor, distances: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean distance of each patch query, attention renormalized over patch keys, summed per head.

    ``weight``: each query's attention on the patch keys, where the caller knows it (saves a pass).
    """
    weight = (patch_probs.sum(dim=-1) if weight is None else weight).clamp_min(1e-12)
    per_query = torch.linalg.vecdot(patch_probs, distances) / weight  # (batch, heads, patch queries)
    return per_query.sum(dim=(0, 2))


_CPU_CHUNK_ELEMENTS = 1 << 20  # 4 MB of float32


def _pieces(probs: torch.Tensor) -> list[tuple[slice, slice]]:
    """Cache-sized pieces of maps that exist whole, on the CPU; the whole map elsewhere.

    Reducing a map that does not fit in the CPU caches costs several times more per element (ViT-S at 224 px,
    batch 64: a 60 MB map per layer; at 384 px one image's map alone is 8 MB). On a GPU more pieces would only
    mean more launches.
    """
    if probs.device.type != "cpu" or probs.shape[0] == 0:
        return [(slice(None), slice(None))]
    return map_pieces(*probs.shape, _CPU_CHUNK_ELEMENTS)


@lru_cache(maxsize=16)
def _grid_distances(rows: int, cols: int, pixels: float, device: str) -> torch.Tensor:
    """Pixel distances between the tokens of a rows x cols grid; cached, since every map piece of a layer asks."""
    ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    points = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    return (torch.cdist(points, points) * pixels).float().to(device)


class DensityAccumulator:
    """Collects per-layer, per-head entropy and distance sums from ``capture_attention`` callbacks."""

    def __init__(self, layouts: list[TokenLayout]) -> None:
        self.layouts = layouts
        self.num_layers = len(layouts)
        self._entropy: list[torch.Tensor | None] = [None] * self.num_layers
        self._distance: list[torch.Tensor | None] = [None] * self.num_layers
        self._entropy_count = torch.zeros(self.num_layers, dtype=torch.float64)
        self._distance_count = torch.zeros(self.num_layers, dtype=torch.float64)
        self._scratch: dict[tuple, torch.Tensor] = {}

    @torch.no_grad()
    @torch.compiler.disable  # runs eagerly under --compile: it keeps Python-side sums
    def __call__(self, layer: int, probs: torch.Tensor, allowed: torch.Tensor | None = None,
                 query_offset: int = 0) -> None:
        """Add one layer's maps: all queries, or the queries from ``query_offset`` on (maps fed in query chunks)."""
        layout = self.layouts[layer]
        if layout.kind == NOT_APPLICABLE:
            return
        probs = probs.float()  # (batch, heads, queries, keys)
        log_keys = None
        if allowed is not None:  # masked keys (shifted windows, padding) do not count in log N
            log_keys = allowed.sum(dim=-1, dtype=torch.float32).clamp_min(1.0).log().expand(
                probs.shape[0], -1, probs.shape[2])
        distances = self._distances(layout, probs)
        # A key no query may attend to is padding (NaFlex inputs): the keys are then no image grid, and no
        # distance is measured (shifted-window masks leave every key to some query).
        with_distance = distances is not None and (allowed is None or bool(allowed.any(dim=-2).all()))
        entropy = torch.zeros(probs.shape[1], dtype=torch.float64)
        distance = torch.zeros(probs.shape[1], dtype=torch.float64)
        for images, queries in _pieces(probs):
            part = probs[images, :, queries]
            part_log_keys = None if log_keys is None else log_keys[images, :, queries]
            entropy += _entropy_sums(part, part_log_keys, self._scratch_for(part)).double().cpu()
            if with_distance:
                start = query_offset + (queries.start or 0)  # the first query's index in the whole map
                first = max(start, layout.prefix)  # patch queries only
                stop = start + part.shape[2]
                if first < stop:
                    patch_part = part[:, :, first - start :, layout.prefix :]
                    rows_of = distances[first - layout.prefix : stop - layout.prefix]
                    distance += _distance_sums(patch_part, rows_of).double().cpu()

        measured = probs.shape[0] * probs.shape[2] if log_keys is None else int((log_keys[:, 0] > 0).sum())
        self._add_entropy(layer, entropy, measured)
        if with_distance:
            self._add_distance(layer, distance, probs.shape[0] * _patch_queries(query_offset, probs.shape[2], layout.prefix))

    @torch.no_grad()
    @torch.compiler.disable  # runs eagerly under --compile: it keeps Python-side sums
    def add_scores(self, layer: int, scores: torch.Tensor, query_offset: int = 0) -> None:
        """Add the maps ``softmax(scores)`` of unmasked attention from the pre-softmax scores (rows from ``query_offset``).

        ``scores`` may be overwritten.
        """
        scores = scores.float()
        self.add_softmax(layer, scores, torch.softmax(scores, dim=-1, out=self._scratch_for(scores)), query_offset)

    @torch.no_grad()
    @torch.compiler.disable  # runs eagerly under --compile: it keeps Python-side sums
    def add_softmax(self, layer: int, scores: torch.Tensor, probs: torch.Tensor, query_offset: int = 0) -> None:
        """Add unmasked maps ``probs = softmax(scores)`` given with their float32 scores (rows from ``query_offset``).

        The entropy is ``log Z - p . (s - max s)``, and ``log Z = -log(max p)`` since the largest entry is
        ``exp(0) / Z``: two dot products per map entry and no log of the map, its costliest step. Shifting by
        the row's maximum first keeps peaked rows exact (``log Z + max s - p . s`` loses the digits of
        ``max s``). ``scores`` is overwritten (the products are formed in it: no map-sized buffer is allocated).
        """
        layout = self.layouts[layer]
        if layout.kind == NOT_APPLICABLE:
            return
        keys = scores.shape[-1]
        shifted = scores.sub_(scores.amax(dim=-1, keepdim=True))
        entropy = probs.amax(dim=-1).log_().neg_().sub_(shifted.mul_(probs).sum(dim=-1))
        self._add_entropy(layer, (entropy / math.log(keys)).sum(dim=(0, 2)) if keys > 1 else entropy.zero_().sum(dim=(0, 2)),
                          scores.shape[0] * scores.shape[2])
        distances = self._distances(layout, scores)
        first = max(query_offset, layout.prefix)
        stop = query_offset + scores.shape[2]
        if distances is not None and first < stop:
            rows = distances[first - layout.prefix : stop - layout.prefix]
            patch_probs = probs[:, :, first - query_offset :, layout.prefix :]
            weighted = torch.mul(patch_probs, rows, out=scores[:, :, first - query_offset :, layout.prefix :])
            per_query = weighted.sum(dim=-1).div_(patch_probs.sum(dim=-1).clamp_min_(1e-12))
            self._add_distance(layer, per_query.sum(dim=(0, 2)), scores.shape[0] * (stop - first))

    def _distances(self, layout: TokenLayout, maps: torch.Tensor) -> torch.Tensor | None:
        """Pixel distances between patch tokens for this layer's key grid, or None where they are not defined."""
        patches = maps.shape[-1] - layout.prefix
        rows, cols = _grid_for(patches, layout)
        if layout.kind == CLASS or rows * cols != patches or patches < 1 or maps.shape[2] > maps.shape[3]:
            return None
        return _grid_distances(rows, cols, float(layout.pixels_per_token), str(maps.device))

    def _add_entropy(self, layer: int, sums: torch.Tensor, count: int) -> None:
        sums = sums.double().cpu()
        self._entropy[layer] = sums if self._entropy[layer] is None else self._entropy[layer] + sums
        self._entropy_count[layer] += count

    def _add_distance(self, layer: int, sums: torch.Tensor, count: int) -> None:
        sums = sums.double().cpu()
        self._distance[layer] = sums if self._distance[layer] is None else self._distance[layer] + sums
        self._distance_count[layer] += count

    def _scratch_for(self, part: torch.Tensor) -> torch.Tensor:
        """A reusable buffer of ``part``'s shape (the maps arrive in pieces of a few shapes)."""
        key = (tuple(part.shape), part.dtype, part.device)
        scratch = self._scratch.get(key)
        if scratch is None:
            if len(self._scratch) > 8:
                self._scratch.clear()
            scratch = self._scratch[key] = torch.empty(part.shape, dtype=part.dtype, device=part.device)
        return scratch

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


def _patch_queries(offset: int, count: int, prefix: int) -> int:
    """How many of the queries ``offset .. offset + count - 1`` are patch tokens (index >= prefix)."""
    return max(0, offset + count - max(offset, prefix))


def _grid_for(patches: int, layout: TokenLayout) -> tuple[int, int]:
    """The layout's grid, or a square when it names none. A grid that does not hold the keys (padding tokens after
    the patches) gives (0, 0): no distance is measured rather than one on a made-up grid."""
    if layout.grid:
        return layout.grid if layout.grid[0] * layout.grid[1] == patches else (0, 0)
    side = math.isqrt(max(patches, 0))
    return side, side
