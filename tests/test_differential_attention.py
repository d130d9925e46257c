"""timm's differential attention (``attn_layer='diff'``): CB is placed as in any ViT block, but its maps are not
distributions, so density reads "not applicable" with the reason and pictures are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

from cbtool.models.checkpoint import save
from cbtool.errors import VizError
from cbtool.evaluation import evaluate
from cbtool.families import detect
from cbtool.families.base import NOT_APPLICABLE
from cbtool.models.resolve import resolve
from cbtool.spec import CBSpec
from cbtool.surgery import inject

TINY_DIFF = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
NAME = "vit_dwee_patch16_reg1_gap_256"


def tiny_diff(num_classes: int = 5):
    torch.manual_seed(0)
    return resolve(NAME, pretrained=False, num_classes=num_classes, model_kwargs=TINY_DIFF).float().eval()


def test_density_is_not_applicable_with_the_reason():
    model = inject(tiny_diff(), CBSpec("cb", "mlp"))
    layouts = detect(model).attention_layouts(model, (32, 32))
    assert [layout.kind for layout in layouts] == [NOT_APPLICABLE] * 2
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (result,) = evaluate([model], [(x, torch.zeros(4, dtype=torch.long), torch.arange(4))], density=True,
                         progress=False)  # fmt: skip
    density = result.density
    assert density["layer_kinds"] == [NOT_APPLICABLE] * 2
    assert set(density["not_applicable"]) == {"0", "1"}
    assert "differential attention" in density["not_applicable"]["0"]
    assert density["entropy_mean"] is None and density["entropy_per_layer"] == [None, None]
    assert density["distance_mean"] is None and density["entropy_per_layer_head"] == [[], []]


def test_mixed_model_measures_only_the_plain_layers():
    """One plain block among differential ones: its maps are measured with its own head count."""
    from timm.layers import Attention

    model = tiny_diff()
    old = model.blocks[1].attn
    model.blocks[1].attn = Attention(32, num_heads=2, qkv_bias=True)
    del old
    layouts = detect(model).attention_layouts(model, (32, 32))
    assert [layout.kind for layout in layouts] == [NOT_APPLICABLE, "global"]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    (result,) = evaluate([model], [(x, torch.zeros(2, dtype=torch.long), torch.arange(2))], density=True,
                         progress=False)  # fmt: skip
    assert result.density["entropy_per_layer"][0] is None
    assert len(result.density["entropy_per_layer_head"][1]) == 2
    assert 0.0 < result.density["entropy_mean"] <= 1.0


def test_attention_maps_refuse_in_one_line():
    from cbtool import attention_maps

    model = tiny_diff()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(VizError) as raised:
        attention_maps(model, x)
    assert "\n" not in str(raised.value) and "differential attention" in str(raised.value)
    with pytest.raises(VizError, match="differential attention"):
        attention_maps(model, x, layers=[-1])


def test_eval_density_and_viz_from_the_command_line(tmp_path, main_cli):
    path = tmp_path / "diff.safetensors"
    save(inject(tiny_diff(10), CBSpec("cb", "mlp")), path)
    code, err = main_cli("eval", path, "--dataset", "sample", "--density", "--workers", "0", "-q",
                         "--json", tmp_path / "out.json", "--plot", tmp_path / "density.png")  # fmt: skip
    # The results are written; an empty density plot is not: one line says why.
    assert code == 2 and err.count("\n") == 1 and "no layer has attention density to plot" in err, err
    assert "differential attention" in err and not (tmp_path / "density.png").exists()
    density = json.loads((tmp_path / "out.json").read_text())["models"][0]["density"]
    assert density["layer_kinds"] == [NOT_APPLICABLE] * 2 and density["entropy_mean"] is None
    code, err = main_cli("viz", path, "--dataset", "sample", "--limit", "1", "--output", tmp_path / "viz.png")
    assert code == 2 and err.count("\n") == 1 and "differential attention" in err, err
    assert not (tmp_path / "viz.png").exists()


def test_density_table_says_why_layers_are_not_measured():
    from cbtool.report import density_table

    reason = "differential attention: no distribution"
    model = {"label": "m", "density": {"entropy_per_layer": [None, 0.5], "distance_per_layer": [None, 3.0],
                                       "not_applicable": {"0": reason}}}  # fmt: skip
    text = density_table([model])
    assert text.splitlines()[-1] == f"layers 0 not measured: {reason}"
    assert "layers 0 of m not measured" in density_table([model, {**model, "label": "n"}])
    assert "\n\nlayers 0 not measured" in density_table([model], markdown=True)


def test_density_plot_draws_the_measured_layers_and_refuses_when_there_are_none(tmp_path):
    from cbtool.errors import CbtoolError
    from cbtool.report import plot_density

    mixed = {"label": "m", "density": {"entropy_per_layer": [None, 0.5], "distance_per_layer": [None, 3.0],
                                       "not_applicable": {"0": "differential attention"}}}  # fmt: skip
    assert plot_density([mixed], tmp_path / "mixed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    none = {"label": "n", "density": {"entropy_per_layer": [None], "distance_per_layer": [None],
                                      "not_applicable": {"0": "differential attention"}}}  # fmt: skip
    with pytest.raises(CbtoolError, match="no layer has attention density to plot: differential attention"):
        plot_density([none], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
