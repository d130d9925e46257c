"""Family adapters: detection, blocks, prefix tokens and CB at every position for each supported family."""

from __future__ import annotations

import pytest
import torch

from cbtool.errors import UnsupportedModelError
from cbtool.families import detect
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject

POSITIONS = ("mlp", "attn", "block")
_TINY_HF = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8)  # fmt: skip

# id: (timm name, kwargs on top of the tiny defaults, family, blocks, prefix tokens, image size, block widths)
TIMM_CASES = {
    "vit-registers": ("vit_tiny_patch16_224", {"reg_tokens": 2}, "timm-vit", 3, 3, 32, [32] * 3),
    "vit-4-registers-no-class": (
        "vit_tiny_patch16_224", {"reg_tokens": 4, "class_token": False, "global_pool": "avg"}, "timm-vit", 3, 4, 32,
        [32] * 3,
    ),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}, "timm-vit", 2, 2, 32, [32] * 2),
    "eva02": ("eva02_tiny_patch14_224", {}, "timm-vit", 2, 1, 32, [32] * 2),
    "beit": ("beit_base_patch16_224", {}, "timm-vit", 2, 1, 32, [32] * 2),
    "swin": ("swin_tiny_patch4_window7_224", {}, "timm-swin", 2, 0, 64, [24, 48]),
}
# id: (transformers architecture, prefix tokens, classes)
HF_CASES = {
    "vit": ("ViTForImageClassification", 1, 5),
    "deit-with-teacher": ("DeiTForImageClassificationWithTeacher", 2, 5),
    "dinov2-classifier": ("Dinov2ForImageClassification", 1, 5),
    "dinov2-backbone": ("Dinov2Model", 1, None),
}


def whole_map(t: torch.Tensor) -> torch.Tensor:
    """CB by hand over every token of a (B, N, C) sequence or a (B, H, W, C) map."""
    mean = t.flatten(1, -2).mean(dim=1)
    return 0.5 * t + 0.5 * mean.reshape(t.shape[0], *[1] * (t.ndim - 2), t.shape[-1])


def per_window(t: torch.Tensor, window: int) -> torch.Tensor:
    """The wrong operation: CB within each window x window tile of a (B, H, W, C) map."""
    B, H, W, C = t.shape
    tiles = t.reshape(B, H // window, window, W // window, window, C)
    mean = tiles.mean(dim=(2, 4), keepdim=True).expand_as(tiles).reshape(B, H, W, C)
    return 0.5 * t + 0.5 * mean


@pytest.mark.parametrize("case", TIMM_CASES.values(), ids=TIMM_CASES.keys())
def test_timm_families(timm_model, images, logits, case):
    name, kwargs, family_name, depth, prefix, size, widths = case
    plain = timm_model(name, **kwargs)
    family = detect(plain)
    assert family.name == family_name
    assert len(family.blocks(plain)) == depth
    assert family.num_prefix_tokens(plain) == prefix
    assert family.num_classes(plain) == 5
    assert [family.block_dim(block) for _, block in family.blocks(plain)] == widths
    x = images(size)
    reference = logits(plain, x)
    for position in POSITIONS:
        model = inject(timm_model(name, **kwargs), CBSpec("cbs", position))
        broadcasts = find_broadcasts(model)
        blocks = family.blocks(model)
        assert len(broadcasts) == len(blocks)
        assert all(n.startswith(b + ".") for (n, _), (b, _) in zip(broadcasts, blocks))
        assert [m.scale.numel() for _, m in broadcasts] == widths
        assert (logits(model, x) - reference).abs().max().item() > 1e-4, position


@pytest.mark.parametrize("case", HF_CASES.values(), ids=HF_CASES.keys())
def test_hf_families(hf_model, images, logits, case):
    architecture, prefix, classes = case
    plain = hf_model(architecture, num_hidden_layers=2)
    family = detect(plain)
    assert family.name == "hf-vit"
    assert len(family.blocks(plain)) == 2
    assert family.num_prefix_tokens(plain) == prefix
    assert family.num_classes(plain) == classes
    x = images()
    reference = logits(plain, x)
    for position in POSITIONS:
        model = inject(hf_model(architecture, num_hidden_layers=2), CBSpec("cbs", position))
        assert [m.scale.numel() for _, m in find_broadcasts(model)] == [32, 32]
        assert (logits(model, x) - reference).abs().max().item() > 1e-4, position


@pytest.mark.parametrize("position", POSITIONS)
def test_swin_cb_averages_the_whole_map(timm_model, images, position):
    # Swin attends within 4x4 windows of a 16x16 (then 8x8) map; CB must still average the whole map.
    plain = timm_model("swin_tiny_patch4_window7_224")
    model = inject(timm_model("swin_tiny_patch4_window7_224"), CBSpec(position=position))
    blocks = [block for _, block in detect(model).blocks(model)]
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda _m, args, out, index=index: seen.__setitem__(index, (args[0], out)))
    with torch.no_grad():
        model(images(64))
    assert [seen[i][0].shape[1:3] for i in range(2)] == [(16, 16), (8, 8)]
    for index, (_, block) in enumerate(detect(plain).blocks(plain)):
        x, out = seen[index]
        with torch.no_grad():
            B, H, W, C = x.shape
            a = block._attn(block.norm1(x))
            h = x + (whole_map(a) if position == "attn" else a)
            h = h.reshape(B, -1, C)
            y = block.mlp(block.norm2(h))
            expected = h + (whole_map(y) if position == "mlp" else y)
            expected = expected.reshape(B, H, W, C)
            if position == "block":
                expected = whole_map(expected)
            assert (out - expected).abs().max().item() < 1e-5
            if position == "mlp":
                windowed = (h + per_window(y.reshape(B, H, W, C), 4).reshape(B, -1, C)).reshape(B, H, W, C)
                assert (out - windowed).abs().max().item() > 1e-3


