"""The timm zoo: every architecture module is either refused in one line or supported, and then CB really works.

One model per timm architecture module (the smallest by a cheap name heuristic) is built on the meta device, so
nothing is allocated. ``cbtool.surgery.inject`` must either refuse it with a one-line ``UnsupportedModelError``
naming the class and pointing to ``cbtool families`` (leaving the model untouched), or accept it, in which case its
module must be listed in ``EXPECTED_SUPPORTED`` (a newly accepted class fails here until it is reviewed) and a tiny
real build must change its output under CB, with the output shape unchanged.
"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
from timm.models._registry import _model_to_module
from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families import detect
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, spec_of

SEED = 0
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
TINY_SWIN = dict(img_size=64, window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2), num_classes=5)

# Size words in the order a smaller model is preferred; short words must be a whole name token (``s24``, ``ti``).
SIZE_WORDS = ("atto", "femto", "pico", "nano", "tiny", "ti", "xxs", "xs", "small", "s")


def size_rank(name: str) -> tuple[int, int, str]:
    """Sort key for "smallest model" without building: ``test_*`` first, then the size words, then short names."""
    if name.startswith("test_"):
        return (0, len(name), name)
    tokens = re.split(r"[_\-.]", name)
    for rank, word in enumerate(SIZE_WORDS, start=1):
        if len(word) > 2 and word in name or any(re.fullmatch(rf"{word}\d*", token) for token in tokens):
            return (rank, len(name), name)
    return (len(SIZE_WORDS) + 1, len(name), name)


def smallest_per_module() -> dict[str, str]:
    by_module: dict[str, list[str]] = {}
    for name in timm.list_models():
        by_module.setdefault(_model_to_module[name], []).append(name)
    return {module: min(names, key=size_rank) for module, names in sorted(by_module.items())}


ZOO = smallest_per_module()

# timm module -> kwargs for a tiny real build of that module's smallest model. Only these modules may be supported:
# a module whose smallest model cbtool newly accepts fails test_zoo_module until it is reviewed and listed here.
EXPECTED_SUPPORTED: dict[str, dict] = {
    "beit": TINY,                                   # beit_base_patch16_224 -> Beit
    "cait": TINY,                                   # cait_xxs24_224 -> Cait
    "deit": TINY,                                   # deit_tiny_patch16_224 -> VisionTransformer
    "eva": TINY,                                    # eva02_tiny_patch14_224 -> Eva
    "naflexvit": TINY,                              # naflexvit_base_patch16_gap -> NaFlexVit
    "pit": dict(img_size=64, num_classes=5),        # pit_ti_224 -> PoolingVisionTransformer
    "swin_transformer": TINY_SWIN,                  # swin_s3_tiny_224 -> SwinTransformer
    "swin_transformer_v2": TINY_SWIN,               # swinv2_tiny_window8_256 -> SwinTransformerV2
    "vision_transformer": dict(img_size=32, num_classes=5),  # test_vit -> VisionTransformer
    "vision_transformer_hybrid": dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5),
    # vit_tiny_r_s16_p8_224 -> VisionTransformer with a ResNet stem
    "vitamin": dict(img_size=32, depth=2, num_classes=5),   # vitamin_small_224 -> VisionTransformer (MbConv stem)
    "vision_transformer_relpos": dict(img_size=32, num_classes=5),  # test_vit_relpos -> VisionTransformerRelPos
    "vision_transformer_sam": dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                                   global_attn_indexes=(1,), neck_chans=16, global_pool="avg", num_classes=5),
    # samvit_base_patch16 -> VisionTransformerSAM (the default spec: mlp, every block)
    "swin_transformer_v2_cr": TINY_SWIN,            # swinv2_cr_tiny_224 -> SwinTransformerV2Cr
}

# The timm ViT variants people use, built tiny: (name, kwargs).
VARIANTS = {
    "clip": ("vit_base_patch16_clip_224", TINY),
    "siglip": ("vit_base_patch16_siglip_224", TINY),
    "dinov2": ("vit_small_patch14_dinov2", TINY),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", TINY),
    "flexivit": ("flexivit_small", TINY),
    "deit3": ("deit3_small_patch16_224", TINY),
    "eva02": ("eva02_tiny_patch14_224", TINY),
    "naflexvit": ("naflexvit_base_patch16_gap", TINY),
    "hybrid-r50": ("vit_base_r50_s16_224", dict(img_size=32, embed_dim=32, depth=2, num_heads=2, num_classes=5)),
}

REFUSED = (
    "mobilevit_xxs", "xcit_nano_12_p16_224", "volo_d1_224", "nest_tiny", "twins_svt_small", "gcvit_xxtiny",
    "maxvit_tiny_tf_224", "pvt_v2_b0", "mvitv2_tiny", "davit_tiny", "tiny_vit_5m_224", "hiera_tiny_224",
)


def build_meta(name: str, **kwargs) -> nn.Module:
    """``name`` on the meta device (no memory, no init cost); skip only when timm itself cannot build it."""
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as error:  # noqa: BLE001 - timm's own failure, not cbtool's
        pytest.skip(f"timm cannot build {name} on the meta device: {type(error).__name__}: {error}")


def build_real(name: str, **kwargs) -> nn.Module:
    """A real, seeded, perturbed (nothing zero-initialised), float32, eval-mode model."""
    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False, **kwargs)
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model.float().eval()


def snapshot(model: nn.Module) -> tuple:
    """Everything inject could change: module tree, parameter/buffer names, hooks, attributes of the root."""
    modules = tuple((name, type(module)) for name, module in model.named_modules())
    keys = tuple(model.state_dict().keys())
    hooks = tuple((len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules())
    return modules, keys, hooks, tuple(sorted(model.__dict__))


def refusal(model: nn.Module, spec: CBSpec | None = None) -> str | None:
    """``inject``'s refusal message, or None when it accepts (then ``model`` has CB).

    A refusal must be one ``UnsupportedModelError`` line naming the class and ``cbtool families``, and must leave
    the model exactly as it was.
    """
    before = snapshot(model)
    try:
        inject(model, spec)
    except UnsupportedModelError as error:
        message = str(error)
    else:
        return None
    assert "\n" not in message, message
    assert type(model).__name__ in message, message
    assert "cbtool families" in message, message
    assert snapshot(model) == before, "a refused inject changed the model"
    assert find_broadcasts(model) == [] and spec_of(model) is None
    return message


def assert_refused(model: nn.Module, spec: CBSpec | None = None, names: tuple[str, ...] = ()) -> None:
    message = refusal(model, spec)
    assert message is not None, f"cbtool accepted {type(model).__name__}"
    for name in names:
        assert name in message, message


def assert_cb_changes_output(model: nn.Module, size: int) -> None:
    """CB (default spec) on a copy: same output shape as the plain model, and a real difference."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    cb_model = inject(copy.deepcopy(model))
    assert find_broadcasts(cb_model), "inject placed no CB operation"
    with torch.no_grad():
        plain = model(x)
        out = cb_model(x)
    assert isinstance(out, torch.Tensor) and out.shape == plain.shape
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max().item() > 1e-4, "CB did not change the output"


