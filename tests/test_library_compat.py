"""A CB model stays a first-class model of its library: scripting, fx feature extraction, forward_intermediates,
features_only, torch.compile, torch.export, autograd, and ``remove`` back to the exact plain model.

Every result is compared with a reference computed by hand on a plain twin (same weights, no CB): its blocks run
a hand-written forward with Context Broadcasting written out at the chosen position. Each test also asserts the
CB result differs from the plain model's, so none can pass without CB.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from cbtool.broadcast import BranchEnd
from cbtool.errors import UnsupportedModelError
from cbtool.families import detect
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, remove, spec_of

SEED = 0
TOL = 1e-5
DIFFERS = 1e-4
VIT = "vit_tiny_patch16_224"
VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
POSITIONS = ("mlp", "attn", "block")
VARIANTS = ("cb", "cbs")


def perturb_(model: nn.Module, seed: int = SEED) -> nn.Module:
    """Seeded noise on every parameter, so no branch is zero-initialised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def tiny_vit(**kwargs) -> nn.Module:
    torch.manual_seed(SEED)
    return perturb_(timm.create_model(VIT, pretrained=False, **{**VIT_KWARGS, **kwargs})).float().eval()


def images(size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(SEED))


def cb_vit(position: str = "mlp", variant: str = "cb") -> tuple[nn.Module, nn.Module]:
    """(plain twin, CB model) with the same weights; ``cbs`` scales are set to seeded values in [0, 1] so that
    ``cbs`` is not just ``cb``."""
    plain = tiny_vit()
    model = inject(copy.deepcopy(plain), CBSpec(variant, position))
    if variant == "cbs":
        generator = torch.Generator().manual_seed(SEED + 1)
        with torch.no_grad():
            for _, operation in find_broadcasts(model):
                operation.scale.copy_(torch.rand(operation.scale.shape, generator=generator))
    return plain, model


def block_scales(model: nn.Module) -> dict[int, torch.Tensor | None]:
    """Block index -> its ``cbs`` scale (None for ``cb``), read from the CB model."""
    scales = {}
    for name, operation in find_broadcasts(model):
        index = int(name.split(".")[1])  # blocks.<i>....cb
        scale = getattr(operation, "scale", None)
        scales[index] = None if scale is None else scale.detach().clone()
    return scales


