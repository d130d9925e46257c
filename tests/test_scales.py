"""cbs scales: --scale-init (0 keeps the model's function), and the learned scales reported by info and eval."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cbtool.models.checkpoint import describe, save
from cbtool.cli.app import app
from cbtool.errors import SpecError
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, scale_summary

TINY = ["--model-kwargs", "img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"]


def test_scale_init_zero_keeps_the_function_exactly(timm_model, images, logits):
    plain = timm_model()
    model = inject(timm_model(), CBSpec("cbs", "mlp", scale_init=0.0))
    x = images()
    assert torch.equal(logits(model, x), logits(plain, x))
    with torch.no_grad():  # and the scales still act once they move
        for _, op in find_broadcasts(model):
            op.scale.fill_(0.3)
    assert (logits(model, x) - logits(plain, x)).abs().max().item() > 1e-4


@pytest.mark.parametrize(("variant", "scale_init", "message"), [
    ("cb", 0.2, "scale_init sets the learned scales of cbs"),
    ("cbs", 1.5, r"must lie in \[0, 1\]"),
    ("cbs", -0.1, r"must lie in \[0, 1\]"),
])
def test_bad_scale_init_is_refused(variant, scale_init, message):
    with pytest.raises(SpecError, match=message):
        CBSpec(variant, scale_init=scale_init)


@pytest.mark.parametrize(("args", "message"), [
    (["--scale-init", "0.2"], "--variant cb has none"),
    (["--variant", "cbs", "--scale-init", "2"], "must lie in [0, 1]"),
])
def test_cli_scale_init_errors(main_cli, tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    code, stderr = main_cli("inject", "vit_tiny_patch16_224", "--no-pretrained", *TINY, *args, "-o", out)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_info_and_eval_report_the_learned_scales(timm_model, tmp_path, dtype):
    model = inject(timm_model(), CBSpec("cbs", "attn", layers="1"))
    with torch.no_grad():
        model.blocks[1].ls1.cb.scale.copy_(torch.linspace(0.1, 0.9, 32))
    expected = scale_summary(model)
    assert expected == [{"module": "blocks.1.ls1.cb", "layer": 1, "mean": pytest.approx(0.5),
                         "min": pytest.approx(0.1), "max": pytest.approx(0.9)}]
    path = save(model.to(dtype), tmp_path / "m.safetensors")
    rows = describe(path)["cb_scales"]
    assert [row["module"] for row in rows] == ["blocks.1.ls1.cb"]
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for key in ("mean", "min", "max"):
        assert rows[0][key] == pytest.approx(expected[0][key], abs=tolerance)
    shown = CliRunner().invoke(app, ["info", str(path)]).output
    assert "blocks.1.ls1.cb: mean 0.5" in shown


def test_plain_and_cb_models_have_no_scales(timm_model, tmp_path):
    assert scale_summary(timm_model()) is None
    assert scale_summary(inject(timm_model(), CBSpec("cb"))) is None
    assert describe(save(inject(timm_model(), CBSpec("cb")), tmp_path / "cb.safetensors"))["cb_scales"] is None


@pytest.mark.parametrize(("args", "message"), [
    (["--scale-init", "0"], "--scale-init goes with --inject"),
    (["--inject", "--scale-init", "0"], "--variant cb has none"),
])
def test_finetune_scale_init_errors(main_cli, tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    code, stderr = main_cli("finetune", "vit_tiny_patch16_224", "--no-pretrained", *TINY, "--dataset", "sample",
                            "--steps", "1", *args, "--run-dir", tmp_path / "run", "-o", out)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_finetune_injects_cbs_with_its_scale_init(main_cli, tmp_path):
    out = tmp_path / "m.safetensors"
    code, stderr = main_cli("finetune", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "28",
                            "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2",
                            "--dataset", "sample", "--limit", "40", "--steps", "1", "--batch-size", "8", "--workers", "0",
                            "--inject", "--variant", "cbs", "--scale-init", "0", "--train", "head",
                            "--run-dir", tmp_path / "run", "-o", out, "-q")  # fmt: skip
    assert code == 0, stderr
    rows = describe(out)["cb_scales"]
    assert len(rows) == 2 and all(row["max"] == 0.0 == row["min"] for row in rows)  # scales not trained: still 0
