"""``inject`` against forwards written out by hand, the cbs variant, and validation before any change."""

from __future__ import annotations

import pytest
import torch

from cbtool.broadcast import ContextBroadcast, ScaledContextBroadcast
from cbtool.errors import SpecError, UnsupportedModelError
from cbtool.spec import CBSpec
from cbtool.surgery import broadcast_parameters, find_broadcasts, inject, spec_of

POSITIONS = ("mlp", "attn", "block")
# --layers as typed, and the blocks of a 3-block model it means (written out, not computed by cbtool).
LAYER_CHOICES = [("all", {0, 1, 2}), ("0,-1", {0, 2}), ("1-2", {1, 2})]
TIMM_VARIANTS = {
    "class-token": {},
    "registers": {"reg_tokens": 2},
    "layer-scale": {"init_values": 1e-2},
    "no-class-token": {"class_token": False, "global_pool": "avg"},
}


def by_hand(y: torch.Tensor) -> torch.Tensor:
    """The paper's operation: every token mixed half-and-half with the mean of all tokens."""
    return 0.5 * y + 0.5 * y.mean(dim=1, keepdim=True)


def timm_reference(model, x, position: str, layers: set[int]) -> torch.Tensor:
    """timm's VisionTransformer forward, step by step, with CB written out at ``position`` in ``layers``."""
    with torch.no_grad():
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.norm_pre(x)
        for index, block in enumerate(model.blocks):
            on = index in layers
            y = block.attn(block.norm1(x))
            if on and position == "attn":
                y = by_hand(y)
            x = x + block.drop_path1(block.ls1(y))
            y = block.mlp(block.norm2(x))
            if on and position == "mlp":
                y = by_hand(y)
            x = x + block.drop_path2(block.ls2(y))
            if on and position == "block":
                x = by_hand(x)
        x = model.norm(x)
        return model.forward_head(x)


def hf_vit_reference(model, x, position: str, layers: set[int]) -> torch.Tensor:
    """transformers 5.x ViTForImageClassification, step by step, with CB written out."""
    with torch.no_grad():
        hs = model.vit.embeddings(x)
        for index, layer in enumerate(model.vit.layers):
            on = index in layers
            y = layer.attention(layer.layernorm_before(hs))[0]
            if on and position == "attn":
                y = by_hand(y)
            hs = hs + layer.dropout(y)
            y = layer.mlp(layer.layernorm_after(hs))
            if on and position == "mlp":
                y = by_hand(y)
            hs = hs + layer.dropout(y)
            if on and position == "block":
                hs = by_hand(hs)
        hs = model.vit.layernorm(hs)
        return model.classifier(hs[:, 0])


def dinov2_reference(model, x, position: str, layers: set[int]) -> torch.Tensor:
    """transformers Dinov2Model's last hidden state, with CB before the layer scale of each branch."""
    with torch.no_grad():
        hs = model.embeddings(x)
        for index, layer in enumerate(model.encoder.layer):
            on = index in layers
            y = layer.attention(layer.norm1(hs))[0]
            if on and position == "attn":
                y = by_hand(y)
            hs = hs + layer.drop_path(layer.layer_scale1(y))
            y = layer.mlp(layer.norm2(hs))
            if on and position == "mlp":
                y = by_hand(y)
            hs = hs + layer.drop_path(layer.layer_scale2(y))
            if on and position == "block":
                hs = by_hand(hs)
        return model.layernorm(hs)


def state_snapshot(model) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def hook_count(model) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


# --- reference forwards -------------------------------------------------------------------------


