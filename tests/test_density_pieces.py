"""Density from timm's plain attention answered in pieces: the maps' pieces, the reduction from scores and
probabilities, and the model's output, against the library's own explicit path."""

from __future__ import annotations

import copy

import pytest
import torch

from cbtool.families import detect, timm_base
from cbtool.families.base import TokenLayout, map_pieces
from cbtool.metrics import DensityAccumulator
from tests.test_density import BUILDERS, IMAGE, cbtool_density, images, reference_density, reference_maps, set_qk

TIMM_PLAIN = ["timm-vit", "timm-vit-registers", "timm-deit-distilled"]
PER_IMAGE = 3 * 65 * 65  # heads x tokens x tokens of the test ViT (32 px, patch 4, one class token)


@pytest.mark.parametrize(
    ("shape", "elements"),
    [
        ((5, 3, 65, 65), 1 << 20),  # every image in one piece
        ((5, 3, 65, 65), 2 * PER_IMAGE),  # two images a piece, one left over
        ((5, 3, 65, 65), PER_IMAGE - 1),  # one image, rows: 64 rows, then 1
        ((2, 3, 65, 65), 3 * 65 * 7),  # seven rows a piece, the last piece shorter
        ((2, 3, 65, 65), 1),  # below one row: one row a piece
        ((0, 3, 65, 65), 1 << 20),  # no images, no pieces
    ],
)
def test_map_pieces_cover_every_image_and_query_once(shape, elements):
    batch, heads, queries, keys = shape
    seen = torch.zeros(batch, queries, dtype=torch.long)
    for images_, rows in map_pieces(batch, heads, queries, keys, elements):
        seen[images_, rows] += 1
        piece = len(range(batch)[images_]) * heads * len(range(queries)[rows]) * keys
        assert piece <= max(elements, heads * keys)
    assert bool((seen == 1).all())


@pytest.mark.parametrize(
    ("scale", "prefix"),
    [(1.0, 0), (1.0, 1), (8.0, 1), (8.0, 5), (400.0, 0), (400.0, 1)],
    ids=["flat", "flat-cls", "peaked-cls", "peaked-prefix-5", "near-one-hot", "near-one-hot-cls"],
)
def test_softmax_reduction_matches_the_maps(scale, prefix):
    """``add_softmax`` (entropy from ``log Z = -log max p``, no log of the map) against ``entr`` on the maps.

    Scores of hundreds (near-one-hot rows) keep their entropy to 1e-7; the distance, renormalised over patch
    keys, needs the patch keys' share above 1e-12, which holds up to the scale of 8 with prefix tokens.
    """
    layout = TokenLayout(prefix=prefix, grid=(4, 4), pixels_per_token=8.0, heads=2)
    scores = torch.randn(3, 2, 16 + prefix, 16 + prefix, generator=torch.Generator().manual_seed(2)) * scale
    probs = torch.softmax(scores, dim=-1)
    from_scores, from_maps = DensityAccumulator([layout]), DensityAccumulator([layout])
    from_scores.add_softmax(0, scores[:, :, :7].clone(), probs[:, :, :7].clone())  # in two query chunks
    from_scores.add_scores(0, scores[:, :, 7:].clone(), query_offset=7)
    from_maps(0, probs)
    expected_entropy, expected_distance = reference_density([probs.double()], [layout])
    for result in (from_scores.result(), from_maps.result()):
        assert result["entropy_per_layer_head"][0] == pytest.approx(expected_entropy[0], abs=1e-7)
        if prefix == 0 or scale <= 8:
            assert result["distance_per_layer_head"][0] == pytest.approx(expected_distance[0], rel=1e-5)


@pytest.mark.parametrize("elements", [1 << 20, 2 * PER_IMAGE, 3 * 65 * 10], ids=["whole", "two-images", "ten-rows"])
@pytest.mark.parametrize("family", TIMM_PLAIN)
def test_pieces_match_the_library_maps_and_output(family, elements, monkeypatch):
    monkeypatch.setattr(timm_base, "_CPU_CHUNK_ELEMENTS", elements)
    model = set_qk(BUILDERS[family](), scale=12.0)
    x = images()
    density = cbtool_density(model, x, batch_size=5)
    entropy, distance = reference_density(reference_maps(model, x), detect(model).attention_layouts(model, (IMAGE, IMAGE)))
    for layer in range(len(entropy)):
        assert density["entropy_per_layer_head"][layer] == pytest.approx(entropy[layer], abs=1e-6)
        assert density["distance_per_layer_head"][layer] == pytest.approx(distance[layer], rel=1e-5)

    explicit = copy.deepcopy(model)
    for module in explicit.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    family_ = detect(model)
    with torch.inference_mode():
        expected = explicit(x)
        with family_.capture_attention(model, DensityAccumulator(family_.attention_layouts(model, (IMAGE, IMAGE))),
                                       query_chunks=True):
            found = model(x)
        after = model(x)
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)  # the fused kernel again, no mode left behind
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_ctrl_c_inside_a_layer_leaves_no_interception_behind():
    """A KeyboardInterrupt skips always_call hooks; the capture's exit still takes its mode off the stack."""
    model = set_qk(BUILDERS[TIMM_PLAIN[0]](), scale=12.0)
    family = detect(model)

    def interrupt(*_):
        raise KeyboardInterrupt

    handle = model.blocks[0].attn.k_norm.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        with family.capture_attention(model, DensityAccumulator(family.attention_layouts(model, (IMAGE, IMAGE))),
                                      query_chunks=True):
            model(images())
    handle.remove()
    assert not torch.overrides._is_torch_function_mode_enabled()
