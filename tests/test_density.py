"""Attention density: cbtool's entropy and distance against maps read the libraries' own ways.

The references are timm's ``AttentionExtract(method='hook')`` on a copy with ``fused_attn=False`` and
transformers' ``output_attentions=True`` on a copy with eager attention; the metrics are then computed
here by hand from the maps, with the definitions of ``cbtool/metrics/density.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cbtool.evaluation import evaluate
from cbtool.families import detect
from cbtool.metrics import DensityAccumulator, normalized_entropy
from cbtool.families.base import TokenLayout

IMAGE = 32
PATCH = 4


# ----- models ------------------------------------------------------------------------------------------
def timm_vit(**overrides):
    import timm

    kwargs = dict(img_size=IMAGE, patch_size=PATCH, depth=3, embed_dim=48, num_heads=3, num_classes=10)
    kwargs.update(overrides)
    name = kwargs.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def timm_swin():
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=10, img_size=IMAGE, window_size=4,
        embed_dim=24, depths=(2, 2), num_heads=(1, 2),
    ).eval()  # fmt: skip


def hf_model(kind: str = "vit"):
    import transformers

    common = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=48, num_hidden_layers=3, num_attention_heads=3, num_labels=10)
    if kind == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(intermediate_size=96, **common)).eval()
    return transformers.Dinov2ForImageClassification(transformers.Dinov2Config(mlp_ratio=2, **common)).eval()


BUILDERS = {
    "timm-vit": lambda: timm_vit(),
    "timm-vit-registers": lambda: timm_vit(reg_tokens=4, no_embed_class=True),
    "timm-deit-distilled": lambda: timm_vit(name="deit_tiny_distilled_patch16_224"),
    "timm-swin": timm_swin,
    "hf-vit": lambda: hf_model("vit"),
    "hf-dinov2": lambda: hf_model("dinov2"),
}
VIT_LIKE = [name for name in BUILDERS if name != "timm-swin"]


def qk_linears(model) -> list[tuple[torch.nn.Linear, slice]]:
    """(linear, output rows) that make queries and keys, for timm's fused qkv and transformers' q/k_proj."""
    found = []
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj")):
            found.append((module, slice(None)))
        elif name.endswith("attn.qkv"):
            found.append((module, slice(0, 2 * module.out_features // 3)))
    assert found, "no query/key projections found"
    return found


@torch.no_grad()
def set_qk(model, *, scale: float):
    """Multiply query and key weights and biases by ``scale`` (0 makes every attention map uniform)."""
    for linear, rows in qk_linears(model):
        linear.weight[rows] *= scale
        if linear.bias is not None:
            linear.bias[rows] *= scale
    return model


def images(count: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def cbtool_density(model, x: torch.Tensor, batch_size: int = 2) -> dict:
    labels = torch.zeros(len(x), dtype=torch.long)
    batches = [(x[i : i + batch_size], labels[i : i + batch_size], torch.arange(i, min(i + batch_size, len(x))))
               for i in range(0, len(x), batch_size)]  # fmt: skip
    (result,) = evaluate([model], batches, density=True, progress=False)
    return result.density


# ----- references -----------------------------------------------------------------------------------
def reference_maps(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Each attention layer's probabilities, (batch [x windows], heads, queries, keys), read by the library itself."""
    reference = copy.deepcopy(model)
    if type(model).__module__.startswith("transformers."):
        reference.set_attn_implementation("eager")
        with torch.no_grad():
            return list(reference(pixel_values=x, output_attentions=True).attentions)
    from timm.utils import AttentionExtract

    for module in reference.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    with torch.no_grad():
        return list(AttentionExtract(reference, method="hook")(x).values())


def grid_distances(rows: int, cols: int, pixels: float) -> torch.Tensor:
    points = [(r, c) for r in range(rows) for c in range(cols)]
    return torch.tensor([[math.hypot(r1 - r2, c1 - c2) * pixels for r2, c2 in points] for r1, c1 in points], dtype=torch.float64)


def window_masks(model) -> list[torch.Tensor | None]:
    """Each Swin block's shifted-window mask (windows, N, N), 0 where a key is allowed; None elsewhere."""
    return [getattr(block, "attn_mask", None) for _, block in detect(model).blocks(model)]