def test_resnet_is_refused_naming_the_supported_families():
    import timm

    model = timm.create_model("resnet50", pretrained=False)
    keys = list(model.state_dict())
    with pytest.raises(UnsupportedModelError) as raised:
        inject(model, CBSpec())
    message = str(raised.value)
    assert message.startswith("ResNet (timm.models.resnet) is not a model class cbtool supports")
    assert "`cbtool families`" in message and "\n" not in message
    assert list(model.state_dict()) == keys and find_broadcasts(model) == []


@pytest.mark.parametrize(
    "model",
    [
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()),
        torch.nn.TransformerEncoderLayer(d_model=8, nhead=2),  # has attention, but not a supported family
    ],
    ids=["sequential", "torch-transformer-layer"],
)
def test_other_modules_are_refused(model):
    with pytest.raises(UnsupportedModelError, match="is not a model class cbtool supports"):
        detect(model)


def test_real_timm_vit_base_structure():
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    family = detect(model)
    blocks = family.blocks(model)
    assert (family.name, len(blocks), family.num_prefix_tokens(model)) == ("timm-vit", 12, 1)
    assert [name for name, _ in blocks] == [f"blocks.{i}" for i in range(12)]
    keys = list(model.state_dict())
    inject(model, CBSpec())
    assert list(model.state_dict()) == keys
    assert [name for name, _ in find_broadcasts(model)] == [f"blocks.{i}.mlp.cb" for i in range(12)]


def test_real_hf_vit_base_structure():
    import transformers

    config = transformers.ViTConfig(num_labels=1000)  # the defaults are google/vit-base-patch16-224's
    assert (config.hidden_size, config.num_hidden_layers, config.patch_size, config.image_size) == (768, 12, 16, 224)
    model = transformers.ViTForImageClassification(config)
    family = detect(model)
    blocks = family.blocks(model)
    assert (family.name, len(blocks), family.num_prefix_tokens(model), family.num_classes(model)) == (
        "hf-vit", 12, 1, 1000,
    )
    assert [name for name, _ in blocks] == [f"vit.layers.{i}" for i in range(12)]
    keys = list(model.state_dict())
    inject(model, CBSpec("cbs", "attn", layers="-2--1"))
    assert set(model.state_dict()) - set(keys) == {"vit.layers.10.attention.cb.scale", "vit.layers.11.attention.cb.scale"}
    assert model.vit.layers[11].attention.cb.scale.shape == (768,)


def test_installed_transformers_is_in_the_supported_range():
    """The transformers layout the HF adapter relies on (layers[i].attention/.mlp) is pinned in pyproject."""
    import tomllib
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (requirement,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["hf"]]
    assert requirement.name == "transformers"
    assert requirement.specifier.contains(transformers.__version__), (requirement, transformers.__version__)
    assert not requirement.specifier.contains("4.57.0")  # the 4.x layout (attention.attention.query) is not supported