@pytest.mark.parametrize("layers, chosen", LAYER_CHOICES, ids=[c[0] for c in LAYER_CHOICES])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("variant_kwargs", TIMM_VARIANTS.values(), ids=TIMM_VARIANTS.keys())
def test_timm_vit_matches_hand_written_forward(timm_model, images, logits, variant_kwargs, position, layers, chosen):
    plain = timm_model(**variant_kwargs)
    model = inject(timm_model(**variant_kwargs), CBSpec(position=position, layers=layers))
    x = images()
    # The hand-written forward is faithful: without CB it reproduces timm's own forward.
    torch.testing.assert_close(timm_reference(plain, x, position, set()), logits(plain, x), rtol=0, atol=1e-5)
    expected = timm_reference(plain, x, position, chosen)
    got = logits(model, x)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - logits(plain, x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("layers, chosen", LAYER_CHOICES[:2], ids=[c[0] for c in LAYER_CHOICES[:2]])
@pytest.mark.parametrize("position", POSITIONS)
def test_hf_vit_matches_hand_written_forward(hf_model, images, logits, position, layers, chosen):
    plain = hf_model()
    model = inject(hf_model(), CBSpec(position=position, layers=layers))
    x = images()
    torch.testing.assert_close(hf_vit_reference(plain, x, position, set()), logits(plain, x), rtol=0, atol=1e-5)
    expected = hf_vit_reference(plain, x, position, chosen)
    got = logits(model, x)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got - logits(plain, x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_dinov2_cb_sits_before_the_layer_scale(hf_model, images, logits, position):
    # Dinov2 scales each branch per channel; the paper puts CB before that scale.
    plain = hf_model("Dinov2Model", layerscale_value=0.5)
    model = inject(hf_model("Dinov2Model", layerscale_value=0.5), CBSpec(position=position, layers="0,-1"))
    x = images()
    torch.testing.assert_close(dinov2_reference(plain, x, position, set()), logits(plain, x), rtol=0, atol=1e-5)
    got = logits(model, x)
    assert (got - dinov2_reference(plain, x, position, {0, 2})).abs().max().item() < 1e-5
    assert (got - logits(plain, x)).abs().max().item() > 1e-3


# --- cbs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
def test_cbs_at_init_equals_cb(timm_model, images, logits, position):
    cb = inject(timm_model(reg_tokens=2), CBSpec("cb", position))
    cbs = inject(timm_model(reg_tokens=2), CBSpec("cbs", position))
    x = images()
    assert (logits(cbs, x) - logits(cb, x)).abs().max().item() < 1e-6


def test_cbs_at_init_equals_cb_hf(hf_model, images, logits):
    cb = inject(hf_model(), CBSpec("cb", "mlp"))
    cbs = inject(hf_model(), CBSpec("cbs", "mlp"))
    x = images()
    assert (logits(cbs, x) - logits(cb, x)).abs().max().item() < 1e-6


@pytest.mark.parametrize(
    "scale_init, twin",
    [(0.0, "plain"), (0.5, "cb")],
)
def test_cbs_scale_init_endpoints(timm_model, images, logits, scale_init, twin):
    model = inject(timm_model(), CBSpec("cbs", "mlp", scale_init=scale_init))
    reference = timm_model() if twin == "plain" else inject(timm_model(), CBSpec("cb", "mlp"))
    x = images()
    assert (logits(model, x) - logits(reference, x)).abs().max().item() < 1e-6


def test_cbs_scale_one_replaces_tokens_by_their_mean(timm_model, images, logits):
    plain = timm_model()
    model = inject(timm_model(), CBSpec("cbs", "mlp", layers="1", scale_init=1.0))
    x = images()
    mean_only = lambda y: y.mean(dim=1, keepdim=True).expand_as(y)  # noqa: E731
    with torch.no_grad():
        h = plain.norm_pre(plain._pos_embed(plain.patch_embed(x)))
        h = plain.blocks[0](h)
        block = plain.blocks[1]
        h = h + block.ls1(block.attn(block.norm1(h)))
        h = h + block.ls2(mean_only(block.mlp(block.norm2(h))))
        h = plain.blocks[2](h)
        expected = plain.forward_head(plain.norm(h))
    assert (logits(model, x) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("position", POSITIONS)
def test_every_cbs_scale_gets_a_gradient(timm_model, images, position):
    model = inject(timm_model(), CBSpec("cbs", position))
    scales = broadcast_parameters(model)
    assert len(scales) == 3 and all(s.shape == (32,) and s.requires_grad for s in scales)
    loss = model(images()).logsumexp(dim=1).sum()
    loss.backward()
    for name, module in find_broadcasts(model):
        grad = module.scale.grad
        assert grad is not None, name
        assert bool((grad != 0).all()), f"{name}.scale has zero gradient entries"


def test_changing_one_scale_changes_the_output(timm_model, images, logits):
    model = inject(timm_model(), CBSpec("cbs", "mlp"))
    x = images()
    before = logits(model, x)
    with torch.no_grad():
        model.blocks[1].mlp.cb.scale[3] = 0.9
    after = logits(model, x)
    assert (after - before).abs().max().item() > 1e-4


def test_cbs_adds_one_scale_per_chosen_block(timm_model):
    model = timm_model()
    keys = set(model.state_dict())
    inject(model, CBSpec("cbs", "attn", layers="0,2", scale_init=0.25))
    added = set(model.state_dict()) - keys
    assert added == {"blocks.0.ls1.cb.scale", "blocks.2.ls1.cb.scale"}
    for key in added:
        assert torch.equal(model.state_dict()[key], torch.full((32,), 0.25))
    assert [name for name, _ in find_broadcasts(model)] == ["blocks.0.ls1.cb", "blocks.2.ls1.cb"]
    assert all(isinstance(m, ScaledContextBroadcast) for _, m in find_broadcasts(model))


def test_cb_adds_no_state_dict_keys(timm_model):
    model = timm_model()
    before = state_snapshot(model)
    spec = CBSpec("cb", "block", layers="1")
    inject(model, spec)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert broadcast_parameters(model) == []
    assert [name for name, _ in find_broadcasts(model)] == ["blocks.1.cb"]
    assert isinstance(model.blocks[1].cb, ContextBroadcast)
    assert spec_of(model) is spec


def test_cbs_follows_the_model_dtype(timm_model, images):
    model = timm_model().to(torch.bfloat16)
    inject(model, CBSpec("cbs"))
    assert {s.dtype for s in broadcast_parameters(model)} == {torch.bfloat16}
    assert model(images().to(torch.bfloat16)).dtype == torch.bfloat16


# --- validation before change -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, error, message",
    [
        (CBSpec(layers="3"), SpecError, "layer 3 is out of range for a model with 3 blocks"),
        (CBSpec(layers="0,1,-4"), SpecError, "layer -4 is out of range"),
        (CBSpec(variant="cbs", layers="0-5"), SpecError, "layer 5 is out of range"),
        (CBSpec(layers="2-1"), SpecError, "empty layer range 2-1"),
        ({"variant": "cb"}, SpecError, "spec must be a CBSpec"),
    ],
)
def test_bad_spec_leaves_model_untouched(timm_model, images, logits, spec, error, message):
    model = timm_model()
    x = images()
    modules, state, hooks, before = list(model.named_modules()), state_snapshot(model), hook_count(model), logits(model, x)
    with pytest.raises(error, match=message):
        inject(model, spec)
    assert [name for name, _ in model.named_modules()] == [name for name, _ in modules]
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[key], state[key]) for key in state)
    assert hook_count(model) == hooks
    assert spec_of(model) is None and find_broadcasts(model) == []
    assert torch.equal(logits(model, x), before)