def reference_density(maps: list[torch.Tensor], layouts: list[TokenLayout], masks=None) -> tuple[list[list[float]], list[list[float]]]:
    """Per-layer, per-head normalized entropy and mean attention distance, by hand from the maps.

    With a window mask, each query's entropy is normalised by the log of its count of allowed keys.
    """
    entropy, distance = [], []
    for probs, layout, mask in zip(maps, layouts, masks or [None] * len(maps)):
        probs = probs.double()
        keys = probs.shape[-1]
        logs = torch.where(probs > 0, probs.log(), torch.zeros_like(probs))
        if mask is None:
            log_n = torch.full(probs.shape[:-1], math.log(keys), dtype=torch.float64)
        else:
            counts = (mask == 0).sum(-1).double()  # (windows, queries)
            log_n = counts.log().repeat(probs.shape[0] // mask.shape[0], 1).unsqueeze(1).expand(probs.shape[:-1])
        entropy.append((-(probs * logs).sum(-1) / log_n).mean(dim=(0, 2)).tolist())
        patch = probs[:, :, layout.prefix :, layout.prefix :]
        patch = patch / patch.sum(-1, keepdim=True)  # renormalized over patch keys
        rows, cols = layout.grid
        distance.append((patch * grid_distances(rows, cols, layout.pixels_per_token)).sum(-1).mean(dim=(0, 2)).tolist())
    return entropy, distance


def uniform_distance(rows: int, cols: int, pixels: float) -> float:
    """Mean distance between two patches of a rows x cols grid: what uniform attention gives."""
    return grid_distances(rows, cols, pixels).mean().item()


# ----- the metric itself --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        ([0.25, 0.25, 0.25, 0.25], 1.0),
        ([0.5, 0.5], 1.0),
        ([1.0, 0.0, 0.0, 0.0], 0.0),
        ([0.5, 0.5, 0.0, 0.0], 0.5),  # log 2 / log 4
        ([1.0], 0.0),  # a single key carries no information
    ],
)
def test_normalized_entropy(probs, expected):
    assert normalized_entropy(torch.tensor([probs])).item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("chunk_elements", [1 << 20, 2 * 17 * 17, 3 * 2 * 17 * 17 - 1], ids=["whole", "per-image", "uneven"])
def test_accumulator_sums_batches_like_one_batch(chunk_elements, monkeypatch):
    from cbtool.metrics import density

    monkeypatch.setattr(density, "_CPU_CHUNK_ELEMENTS", chunk_elements)  # the CPU reduces maps in cache-sized pieces
    layout = TokenLayout(prefix=1, grid=(4, 4), pixels_per_token=8.0, heads=2)
    probs = torch.softmax(torch.randn(5, 2, 17, 17, generator=torch.Generator().manual_seed(1)) * 3, dim=-1)
    probs[0, 0, 0, :3] = 0.0  # exact zeros contribute nothing, as in entr
    whole, parts = DensityAccumulator([layout]), DensityAccumulator([layout])
    whole(0, probs)
    parts(0, probs[:2])
    parts(0, probs[2:])
    expected_entropy, expected_distance = reference_density([probs], [layout])
    for result in (whole.result(), parts.result()):
        assert result["entropy_per_layer_head"][0] == pytest.approx(expected_entropy[0], abs=1e-6)
        assert result["distance_per_layer_head"][0] == pytest.approx(expected_distance[0], rel=1e-6)


def test_layer_never_seen_is_none():
    layout = TokenLayout(prefix=0, grid=(2, 2), pixels_per_token=1.0, heads=1)
    accumulator = DensityAccumulator([layout, layout])
    accumulator(1, torch.full((1, 1, 4, 4), 0.25))
    result = accumulator.result()
    assert result["entropy_per_layer"] == [None, pytest.approx(1.0)]
    assert result["entropy_mean"] == pytest.approx(1.0)


# ----- against the libraries ---------------------------------------------------------------------
@pytest.mark.parametrize("family", VIT_LIKE)
def test_zero_queries_and_keys_give_uniform_attention(family):
    model = set_qk(BUILDERS[family](), scale=0.0)
    density = cbtool_density(model, images())
    blocks = len(detect(model).blocks(model))
    assert len(density["entropy_per_layer"]) == len(density["distance_per_layer"]) == blocks
    for heads in density["entropy_per_layer_head"]:
        assert heads == pytest.approx([1.0] * len(heads), abs=1e-6)
    assert density["entropy_mean"] == pytest.approx(1.0, abs=1e-6)
    grid = IMAGE // PATCH
    assert density["distance_mean"] == pytest.approx(uniform_distance(grid, grid, PATCH), rel=1e-5)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("scale", [1.0, 12.0])
