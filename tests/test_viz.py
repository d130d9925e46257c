"""cbtool.viz and ``cbtool viz``: maps equal an independent eager computation, views, rollout, pictures, CLI errors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from test_family_reference import CASES  # the same tiny model of every family

from cbtool.errors import VizError
from cbtool.families import TokenLayout
from cbtool.viz.figure import VizOptions, attention_figure
from cbtool.viz.maps import attention_maps
from cbtool.viz.pictures import BAR_BLOCK, BAR_HEIGHT, overlay
from cbtool.viz.rollout import attention_rollout, check_rollout
from cbtool.viz.views import class_attention, entropy_map, fuse_heads, query_attention


# ----- an independent computation: softmax(q k^T * scale) from the model's own weights ------------------------
def _inputs_of(modules, run) -> list[torch.Tensor]:
    """The first positional input of each module during ``run()``."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone())) for m in modules]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def timm_reference(model, x) -> list[torch.Tensor]:
    attentions = [block.attn for block in model.blocks]
    maps = []
    for attn, h in zip(attentions, _inputs_of(attentions, lambda: model(x))):
        batch, tokens, _ = h.shape
        qkv = torch.nn.functional.linear(h, attn.qkv.weight, attn.qkv.bias)
        q, k, _ = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        maps.append(torch.softmax(q @ k.transpose(-2, -1) * attn.scale, dim=-1))
    return maps


def hf_reference(model, x) -> list[torch.Tensor]:
    attentions = [m for m in model.modules() if type(m).__name__ == "ViTAttention"]
    maps = []
    for attn, h in zip(attentions, _inputs_of(attentions, lambda: model(pixel_values=x))):
        batch, tokens, _ = h.shape
        heads = model.config.num_attention_heads
        q = attn.q_proj(h).view(batch, tokens, heads, -1).transpose(1, 2)
        k = attn.k_proj(h).view(batch, tokens, heads, -1).transpose(1, 2)
        maps.append(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1))
    return maps


def test_timm_maps_equal_eager_with_fused_attention_restored(timm_model, images):
    model, x = timm_model(), images(batch=3)
    for block in model.blocks:
        block.attn.fused_attn = True
    expected = timm_reference(model, x)
    before = [model.blocks[0].attn.fused_attn]
    model.train()
    maps = attention_maps(model, x)
    assert model.training and all(block.attn.fused_attn is True for block in model.blocks) and before == [True]
    assert len(maps) == len(expected) == 3
    for got, want in zip(maps, expected):
        assert got.shape == (3, 2, 17, 17)
        assert (got - want).abs().max().item() < 1e-6
    assert torch.equal(attention_maps(model, x, layers=[-1])[0], maps[-1])