def test_zoo_picks_one_model_per_module():
    assert len(ZOO) > 50
    assert ZOO["vision_transformer"].startswith("test_")
    assert set(EXPECTED_SUPPORTED) <= set(ZOO), "a module in EXPECTED_SUPPORTED is no longer in timm"


@pytest.mark.parametrize("module", list(ZOO))
def test_zoo_module(module):
    name = ZOO[module]
    model = build_meta(name)
    try:
        detect(model)
    except UnsupportedModelError:
        accepted_class = False
    else:
        accepted_class = True
    if refusal(model) is not None:  # checks the message and that nothing changed
        assert module not in EXPECTED_SUPPORTED, f"{module} ({name}, {type(model).__name__}) is expected supported"
        return
    assert accepted_class
    assert module in EXPECTED_SUPPORTED, (
        f"cbtool accepts {name} ({type(model).__module__}.{type(model).__name__}) from timm module {module}; "
        "review it and add the module to EXPECTED_SUPPORTED"
    )
    kwargs = EXPECTED_SUPPORTED[module]
    real = build_real(name, **kwargs)
    assert type(real) is type(model)
    assert_cb_changes_output(real, kwargs.get("img_size", 224))


@pytest.mark.parametrize("case", VARIANTS.values(), ids=VARIANTS.keys())
def test_vit_variants(case):
    name, kwargs = case
    detect(build_meta(name))  # the full-size class is supported, not only the tiny one
    model = build_real(name, **kwargs)
    detect(model)
    assert_cb_changes_output(model, kwargs["img_size"])


@pytest.mark.parametrize("name", REFUSED)
def test_refused_architectures(name):
    assert_refused(build_meta(name))


def test_parallel_scaling_block_refused_at_inject():
    from timm.models.vision_transformer import ParallelScalingBlock

    model = build_real("vit_tiny_patch16_224", block_fn=ParallelScalingBlock, **{**TINY, "depth": 3})
    detect(model)  # the class is registered; its blocks are not
    for position in ("mlp", "attn", "block"):
        assert_refused(model, CBSpec(position=position), names=("ParallelScalingBlock",))


def test_inject_is_atomic_when_a_later_block_is_refused():
    """Targets are all resolved before the first change: a bad last block leaves the earlier ones untouched."""
    model = build_real("vit_tiny_patch16_224", **{**TINY, "depth": 3})
    model.blocks[2].mlp = nn.Linear(32, 32)  # a torch.nn leaf with parameters: no place for CB
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as caught:
        inject(model)
    assert "\n" not in str(caught.value) and "blocks.2" in str(caught.value)
    assert snapshot(model) == before and find_broadcasts(model) == [] and spec_of(model) is None

    model = build_real("vit_tiny_patch16_224", **{**TINY, "depth": 3})
    model.blocks[1].mlp.cb = nn.Identity()  # a name clash with the CB child
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError):
        inject(model)
    assert snapshot(model) == before and spec_of(model) is None