def test_density_matches_library_attention_maps(family, scale):
    model = set_qk(BUILDERS[family](), scale=scale)
    x = images()
    density = cbtool_density(model, x)
    maps = reference_maps(model, x)
    layouts = detect(model).attention_layouts(model, (IMAGE, IMAGE))
    assert len(maps) == len(layouts) == len(detect(model).blocks(model)) == len(density["entropy_per_layer"])
    entropy, distance = reference_density(maps, layouts, window_masks(model))
    for layer in range(len(maps)):
        assert density["entropy_per_layer_head"][layer] == pytest.approx(entropy[layer], abs=1e-6)
        assert density["distance_per_layer_head"][layer] == pytest.approx(distance[layer], rel=1e-5)
        assert density["entropy_per_layer"][layer] == pytest.approx(sum(entropy[layer]) / len(entropy[layer]), abs=1e-6)
    if scale > 1:  # a model with peaked attention reads clearly below uniform
        assert density["entropy_mean"] < 0.9


def test_swin_windows():
    model = set_qk(timm_swin(), scale=0.0)
    with torch.no_grad():
        for name, table in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                table.zero_()  # with zero queries and keys, only the position bias is left to shape attention
    blocks = detect(model).blocks(model)
    density = cbtool_density(model, images())
    assert len(density["entropy_per_layer"]) == len(blocks) == 4
    assert [len(h) for h in density["entropy_per_layer_head"]] == [1, 1, 2, 2]
    # Uniform attention inside a 4x4 window: stage 1 tokens are 4 px apart, stage 2 tokens 8 px.
    assert density["distance_per_layer"][0] == pytest.approx(uniform_distance(4, 4, 4.0), rel=1e-5)
    assert density["distance_per_layer"][2] == pytest.approx(uniform_distance(4, 4, 8.0), rel=1e-5)
    assert any(max(block.shift_size) > 0 for _, block in blocks)
    # Shifted windows mask some keys out; uniform attention over the allowed keys reads 1.0 in every layer.
    assert density["entropy_per_layer"] == pytest.approx([1.0] * 4, abs=1e-6)
    assert density["layer_kinds"] == ["window"] * 4


# ----- switches are put back --------------------------------------------------------------------
def _attention_flags(model) -> list:
    if type(model).__module__.startswith("transformers."):
        return [model.config._attn_implementation]
    return [module.__dict__.get("fused_attn", "unset") for module in model.modules() if hasattr(module, "attn_drop")]


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("fails", [False, True], ids=["ok", "loader-raises"])
def test_attention_switches_are_restored(family, fails):
    model = BUILDERS[family]()
    before = _attention_flags(model)
    assert before and "unset" not in before

    def batches():
        yield images(2), torch.zeros(2, dtype=torch.long), torch.arange(2)
        if fails:
            raise RuntimeError("disk went away")

    if fails:
        with pytest.raises(RuntimeError, match="disk went away"):
            evaluate([model], batches(), density=True, progress=False)
    else:
        evaluate([model], batches(), density=True, progress=False)
    assert _attention_flags(model) == before
    hooks = [m for m in model.modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooks == []


def test_explicit_user_setting_survives():
    model = timm_vit()
    model.blocks[0].attn.fused_attn = False  # a user's choice, not timm's default
    evaluate([model], [(images(2), torch.zeros(2, dtype=torch.long), torch.arange(2))], density=True, progress=False)
    assert [block.attn.fused_attn for block in model.blocks] == [False, True, True]


def test_density_does_not_change_predictions():
    model = set_qk(timm_vit(), scale=8.0)
    x = images(6)
    batches = [(x, torch.arange(6) % 10, torch.arange(6))]
    plain = evaluate([model], batches, density=False, progress=False)[0]
    measured = evaluate([model], batches, density=True, progress=False)[0]
    assert measured.metrics["correct"] == plain.metrics["correct"]
    assert measured.metrics["loss"] == pytest.approx(plain.metrics["loss"], rel=1e-5)
    assert plain.density is None and measured.density is not None