def test_vit_mae_with_random_masking_is_refused_and_with_mask_ratio_zero_keeps_grid_order_for_density():
    import transformers

    from cbtool import attention_maps

    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=32, patch_size=8)  # fmt: skip
    model = transformers.ViTMAEModel(config).eval()
    keys = list(model.state_dict())
    with pytest.raises(UnsupportedModelError, match="mask_ratio = 0") as raised:
        inject(model, CBSpec())
    assert "\n" not in str(raised.value) and list(model.state_dict()) == keys and find_broadcasts(model) == []
    model.config.mask_ratio = 0.0
    inject(model, CBSpec("cb", "block"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        grid = model(pixel_values=x, noise=torch.arange(16.0).expand(2, -1), output_attentions=True).attentions
    maps = attention_maps(model, x)  # measured with the patches in grid order, whatever the random shuffle
    assert all(torch.allclose(m, g, atol=1e-6) for m, g in zip(maps, grid))


def test_sam_attn_is_placed_in_global_blocks_and_refused_in_windowed_ones():
    import timm

    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, patch_size=8, embed_dim=32, depth=3,
                              num_heads=2, window_size=4, global_attn_indexes=(1,), neck_chans=16, num_classes=5)
    with pytest.raises(UnsupportedModelError, match="global blocks") as raised:
        inject(model, CBSpec("cb", "attn"))
    assert "\n" not in str(raised.value) and find_broadcasts(model) == []
    inject(model, CBSpec("cbs", "attn", layers="1"))
    assert [name for name, _ in find_broadcasts(model)] == ["blocks.1.ls1.cb"]
    kinds = [layout.kind for layout in detect(model).attention_layouts(model, (64, 64))]
    assert kinds == ["window", "global", "window"]


@pytest.mark.parametrize(("architecture", "config_class", "headed", "config"), [
    ("Data2VecVisionModel", "Data2VecVisionConfig", "Data2VecVisionForImageClassification", {}),
    ("ViTMSNModel", "ViTMSNConfig", "ViTMSNForImageClassification", {}),
    ("IJepaModel", "IJepaConfig", "IJepaForImageClassification", {}),
    ("CLIPVisionModelWithProjection", "CLIPVisionConfig", "CLIPForImageClassification", {"projection_dim": 16}),
])
def test_new_headless_encoders_get_a_head(architecture, config_class, headed, config):
    import transformers

    from cbtool.families.hf_heads import add_head

    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8)  # fmt: skip
    encoder = getattr(transformers, architecture)(getattr(transformers, config_class)(**tiny, **config)).eval()
    model = add_head(encoder, 3)
    assert type(model).__name__ == headed and detect(model).num_classes(model) == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(pixel_values=x).logits.shape == (2, 3)
    tower = encoder.vision_model if hasattr(encoder, "vision_model") else encoder
    moved = next(m for m in model.modules() if type(m) is type(tower))
    for key, value in tower.state_dict().items():
        assert torch.equal(moved.state_dict()[key], value), key


# The new families through a cbtool file: rebuilt offline from the source record, the same outputs.
ROUND_TRIP = {
    "hf-swinv2": ("Swinv2ForImageClassification", "Swinv2Config",
                  dict(image_size=64, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[1, 2], window_size=4,
                       num_labels=5), 64, "attn"),
    "hf-data2vec": ("Data2VecVisionForImageClassification", "Data2VecVisionConfig",
                    dict(_TINY_HF, use_relative_position_bias=True, num_labels=5), 32, "block"),
    "hf-vit-mae": ("ViTMAEModel", "ViTMAEConfig", dict(_TINY_HF, mask_ratio=0.0), 32, "mlp"),
    "hf-dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(_TINY_HF, num_register_tokens=2), 32, "block"),
    "hf-dinov2-backbone": ("Dinov2Backbone", "Dinov2Config", dict(_TINY_HF, out_features=["stage2"]), 32, "block"),
    "timm-relpos": ("vit_relpos_base_patch16_224", None, dict(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                                               num_heads=2, num_classes=5), 32, "attn"),
    "timm-sam": ("samvit_base_patch16", None, dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                  window_size=4, global_attn_indexes=(1,), neck_chans=16,
                                                  num_classes=5), 64, "block"),
    "timm-swinv2-cr": ("swinv2_cr_tiny_224", None, dict(img_size=64, window_size=4, embed_dim=24, depths=(2, 2),
                                                       num_heads=(1, 2), num_classes=5), 64, "attn"),
}


@pytest.mark.parametrize("case", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_new_families_round_trip_through_a_cbtool_file(tmp_path, case):
    import transformers
    from test_family_reference import output, perturbed

    from cbtool.models.checkpoint import load, save
    from cbtool.models.resolve import resolve

    name, config_class, kwargs, size, position = case
    torch.manual_seed(0)
    if config_class is None:
        model = resolve(name, pretrained=False, model_kwargs=kwargs)
    else:
        config = getattr(transformers, config_class)(**kwargs)
        config.architectures = [name]
        config.save_pretrained(tmp_path / "folder")
        model = resolve(str(tmp_path / "folder"), pretrained=False)
    model = inject(perturbed(model), CBSpec("cbs", position))
    path = save(model, tmp_path / "model.safetensors")
    loaded = load(path)
    assert type(loaded) is type(model) and len(find_broadcasts(loaded)) == len(find_broadcasts(model))
    x = torch.randn(2, 3, size, size)
    assert torch.equal(output(loaded, x), output(model, x))