def broadcast_by_hand(y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    mean = y.mean(1, keepdim=True)
    if scale is None:
        return 0.5 * y + 0.5 * mean
    return y + scale * (mean - y)


def block_by_hand(block: nn.Module, x: torch.Tensor, position: str | None, scale: torch.Tensor | None) -> torch.Tensor:
    """A timm ``Block`` forward written out, with CB at ``position`` (None: the plain block)."""
    if position == "attn":
        y = broadcast_by_hand(block.attn(block.norm1(x)), scale)
        x = x + block.drop_path1(block.ls1(y))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    if position == "mlp":
        y = broadcast_by_hand(block.mlp(block.norm2(x)), scale)
        return x + block.drop_path2(block.ls2(y))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    if position == "block":
        return broadcast_by_hand(x, scale)
    return x


@torch.no_grad()
def reference(plain: nn.Module, x: torch.Tensor, position: str | None, scales: dict | None = None) -> dict:
    """The hand-written forward of the plain twin: per-block outputs, the final normed features, the logits."""
    assert not find_broadcasts(plain)
    scales = scales or {}
    h = plain.norm_pre(plain.patch_drop(plain._pos_embed(plain.patch_embed(x))))
    blocks = []
    for index, block in enumerate(plain.blocks):
        h = block_by_hand(block, h, position if index in scales else None, scales.get(index))
        blocks.append(h)
    final = plain.norm(h)
    return {"blocks": blocks, "final": final, "logits": plain.forward_head(final)}


def cb_reference(plain: nn.Module, model: nn.Module, x: torch.Tensor) -> dict:
    return reference(plain, x, spec_of(model).position, block_scales(model))


def to_nchw(tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    patches = tokens[:, prefix:]
    side = int(patches.shape[1] ** 0.5)
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() < TOL


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > DIFFERS


def check(out: torch.Tensor, expected: torch.Tensor, plain_out: torch.Tensor) -> None:
    """``out`` matches the hand-written CB reference and differs from the plain model."""
    assert close(out, expected), (out - expected).abs().max().item()
    assert differs(out, plain_out), "the result equals the plain model's: CB is not in it"


def plain_logits(plain: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return plain(x)


def test_reference_reproduces_the_plain_model():
    """The hand-written forward is the model's own forward when no CB is written in."""
    plain = tiny_vit()
    x = images()
    ref = reference(plain, x, None)
    assert close(ref["logits"], plain_logits(plain, x))


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_eager_matches_reference(position, variant):
    plain, model = cb_vit(position, variant)
    x = images()
    with torch.no_grad():
        check(model(x), cb_reference(plain, model, x)["logits"], plain_logits(plain, x))


@pytest.mark.parametrize("position", ["mlp", "attn"])  # a block hook: typed by the full signature, called with x
@pytest.mark.parametrize("variant", VARIANTS)
def test_torchscript(position, variant):
    plain, model = cb_vit(position, variant)
    x = images()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
    check(out, cb_reference(plain, model, x)["logits"], plain_logits(plain, x))
    out_grad = scripted(x)  # the out-of-place path as well
    check(out_grad.detach(), cb_reference(plain, model, x)["logits"], plain_logits(plain, x))


@pytest.mark.parametrize("position", POSITIONS)
def test_fx_feature_extraction(position):
    from timm.models._features_fx import create_feature_extractor

    plain, model = cb_vit(position, "cbs")
    x = images()
    nodes = {"blocks.1": "block1", "head": "head"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    plain_extractor = create_feature_extractor(copy.deepcopy(plain), return_nodes=nodes)
    ref = cb_reference(plain, model, x)
    with torch.no_grad():
        out, plain_out = extractor(x), plain_extractor(x)
    assert close(plain_out["head"], plain_logits(plain, x))
    check(out["head"], ref["logits"], plain_out["head"])
    check(out["block1"], ref["blocks"][1], plain_out["block1"])


@pytest.mark.parametrize("position", POSITIONS)
def test_forward_intermediates(position):
    plain, model = cb_vit(position)
    x = images()
    ref = cb_reference(plain, model, x)
    plain_ref = reference(plain, x, None)
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x)
    check(final, ref["final"], plain_ref["final"])
    assert len(intermediates) == len(ref["blocks"]) == 3
    # The first block's input is the same with or without CB: every block output differs.
    for got, expected, plain_block in zip(intermediates, ref["blocks"], plain_ref["blocks"]):
        check(got, to_nchw(expected, prefix), to_nchw(plain_block, prefix))


def test_features_only():
    """timm's ``features_only`` ViT is a ``FeatureGetterNet`` wrapping the VisionTransformer as ``.model``.

    cbtool registers exact model classes only, so the wrapper itself may be refused (in one line, changing
    nothing); CB then goes into the wrapped VisionTransformer, ``features.model``, which the wrapper calls through
    its ``forward_intermediates``.
    """
    plain, reference_model = cb_vit("mlp")
    torch.manual_seed(SEED)
    features = timm.create_model(VIT, pretrained=False, features_only=True, **VIT_KWARGS).eval()
    missing, _unexpected = features.model.load_state_dict(plain.state_dict(), strict=False)
    assert not missing
    plain_features = copy.deepcopy(features)
    try:
        inject(features)
        target = features
    except UnsupportedModelError as error:
        assert "\n" not in str(error) and "cbtool families" in str(error)
        assert not find_broadcasts(features)
        assert type(features.model).__name__ == "VisionTransformer"
        target = features.model
        inject(target)
    assert len(find_broadcasts(features)) == 3
    x = images()
    ref = cb_reference(plain, reference_model, x)
    plain_ref = reference(plain, x, None)
    with torch.no_grad():
        got, plain_got = features(x), plain_features(x)
    assert len(got) == len(plain_got) > 0
    indices = list(features.out_indices)
    assert len(got) == len(indices) == 3
    for out, plain_out, index in zip(got, plain_got, indices):
        assert close(plain_out, to_nchw(plain_ref["blocks"][index], 1))
        check(out, to_nchw(ref["blocks"][index], 1), plain_out)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_torch_compile(grad):
    """``torch.compile`` with the ``aot_eager`` backend (AOTAutograd + functionalisation, no Inductor: fast on CPU)."""
    torch._dynamo.reset()
    plain, model = cb_vit("mlp", "cbs")
    x = images()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.set_grad_enabled(grad):
        out = compiled(x)
    check(out.detach(), cb_reference(plain, model, x)["logits"], plain_logits(plain, x))
    torch._dynamo.reset()


@pytest.mark.parametrize("position", ["mlp", "block"])
def test_torch_export(position):
    plain, model = cb_vit(position, "cbs")
    x = images()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        out = exported.module()(x)
    check(out, cb_reference(plain, model, x)["logits"], plain_logits(plain, x))
    out = exported.module()(images(batch=2).flip(0))  # another input of the same shape
    assert close(out.detach(), cb_reference(plain, model, images().flip(0))["logits"])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_in_place_path_and_backward(position, variant):
    """Without autograd the branch-end mix runs in place; it must compute what the autograd path computes."""
    plain, model = cb_vit(position, variant)
    x = images()
    with torch.no_grad():
        fast = model(x)
    slow = model(x)
    assert slow.requires_grad
    assert torch.allclose(fast, slow.detach(), rtol=0, atol=1e-6), (fast - slow).abs().max().item()
    check(slow.detach(), cb_reference(plain, model, x)["logits"], plain_logits(plain, x))
    with torch.no_grad():
        again = model(x)
    assert torch.equal(again, fast)  # the in-place path did not corrupt any weight or state
    model.zero_grad()
    slow.square().mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), [
        n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    if variant == "cbs":
        assert all(operation.scale.grad.abs().sum() > 0 for _, operation in find_broadcasts(model))


def no_forward_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def assert_removed(model: nn.Module, plain: nn.Module, x: torch.Tensor) -> None:
    assert no_forward_hooks(model)
    assert find_broadcasts(model) == []
    assert spec_of(model) is None
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    with torch.no_grad():
        assert torch.equal(logits(model(x)), logits(plain(x)))


def logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_remove_timm_vit(position, variant):
    plain, model = cb_vit(position, variant)
    x = images()
    assert no_forward_hooks(plain)
    with torch.no_grad():
        cb_out = model(x)
    check(cb_out, cb_reference(plain, model, x)["logits"], plain_logits(plain, x))

    clone = copy.deepcopy(model)
    assert remove(clone) is clone
    assert_removed(clone, plain, x)
    with torch.no_grad():
        assert torch.equal(model(x), cb_out), "remove on a deep copy changed the original"
    assert len(find_broadcasts(model)) == 3 and spec_of(model) == CBSpec(variant, position)

    remove(model)
    assert_removed(model, plain, x)
    with pytest.raises(UnsupportedModelError):
        remove(model)

    inject(model, CBSpec(variant, position))  # cbs scales start at 0.5 again: the cb output
    with torch.no_grad():
        again = model(x)
    expected = reference(plain, x, position, {i: None for i in range(3)})["logits"]
    check(again, expected, plain_logits(plain, x))


def test_remove_hf_vit():
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=5)
    torch.manual_seed(SEED)
    plain = perturb_(transformers.ViTForImageClassification(config)).float().eval()
    x = images()
    for position in POSITIONS:
        for variant in VARIANTS:
            model = inject(copy.deepcopy(plain), CBSpec(variant, position))
            with torch.no_grad():
                cb_out = logits(model(x))
                assert differs(cb_out, logits(plain(x))), (position, variant)
            clone = copy.deepcopy(model)
            remove(clone)
            assert_removed(clone, plain, x)
            with torch.no_grad():
                assert torch.equal(logits(model(x)), cb_out)
            remove(model)
            assert_removed(model, plain, x)
            inject(model, CBSpec(variant, position))
            with torch.no_grad():
                assert torch.equal(logits(model(x)), cb_out)  # cbs scales start at 0.5 again, as before


def test_remove_timm_swin_attn_branch_end():
    """Swin's attention branch ends in the drop path: an ``nn.Identity`` where the drop-path rate is 0 (stage 0 of
    this model), a timm ``DropPath`` elsewhere. CB wraps the Identity in a ``BranchEnd`` (torch.fx would drop a hook
    on a torch.nn leaf) and hooks the DropPath directly; remove must put the very same modules back."""
    torch.manual_seed(SEED)
    plain = perturb_(timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4, embed_dim=24, depths=(1, 1),
        num_heads=(1, 2), num_classes=5,
    )).float().eval()
    x = images(64)
    model = copy.deepcopy(plain)
    blocks = [block for _, block in detect(model).blocks(model)]
    originals = [(type(block.drop_path1), block.drop_path1) for block in blocks]
    assert originals[0][0] is nn.Identity
    inject(model, CBSpec("cb", "attn"))
    for (cls, original), block in zip(originals, blocks):
        if cls is nn.Identity:
            assert isinstance(block.drop_path1, BranchEnd) and block.drop_path1.inner is original
        else:
            assert block.drop_path1 is original
    with torch.no_grad():
        cb_out = model(x)
        assert differs(cb_out, plain(x))

    clone = copy.deepcopy(model)
    remove(clone)
    assert_removed(clone, plain, x)
    assert [type(block.drop_path1) for _, block in detect(clone).blocks(clone)] == [cls for cls, _ in originals]
    with torch.no_grad():
        assert torch.equal(model(x), cb_out), "remove on a deep copy changed the original"

    remove(model)
    assert [(type(block.drop_path1), block.drop_path1) for block in blocks] == originals
    assert_removed(model, plain, x)
    inject(model, CBSpec("cb", "attn"))
    with torch.no_grad():
        assert torch.equal(model(x), cb_out)