def test_hf_maps_equal_eager_with_sdpa_restored(hf_model, images):
    model, x = hf_model(), images(batch=2)
    model.set_attn_implementation("sdpa")
    expected = hf_reference(model, x)
    maps = attention_maps(model, x, layers="0-2")
    assert model.config._attn_implementation == "sdpa"
    for got, want in zip(maps, expected):
        assert got.shape == want.shape == (2, 2, 17, 17)
        assert (got - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("layers", ["3", [5], "-4", "x"])
def test_layers_out_of_range_is_one_line(timm_model, images, layers):
    with pytest.raises(VizError):
        attention_maps(timm_model(), images(), layers=layers)


# ----- views ---------------------------------------------------------------------------------------------------
GLOBAL = TokenLayout(prefix=1, grid=(2, 3), pixels_per_token=8.0, heads=2)


def random_probs(batch=2, heads=2, tokens=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(batch, heads, tokens, tokens, generator=generator), dim=-1)


def test_class_query_and_entropy_views():
    probs = random_probs()
    assert torch.equal(class_attention(probs, GLOBAL), probs[:, :, 0, 1:].reshape(2, 2, 2, 3))
    assert torch.equal(query_attention(probs, GLOBAL, (1, 2)), probs[:, :, 1 + 5, 1:].reshape(2, 2, 2, 3))
    no_class = TokenLayout(prefix=0, grid=(2, 3), pixels_per_token=8.0, heads=2)
    six = random_probs(tokens=6)
    assert torch.allclose(class_attention(six, no_class), six.mean(dim=2).reshape(2, 2, 2, 3))
    uniform = torch.full((1, 1, 7, 7), 1 / 7)
    assert torch.allclose(entropy_map(uniform, GLOBAL), torch.ones(1, 1, 2, 3))
    sharp = torch.eye(7).expand(1, 1, 7, 7)
    assert torch.allclose(entropy_map(sharp, GLOBAL), torch.zeros(1, 1, 2, 3))


@pytest.mark.parametrize("heads, shape", [("mean", (2, 1, 2, 3)), ("max", (2, 1, 2, 3)), ("min", (2, 1, 2, 3)),
                                          ("all", (2, 2, 2, 3)), (1, (2, 1, 2, 3)), ("-1", (2, 1, 2, 3))])
def test_fuse_heads(heads, shape):
    values = class_attention(random_probs(), GLOBAL)
    fused = fuse_heads(values, heads)
    assert fused.shape == shape
    if heads == "max":
        assert torch.all(fused >= fuse_heads(values, "min"))
    if heads in (1, "-1"):
        assert torch.equal(fused[:, 0], values[:, 1])


@pytest.mark.parametrize("call", [
    lambda p: query_attention(p, GLOBAL, (2, 0)),
    lambda p: query_attention(p, GLOBAL, (0, 3)),
    lambda p: class_attention(p, TokenLayout(0, (2, 2), 4.0, 2, kind="window")),
    lambda p: entropy_map(p, TokenLayout(1, (2, 3), 8.0, 2, kind="class")),
    lambda p: fuse_heads(p, "median"),
    lambda p: fuse_heads(p, 5),
])
def test_undefined_views_are_one_line(call):
    with pytest.raises(VizError):
        call(random_probs())


def test_rollout_reference_and_refusals(timm_model):
    probs = random_probs(tokens=7)
    layouts = [GLOBAL, GLOBAL]
    rolled = attention_rollout([probs, probs], layouts, discard_ratio=0.0)
    a = 0.5 * probs.double().mean(dim=1) + 0.5 * torch.eye(7, dtype=torch.float64)
    a = a / a.sum(-1, keepdim=True)
    expected = (a @ a)[:, 0, 1:].reshape(2, 2, 3).float()
    assert torch.allclose(rolled, expected, atol=1e-6)
    discarded = attention_rollout([probs, probs], layouts, discard_ratio=0.5)
    assert discarded.shape == (2, 2, 3) and not torch.allclose(discarded, rolled)
    with pytest.raises(VizError):
        attention_rollout([probs], [TokenLayout(0, (2, 2), 4.0, 2, kind="window")])
    with pytest.raises(VizError):
        check_rollout(timm_model("swin_tiny_patch4_window7_224"))
    check_rollout(timm_model())


# ----- pictures ------------------------------------------------------------------------------------------------
def test_overlay_shape_determinism_and_sensitivity():
    image = np.random.default_rng(0).random((40, 30, 3)).astype(np.float32)
    heat = np.random.default_rng(1).random((4, 3))
    first, second = overlay(image, heat), overlay(image, heat)
    assert first.shape == (40, 30, 3) and first.dtype == np.float32 and 0 <= first.min() and first.max() <= 1
    assert np.array_equal(first, second)
    changed = heat.copy()
    changed[0, 0] = heat.max() + 1
    assert not np.allclose(overlay(image, changed), first)


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def photos():
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    return [Image.fromarray(skimage.astronaut()), Image.fromarray(skimage.chelsea())]


def test_figure_is_deterministic_sized_and_follows_the_maps(timm_model, photos, tmp_path):
    plain, cb = timm_model(), timm_model()
    import cbtool

    cbtool.inject(cb, cbtool.CBSpec())
    options = VizOptions(layers="0,-1", query=(1, 2), entropy=True, rollout=True, scale="per-panel")
    path = tmp_path / "attn.png"
    picture = attention_figure([plain, cb], photos, path, labels=["plain", "cb"], options=options, panel=64)
    columns = 1 + 2 * (2 * 3 + 1)  # image, then per model: 2 layers x 3 views + rollout
    # titles of 5 lines (rollout: model, heads, discard ratio, range, "own scale"); one colour bar below
    assert picture.size == (columns * 68 + 4, 2 * (64 + 4 + 13 * 5 + 4) + 4 + BAR_HEIGHT)
    from PIL import Image

    with Image.open(path) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(picture))
    again = attention_figure([plain, cb], photos, labels=["plain", "cb"], options=options, panel=64)
    assert _png(again) == _png(picture)
    other = attention_figure([plain, timm_model(seed=1)], photos, labels=["plain", "cb"], options=options, panel=64)
    left, right = np.asarray(picture), np.asarray(other)
    plain_end = 4 + 8 * 68  # the image and the plain model's 7 columns: per panel, they do not depend on the other
    assert np.array_equal(left[:, :plain_end], right[:, :plain_end])
    assert not np.array_equal(left[:, plain_end:], right[:, plain_end:])  # the second model's maps changed


