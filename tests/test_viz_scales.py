"""Honest attention pictures: one colour scale per view with a colour bar, titles that tell values apart, the
query patch marked, rollout as Abnar & Zuidema by default and vit-explain's discarding only when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_viz import GLOBAL, random_probs, saved  # noqa: F401  (saved: a fixture)

from cbtool.errors import VizError
from cbtool.viz.figure import VizOptions, attention_figure, attention_panels
from cbtool.viz.pictures import BAR_HEIGHT, LINE, MARKER, Panel, compose
from cbtool.viz.rollout import attention_rollout
from cbtool.viz.scales import range_text, view_scale


@pytest.mark.parametrize("low, high, text", [
    (0.9973, 0.9998, "0.9973..0.9998"),  # before: "1..1"
    (0.0046, 0.0054, "0.00460..0.00540"),
    (0.041, 0.082, "0.041..0.082"),
    (0.0, 1.0, "0..1.0"),
    (0.25, 0.25, "0.25 everywhere"),
])
def test_ranges_have_digits_enough_to_tell_the_ends_apart(low, high, text):
    assert range_text(low, high) == text


def test_near_uniform_attention_is_near_flat_on_the_shared_scale():
    # a random ViT-S: every class-attention weight between 0.0046 and 0.0054 (about 1/197)
    heats = [0.0046 + 0.0008 * np.random.default_rng(i).random((14, 14)) for i in range(2)]
    for heat in heats:
        heat.flat[[0, -1]] = 0.0046, 0.0054
    scale = view_scale("class", heats, [197, 197], "shared")
    assert (scale.low, scale.high) == (0.0, 0.0054) and scale.marks == ((1 / 197, "1/197 uniform"),)
    colours = [(h - scale.low) / (scale.high - scale.low) for h in heats]
    assert max(c.max() - c.min() for c in colours) < 0.16  # a sixth of the colormap; per panel: all of it
    entropy = view_scale("entropy", [np.full((2, 2), 0.99)], [197], "shared")
    assert (entropy.low, entropy.high) == (0.0, 1.0)  # absolute: 0 is one key, 1 uniform
    assert view_scale("class", [np.full((2, 2), 0.001)], [17], "shared").high == 1 / 17  # the mark stays on the bar


def _uniform_model(timm_model):
    """A tiny ViT whose queries are nearly zero: every attention row is nearly uniform over the 17 tokens."""
    model = timm_model()
    with torch.no_grad():
        for block in model.blocks:
            dim = block.attn.qkv.weight.shape[1]
            block.attn.qkv.weight[:dim] *= 1e-3  # the queries
            block.attn.qkv.bias[:dim] = 0.0
    return model


def _heat_spread(picture, panel: int, title: int, column: int) -> float:
    """Peak-to-peak of the pixel values inside one heatmap panel of the first row."""
    x, y = 4 + column * (panel + 4), 4 + title
    return float(np.ptp(np.asarray(picture)[y + 4 : y + panel - 4, x + 4 : x + panel - 4].astype(float), axis=(0, 1)).max())


def test_figure_shares_one_scale_per_view_and_says_when_it_does_not(timm_model):
    from PIL import Image

    from cbtool.viz.pictures import LINE

    flat = [Image.new("RGB", (32, 32), (128, 128, 128))]
    models = [_uniform_model(timm_model), timm_model()]
    options = VizOptions(entropy=True)
    rows = attention_panels(models, flat, labels=["uniform", "other"], options=options)
    cells = {cell.title.split("\n")[0] + " " + cell.title.split("\n")[1]: cell for cell in rows[0][1:]}
    assert {(c.low, c.high) for k, c in cells.items() if "entropy" in k} == {(0.0, 1.0)}
    class_limits = {(c.low, c.high) for k, c in cells.items() if "class" in k}
    assert len(class_limits) == 1 and next(iter(class_limits))[0] == 0.0  # plain and CB: one scale
    assert all("own scale" not in c.title for c in cells.values())
    shared = attention_figure(models, flat, options=VizOptions(), panel=64)
    per_panel = attention_figure(models, flat, options=VizOptions(scale="per-panel"), panel=64)
    title = 4 + LINE * 3
    # the nearly uniform model looks nearly flat on the shared scale; per panel its noise is stretched to full contrast
    assert _heat_spread(shared, 64, title, 1) < 0.2 * _heat_spread(per_panel, 64, title + LINE, 1)
    assert shared.size[1] == 4 + 64 + title + 4 + BAR_HEIGHT  # one row of pictures, one colour bar
    bar = np.asarray(shared)[-BAR_HEIGHT:]
    assert len(np.unique(bar.reshape(-1, 3), axis=0)) > 100  # the colormap's gradient is drawn
    titles = [c.title for c in attention_panels(models, flat, options=VizOptions(scale="per-panel"))[0][1:]]
    assert all(t.endswith("own scale (per panel)") for t in titles)
    with pytest.raises(VizError, match="--scale"):
        attention_panels(models, flat, options=VizOptions(scale="stretch"))


def test_query_is_named_and_outlined(timm_model):
    from PIL import Image

    rows = attention_panels([timm_model()], [Image.new("RGB", (32, 32), (128, 128, 128))],
                            options=VizOptions(query=(1, 2)))
    query = [cell for cell in rows[0][1:] if "query" in cell.title]
    assert len(query) == 1 and "L2 query (1,2) heads mean" in query[0].title and query[0].marker == (1, 2, 4, 4)
    assert rows[0][0].marker == (1, 2, 4, 4) and "query (1,2)" in rows[0][0].title  # on the image as well
    picture = np.asarray(compose([[query[0]]], panel=64, pad=0))
    title = 4 + 13 * 3
    top, left = title + 16, 32  # patch (1, 2) of 4x4 over 64 px: rows 16-31, columns 32-47
    assert tuple(picture[top, left + 5]) == MARKER and tuple(picture[top + 5, left]) == MARKER
    assert tuple(picture[top + 8, left + 8]) != MARKER  # an outline, not a filled box


def test_rollout_defaults_to_abnar_zuidema_and_discards_as_vit_explain():
    probs = random_probs(tokens=7)
    a = 0.5 * probs.double().mean(dim=1) + 0.5 * torch.eye(7, dtype=torch.float64)
    a = a / a.sum(-1, keepdim=True)
    no_discard = (a @ a)[:, 0, 1:].reshape(2, 2, 3).float()
    assert torch.allclose(attention_rollout([probs, probs], [GLOBAL, GLOBAL]), no_discard, atol=1e-6)  # before: 0.9
    # vit-explain: zero the int(0.5 * 49) = 24 weakest entries of the fused map but entry [0, 0]; rows renormalised
    result = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    for layer in (probs, probs.flip(-1)):
        fused = layer.double().mean(dim=1).clone()
        for image in range(2):
            flat = fused[image].view(-1)
            weakest = [int(i) for i in flat.argsort()[:24] if int(i) != 0]
            flat[weakest] = 0.0
        mixed = 0.5 * fused + 0.5 * torch.eye(7, dtype=torch.float64)
        result = (mixed / mixed.sum(-1, keepdim=True)) @ result
    expected = result[:, 0, 1:].reshape(2, 2, 3).float()
    got = attention_rollout([probs, probs.flip(-1)], [GLOBAL, GLOBAL], discard_ratio=0.5)
    assert torch.allclose(got, expected, atol=1e-6)


def test_rollout_titles_state_fusion_and_discard_ratio(timm_model):
    from PIL import Image

    photo = [Image.new("RGB", (32, 32), (90, 120, 30))]
    for ratio, words in ((0.0, "discard 0 (Abnar & Zuidema)"), (0.9, "discard 0.9 (vit-explain)")):
        options = VizOptions(class_map=False, rollout=True, head_fusion="max", discard_ratio=ratio)
        (rolled,) = attention_panels([timm_model()], photo, labels=["m"], options=options)[0][1:]
        assert rolled.title.split("\n")[:3] == ["m", "rollout, heads max", words]


def test_compose_without_scales_keeps_each_panel_stretched():
    heat = np.array([[0.2, 0.4], [0.6, 0.8]])
    image = np.zeros((8, 8, 3), dtype=np.float32)
    own = np.asarray(compose([[Panel("a", image, heat)]], panel=32))
    fixed = np.asarray(compose([[Panel("a", image, heat, low=0.0, high=0.8)]], panel=32))
    assert own.shape == fixed.shape and not np.array_equal(own, fixed)


@pytest.mark.parametrize("extra, message", [
    (["--discard-ratio", "0.9"], "--discard-ratio sets how attention rollout is drawn; add --rollout"),
    (["--scale", "stretch"], "--scale must be shared or per-panel"),
])
def test_viz_command_refuses_options_that_do_nothing(saved, tmp_path, main_cli, extra, message):
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", saved / "plain.safetensors", "--dataset", "sample", "--limit", "1", *extra, "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_viz_command_per_panel_and_rollout(saved, tmp_path, main_cli):
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", saved / "plain.safetensors", "--dataset", "sample", "--limit", "1", "--rollout",
                         "--discard-ratio", "0.5", "--scale", "per-panel", "--query", "1,1", "-o", out)
    assert code == 0 and out.is_file(), err


def test_a_random_vit_s_looks_flat(timm_model):
    """The issue's case: a randomly initialised ViT-S attends almost uniformly (about 1/197 everywhere)."""
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image

    model = timm_model("vit_small_patch16_224", perturb=False)
    photo = [Image.fromarray(skimage.astronaut())]
    (cell,) = attention_panels([model], photo, options=VizOptions())[0][1:]
    assert 0.0040 < cell.heat.min() < cell.heat.max() < 0.0060  # a sliver around 1/197 = 0.0051
    assert cell.low == 0.0 and cell.high >= cell.heat.max()
    # its values take the top quarter of the colormap (0.0044..0.0058 here); per panel they would take all of it
    assert (cell.heat.max() - cell.heat.min()) / (cell.high - cell.low) < 0.3
    (stretched,) = attention_panels([model], photo, options=VizOptions(scale="per-panel"))[0][1:]
    assert (stretched.low, stretched.high) == (float(cell.heat.min()), float(cell.heat.max()))
    assert stretched.title.endswith("own scale (per panel)")


def test_panels_with_a_colour_bar_show_the_bars_colours_not_the_image():
    # A striped image under a flat map: with a colour bar, the panel is the bar's colour at the map's value
    # everywhere (the stripes of the image do not show through as "attention"); without one, the old overlay.
    from cbtool.viz.pictures import _colormap
    from cbtool.viz.scales import ColourScale

    image = np.zeros((32, 32, 3), dtype=np.float32)
    image[::4] = 1.0
    heat = np.full((4, 4), 0.02)
    panel = Panel("flat", image, heat, low=0.0, high=0.04)
    scale = ColourScale("class attention", 0.0, 0.04)
    with_bar = np.asarray(compose([[panel]], panel=32, scales=[scale])).astype(int)
    title = 4 + LINE
    inside = with_bar[4 + title + 2 : 4 + title + 30, 6:34]
    expected = (np.asarray(_colormap("inferno")(0.5)[:3]) * 255).round()
    assert np.abs(inside - expected).max() <= 1
    without = np.asarray(compose([[panel]], panel=32)).astype(int)[4 + title + 2 : 4 + title + 30, 6:34]
    assert np.ptp(without, axis=(0, 1)).max() > 50  # the stripes show through the old blend