def test_block_with_a_cb_child_refused_before_any_change(timm_model):
    model = timm_model()
    model.blocks[2].mlp.add_module("cb", torch.nn.Identity())  # someone else's module under our name
    hooks = hook_count(model)
    with pytest.raises(UnsupportedModelError, match="a module in block blocks.2 already has a child named 'cb'"):
        inject(model, CBSpec())
    assert not hasattr(model.blocks[0].mlp, "cb") and not hasattr(model.blocks[1].mlp, "cb")
    assert hook_count(model) == hooks and spec_of(model) is None


@pytest.mark.parametrize(
    "first, second",
    [
        (CBSpec(), CBSpec()),
        (CBSpec(layers="0"), CBSpec(layers="1-2")),
        (CBSpec("cbs", "attn"), CBSpec("cb", "block")),
    ],
)
def test_injecting_twice_is_refused(timm_model, images, logits, first, second):
    model = inject(timm_model(), first)
    x = images()
    state, hooks, before = state_snapshot(model), hook_count(model), logits(model, x)
    with pytest.raises(UnsupportedModelError, match="already has Context Broadcasting.*inject it only once"):
        inject(model, second)
    assert spec_of(model) is first
    assert list(model.state_dict()) == list(state) and hook_count(model) == hooks
    assert torch.equal(logits(model, x), before)


@pytest.mark.parametrize("variant", ["cb", "cbs"])
@pytest.mark.parametrize("position", ["mlp", "attn", "block"])
def test_inference_path_equals_autograd_path(variant, position):
    """Without autograd the op may overwrite the branch output in place; the values must not change."""
    import timm
    import torch

    from cbtool.spec import CBSpec
    from cbtool.surgery import find_broadcasts, inject

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()
    inject(model, CBSpec(variant=variant, position=position))
    overwrites = {op.overwrite_output for _, op in find_broadcasts(model)}
    assert overwrites == {position != "block"}
    x = torch.randn(3, 3, 32, 32)
    with_grad = model(x)
    with torch.inference_mode():
        inference = model(x)
    with torch.no_grad():
        no_grad = model(x)
    torch.testing.assert_close(inference, with_grad.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(no_grad, with_grad.detach(), rtol=0, atol=1e-6)