def test_swin_class_picture_is_refused(timm_model, photos):
    with pytest.raises(VizError, match="windows"):
        attention_figure([timm_model("swin_tiny_patch4_window7_224")], photos)


# ----- the command ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(plain_and_cb_files):
    """The tiny plain and CB model files, with two real photos beside them."""
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    Image.fromarray(skimage.astronaut()).save(plain_and_cb_files / "astronaut.png")
    Image.fromarray(skimage.coffee()).save(plain_and_cb_files / "coffee.jpg")
    return plain_and_cb_files


def test_viz_command_writes_the_picture(saved, tmp_path, main_cli):
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", saved / "plain.safetensors", saved / "cb.safetensors", "--images", saved / "astronaut.png",
                     saved / "coffee.jpg", "--layers", "0,2", "--heads", "max", "--rollout", "-o", out)
    assert code == 0, err
    from PIL import Image

    with Image.open(out) as picture:
        # titles of 4 lines (rollout: model, heads, discard ratio, range); class and rollout colour bars below
        assert picture.size == ((1 + 2 * 3) * 164 + 4, 2 * (160 + 4 + 13 * 4 + 4) + 4 + BAR_HEIGHT)


def test_viz_command_on_a_dataset_per_head(saved, tmp_path, main_cli):
    out = tmp_path / "heads.png"
    code, err = main_cli("viz", saved / "cb.safetensors", "--dataset", "sample", "--limit", "3", "--heads", "all",
                         "--entropy", "--panel", "64", "-o", out)
    assert code == 0, err
    from PIL import Image

    with Image.open(out) as picture:  # the image, then 2 views x 2 heads of the last layer; 3 class-balanced images
        # the class and entropy colour bars (272 px each) do not fit side by side under 5 columns: one a row
        assert picture.size == ((1 + 2 * 2) * 68 + 4, 3 * (64 + 4 + 13 * 3 + 4) + 4 + 2 * BAR_HEIGHT)


@pytest.mark.parametrize("extra, message", [
    (["--images", "missing.png"], "does not exist"),
    ([], "--images"),
    (["--dataset", "sample", "--query", "4,0"], "outside the 4x4 patch grid"),
    (["--dataset", "sample", "--query", "1"], "ROW,COL"),
    (["--dataset", "sample", "--layers", "3"], "out of range"),
    (["--dataset", "sample", "--heads", "median"], "--heads"),
    (["--dataset", "sample", "--discard-ratio", "1.5", "--rollout"], "discard"),
])
def test_viz_bad_input_is_one_line_and_no_file(saved, tmp_path, main_cli, extra, message):
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", saved / "plain.safetensors", *extra, "--limit", "2", "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".attn.png.*"))


# ----- every family --------------------------------------------------------------------------------------------
ROLLOUT = {"timm-vit", "timm-vit-registers-no-class", "timm-vit-respost", "timm-deit3", "timm-deit-distilled",
           "timm-siglip", "timm-eva02", "timm-beit", "hf-vit", "hf-deit-teacher", "hf-dinov2-registers",
           "hf-clip-vision", "hf-siglip-vision", "hf-beit",
           # residual global-attention encoders of the same layer types, and the families added with them
           "hf-vit-model", "hf-deit", "hf-deit-model", "hf-dinov2", "hf-dinov2-model", "hf-dinov2-backbone",
           "hf-dinov2-registers-classifier", "hf-dinov2-registers-backbone", "hf-clip", "hf-clip-classifier",
           "hf-clip-vision-projection", "hf-siglip", "hf-siglip-classifier", "hf-beit-model", "hf-beit-backbone",
           "hf-dinov3", "hf-dinov3-backbone", "hf-vit-msn", "hf-vit-msn-model", "hf-ijepa", "hf-ijepa-model",
           "timm-relpos", "timm-relpos-cls-shared", "timm-relpos-respost"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_family_gives_its_maps_or_refuses_in_one_line(case):
    from cbtool.families import detect

    build, size, _ = CASES[case]
    model = build()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    layouts = detect(model).attention_layouts(model, (size, size))
    maps = attention_maps(model, x)
    assert len(maps) == len(layouts)
    for probs, layout in zip(maps, layouts):
        assert probs.shape[1] == layout.heads and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        if layout.kind == "window":
            with pytest.raises(VizError, match="windows"):
                class_attention(probs, layout)
            continue
        picture = class_attention(probs, layout)
        assert picture.shape[:2] == (2, layout.heads) and picture.shape[2:] == layout.grid
    if case in ROLLOUT:
        check_rollout(model)
        assert attention_rollout(maps, layouts).shape == (2, *layouts[0].grid)
    else:
        with pytest.raises(VizError, match="rollout"):
            check_rollout(model)
