"""SigLIP2 (NaFlex): patch-sequence inputs, mask-aware CB, and cbtool's commands against transformers' own processor.

The hand-written references, uniform-entropy and remove/cbs-0 tests are the ``hf-siglip2*`` cases of
``test_family_reference``. Here: padding tokens (as the image processor makes them) never enter CB's mean or the
density; cbtool's patches are the processor's; and ``cbtool eval`` on an image folder gives the figures that
transformers' ``Siglip2ImageProcessor`` and the model give on the same files, with and without CB.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_eval import DIGIT_CLASSES, digit_picks, write_folder
from test_family_reference import _HF_NAFLEX, _TEXT, POSITIONS, perturbed

from cbtool.families import detect
from cbtool.families.hf_siglip2 import patch_inputs
from cbtool.metrics.density import DensityAccumulator
from cbtool.spec import CBSpec
from cbtool.surgery import inject

PATCH = 8


def vision_model(attention: str = "sdpa"):
    import transformers

    torch.manual_seed(0)
    config = transformers.Siglip2VisionConfig(**_HF_NAFLEX, vision_use_head=True)
    config._attn_implementation = attention
    return perturbed(transformers.Siglip2VisionModel(config))


def classifier(num_labels: int = 10):
    import transformers

    torch.manual_seed(0)
    config = transformers.Siglip2Config(vision_config=_HF_NAFLEX, text_config=_TEXT, num_labels=num_labels)
    config.architectures = ["Siglip2ForImageClassification"]
    return perturbed(transformers.Siglip2ForImageClassification(config))


def alone_and_padded(rows: int = 3, cols: int = 4, pad_to: int = 16) -> tuple[dict, dict]:
    """One image's inputs as they are, and padded with ``pad_to - rows * cols`` zero patches as the processor pads."""
    image = torch.randn(1, 3, rows * PATCH, cols * PATCH, generator=torch.Generator().manual_seed(3))
    alone = patch_inputs(image, PATCH)
    extra = pad_to - rows * cols
    padded = dict(alone)
    padded["pixel_values"] = torch.cat([alone["pixel_values"], torch.zeros(1, extra, 3 * PATCH * PATCH)], 1)
    padded["pixel_attention_mask"] = torch.cat([alone["pixel_attention_mask"],
                                                torch.zeros(1, extra, dtype=torch.int32)], 1)
    return alone, padded


def test_patches_are_the_image_processors():
    from transformers.models.siglip2.image_processing_siglip2 import convert_image_to_patches

    images = torch.randn(2, 3, 16, 24)
    got = patch_inputs(images, PATCH)
    assert torch.equal(got["pixel_values"], torch.stack([convert_image_to_patches(image, PATCH) for image in images]))
    assert got["spatial_shapes"].tolist() == [[2, 3], [2, 3]]
    assert got["pixel_attention_mask"].tolist() == [[1] * 6] * 2


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("position", POSITIONS)
def test_cb_averages_the_valid_tokens_only(position, attention, monkeypatch):
    plain = vision_model(attention)
    alone, padded = alone_and_padded()
    with torch.no_grad():
        reference = plain(**alone)
        assert torch.allclose(plain(**padded).pooler_output, reference.pooler_output, atol=1e-5)  # it ignores padding
        model = inject(copy.deepcopy(plain), CBSpec("cb", position))
        got_alone, got_padded = model(**alone), model(**padded)
        assert (got_padded.pooler_output - got_alone.pooler_output).abs().max().item() < 1e-5
        assert (got_padded.last_hidden_state[:, :12] - got_alone.last_hidden_state).abs().max().item() < 1e-5
        assert (got_alone.pooler_output - reference.pooler_output).abs().max().item() > 1e-4  # CB is there
        # Without the mask, the mean takes in the 4 padding tokens: the test would fail.
        monkeypatch.setattr(type(detect(model)), "token_weights", lambda self, mask: None)
        assert (model(**padded).pooler_output - got_alone.pooler_output).abs().max().item() > 1e-4


@pytest.mark.parametrize("position", POSITIONS)
def test_a_batch_of_differently_padded_images_gives_each_image_its_own_result(position):
    """As the processor batches them: a 3 x 4 and a 2 x 2 patch grid, both padded to 16 tokens (random padding
    values, so that a mean over padding cannot go unnoticed)."""
    model = inject(vision_model(), CBSpec("cb", position))
    generator = torch.Generator().manual_seed(4)
    alone, rows = [], []
    for grid in ((3, 4), (2, 2)):
        inputs = patch_inputs(torch.randn(1, 3, grid[0] * PATCH, grid[1] * PATCH, generator=generator), PATCH)
        alone.append(inputs)
        count = grid[0] * grid[1]
        rows.append({"pixel_values": torch.cat([inputs["pixel_values"], torch.randn(1, 16 - count, 3 * PATCH * PATCH,
                                                                                      generator=generator)], 1),
                     "pixel_attention_mask": torch.cat([inputs["pixel_attention_mask"],
                                                        torch.zeros(1, 16 - count, dtype=torch.int32)], 1),
                     "spatial_shapes": inputs["spatial_shapes"]})
    batch = {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
    with torch.no_grad():
        together = model(**batch)
        for index, inputs in enumerate(alone):
            own = model(**inputs)
            count = inputs["pixel_values"].shape[1]
            assert (together.pooler_output[index] - own.pooler_output[0]).abs().max().item() < 1e-5
            assert (together.last_hidden_state[index, :count] - own.last_hidden_state[0]).abs().max().item() < 1e-5


def test_density_leaves_padding_out():
    model = vision_model()
    family = detect(model)
    alone, padded = alone_and_padded()
    results = []
    for inputs in (alone, padded):
        accumulator = DensityAccumulator(family.attention_layouts(model, (3 * PATCH, 4 * PATCH)))
        with torch.no_grad(), family.capture_attention(model, accumulator):
            model(**inputs)
        results.append(accumulator.result())
    flat = [[value for layer in result["entropy_per_layer_head"] for value in layer] for result in results]
    assert flat[1] == pytest.approx(flat[0], abs=1e-5)
    # Distances need the keys on the image's grid: measured for the image alone, not made up for padded keys.
    assert all(value > 0 for value in results[0]["distance_per_layer"])
    assert results[1]["distance_mean"] is None and set(results[1]["distance_per_layer"]) == {None}
    # ... also where the padded length happens to fill a square grid: 2 x 6 patches padded to 16 = 4 x 4
    _, padded = alone_and_padded(rows=2, cols=6, pad_to=16)
    accumulator = DensityAccumulator(family.attention_layouts(model, (4 * PATCH, 4 * PATCH)))
    with torch.no_grad(), family.capture_attention(model, accumulator):
        model(**padded)
    assert accumulator.result()["distance_mean"] is None
    assert 0.2 < results[0]["entropy_mean"] < 0.99  # a real, not uniform, map


def test_data_config_is_the_processors_square_size(tmp_path):
    import transformers

    from cbtool.models.resolve import hf_data_config

    config = transformers.Siglip2VisionConfig(patch_size=16, num_patches=256)
    assert hf_data_config(config, None)["input_size"] == [3, 256, 256]
    processor = {"max_num_patches": 576, "patch_size": 16, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert hf_data_config(transformers.Siglip2Config(vision_config=config.to_dict()), processor)["input_size"] == \
        [3, 384, 384]
    assert hf_data_config(config, None)["mean"] == [0.5, 0.5, 0.5]  # SigLIP's processors' default


def processor_figures(model, folder, max_num_patches: int) -> tuple[float, float]:
    """(top-1 %, mean loss) of ``model`` on the PNGs of ``folder``, through transformers' Siglip2ImageProcessor."""
    import transformers

    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=max_num_patches)
    files = sorted(folder.glob("*/*.png"))
    labels = torch.tensor([DIGIT_CLASSES.index(path.parent.name) for path in files])
    inputs = processor(images=[Image.open(path).convert("RGB") for path in files], return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == max_num_patches  # padded
    with torch.no_grad():
        logits = model(**inputs).logits
    return float((logits.argmax(1) == labels).float().mean() * 100), float(F.cross_entropy(logits, labels))


def test_eval_equals_the_image_processor_path(tmp_path, main_cli):
    """cbtool feeds unpadded patches; the processor pads to 20 (4 padding tokens): the same figures, plain and CB."""
    import transformers

    folder = write_folder(tmp_path / "digits", digit_picks(0, 40), DIGIT_CLASSES)
    plain = classifier()
    plain.save_pretrained(tmp_path / "plain")
    transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=20).save_pretrained(tmp_path / "plain")
    code, err = main_cli("inject", tmp_path / "plain", "-o", tmp_path / "cb.safetensors", "--quiet")
    assert code == 0, err
    code, err = main_cli("eval", tmp_path / "plain", tmp_path / "cb.safetensors", "--dataset", folder,
                         "--json", tmp_path / "eval.json", "--quiet")
    assert code == 0, err
    document = json.loads((tmp_path / "eval.json").read_text())
    got = {entry["label"]: entry["metrics"] for entry in document["models"]}
    cb_model = inject(copy.deepcopy(plain), CBSpec("cb"))
    for label, model in ((str(tmp_path / "plain"), plain), (str(tmp_path / "cb.safetensors"), cb_model)):
        top1, loss = processor_figures(model.eval(), folder, max_num_patches=20)
        metrics = got[label]
        assert metrics["top1"] == pytest.approx(top1, abs=1e-6) and metrics["loss"] == pytest.approx(loss, abs=1e-4)
    assert got[str(tmp_path / "plain")]["loss"] != pytest.approx(got[str(tmp_path / "cb.safetensors")]["loss"],
                                                                 abs=1e-3)  # CB changes the figures


def test_commands_run_on_a_siglip2_tower(tmp_path, main_cli):
    """A headless vision tower: inject with a head, finetune, eval with density, viz and bench, all offline."""
    import transformers

    folder = write_folder(tmp_path / "digits", digit_picks(0, 60), DIGIT_CLASSES)
    tower = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**_HF_NAFLEX))
    tower.save_pretrained(tmp_path / "tower")
    steps = [
        ("inject", tmp_path / "tower", "--num-classes", "10", "-o", tmp_path / "cb.safetensors"),
        ("finetune", tmp_path / "cb.safetensors", "--dataset", folder, "--epochs", "1", "--batch-size", "16",
         "-o", tmp_path / "healed.safetensors", "--run-dir", tmp_path / "run"),
        ("eval", tmp_path / "healed.safetensors", "--dataset", folder, "--density", "--json", tmp_path / "e.json"),
        ("viz", tmp_path / "healed.safetensors", "--dataset", folder, "--limit", "2", "-o", tmp_path / "v.png"),
        ("bench", tmp_path / "tower", "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--json",
         tmp_path / "b.json"),
    ]
    for step in steps:
        code, err = main_cli(*step, "--quiet")
        assert code == 0, (step[0], err)
    metrics = json.loads((tmp_path / "e.json").read_text())["models"][0]
    assert 0.0 < metrics["density"]["entropy_mean"] <= 1.0
    assert np.isfinite(metrics["metrics"]["loss"])
    assert json.loads((tmp_path / "b.json").read_text())["input_size"] == [3, 32, 32]


@pytest.mark.parametrize(("build", "unreached"), [
    (classifier, "vision_model.head."),  # the attention-pooling head beside the classifier's mean pooling
    (lambda: perturbed(__import__("transformers").CLIPForImageClassification(__import__("transformers").CLIPConfig(
        vision_config=_HF_CLIP, text_config=_TEXT, num_labels=3))), "vision_model.post_layernorm."),
    (lambda: perturbed(__import__("transformers").ViTForImageClassification(__import__("transformers").ViTConfig(
        **_HF_CLIP, num_labels=3))), None),
])
def test_parameters_the_logits_do_not_use_are_found(build, unreached):
    from cbtool.optim import unreached_parameters

    model = build().train()
    names = unreached_parameters(model, detect(model), (3, 32, 32))
    assert model.training  # the probe ran in eval mode and restored the mode
    assert all(p.grad is None for p in model.parameters())  # every .grad put back as it was
    if unreached is None:
        assert names == []
        return
    assert names and all(name.startswith(unreached) for name in names)
    # each of them really has no gradient from the logits, and every other parameter has one
    images = torch.randn(2, 3, 32, 32)
    detect(model).logits(detect(model).run(model.eval(), images)).sum().backward()
    assert {name for name, p in model.named_parameters() if p.grad is None} == set(names)


def test_blocks_under_activation_checkpointing_are_not_mistaken_for_unreached():
    import timm
    import torch.utils.checkpoint

    from cbtool.optim import unreached_parameters

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=3)
    for block in model.blocks:  # reentrant checkpointing: the blocks' parameters enter the graph in the backward
        block.forward = lambda x, _forward=block.forward, **kw: torch.utils.checkpoint.checkpoint(
            _forward, x, use_reentrant=True, **kw)
    assert unreached_parameters(model, detect(model), (3, 32, 32)) == []


def test_a_run_keeps_its_unreached_parameters_on_resume(tmp_path, nan_loss_at):
    """A resumed run leaves out the parameters it left out when it started; a run saved before cbtool left them out
    (its optimizer holds them) resumes with them, as it started."""
    import cbtool.train.prepare
    from cbtool.errors import TrainingError
    from cbtool.train import FinetuneConfig, finetune, resolve_training_data

    data = resolve_training_data("sample", limit=40, val_limit=20)[:2]

    def settings(name, **extra):
        return FinetuneConfig(batch_size=10, workers=0, quiet=True, run_dir=str(tmp_path / name), warmup_steps=0,
                              steps=4, lr=1e-3, save_every=1, **extra)

    for name, probe in (("new", None), ("old", lambda *args: [])):  # "old": as cbtool 0.2.0 trained
        with pytest.MonkeyPatch.context() as patch:
            if probe is not None:
                patch.setattr(cbtool.train.prepare, "unreached_parameters", probe)
            nan_loss_at(3)
            with pytest.raises(TrainingError):
                finetune(classifier(), *data, settings(name))
            nan_loss_at(None)
        saved = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        if probe is not None:
            del saved["unreached"]  # 0.2.0's checkpoints have no such entry
            torch.save(saved, tmp_path / name / "checkpoint.pt")
        else:
            assert saved["unreached"] and all(key.startswith("vision_model.head.") for key in saved["unreached"])
        # The old run's optimizer holds the head: leaving it out now would not fit its parameter groups.
        result = finetune(classifier(), *data, settings(name, resume=str(tmp_path / name)))
        assert result.step == 4
        assert result.model.vision_model.head.probe.requires_grad == (probe is not None)
        assert torch.equal(result.model.state_dict()["vision_model.head.probe"],
                           classifier().state_dict()["vision_model.head.probe"])  # no gradient reaches it either way


_HF_CLIP = {k: v for k, v in _HF_NAFLEX.items() if k != "num_patches"} | {"image_size": 32}


@pytest.mark.slow
def test_torchrun_fine_tunes_a_classifier_with_an_unused_pooling_head(tmp_path, cli_env):
    """Under DDP every trained parameter must get a gradient: SigLIP2's unused head is left out, and 2 ranks x 8
    images give the weights of 1 process x 16."""
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    model = classifier()
    model.save_pretrained(tmp_path / "plain")
    common = ["finetune", str(tmp_path / "plain"), "--inject", "--dataset", "sample", "--limit", "64", "--val-limit",
              "16", "--workers", "0", "--steps", "3", "--lr", "1e-3", "--no-augment"]
    torchrun = Path(sys.executable).with_name("torchrun")
    runs = {
        "two": [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cbtool", *common, "--batch-size", "8"],
        "one": [sys.executable, "-m", "cbtool", *common, "--batch-size", "16"],
    }
    for name, command in runs.items():
        done = subprocess.run([*command, "--run-dir", str(tmp_path / name), "-o", str(tmp_path / f"{name}.safetensors")],
                              env=cli_env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "parameter tensors do not reach the logits and are not trained (vision_model.head)" in done.stderr
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    for key in one:  # a key bias has no gradient but rounding (softmax ignores it), which Adam scales up to lr
        assert torch.allclose(one[key], two[key], atol=1e-5 if not key.endswith("k_proj.bias") else 5e-3), key
    original = model.state_dict()
    assert torch.equal(one["vision_model.head.probe"], original["vision_model.head.probe"])  # not trained
    assert not torch.equal(one["classifier.weight"], original["classifier.weight"])


def test_bench_times_the_vision_tower_of_a_vision_text_model(tmp_path, main_cli):
    import transformers

    dual = transformers.Siglip2Model(transformers.Siglip2Config(vision_config=_HF_NAFLEX, text_config=_TEXT))
    dual.save_pretrained(tmp_path / "dual")
    code, err = main_cli("bench", tmp_path / "dual", "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--json",
                         tmp_path / "b.json", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["input_size"] == [3, 32, 32]


@pytest.mark.parametrize(("edit", "said"), [
    ({"max_num_patches": "abc"}, "preprocessor_config.json: max_num_patches must be a positive integer, not 'abc'"),
    ({"max_num_patches": -4}, "max_num_patches must be a positive integer, not -4"),
    ({"patch_size": 5}, "preprocessor_config.json cuts 5 px patches, and the model takes 8 px patches"),
])
def test_an_image_processor_that_cannot_describe_the_input_is_refused(tmp_path, main_cli, edit, said):
    import transformers

    classifier().save_pretrained(tmp_path / "m")
    processor = transformers.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=16).to_dict()
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({**processor, **edit}))
    code, err = main_cli("eval", tmp_path / "m", "--dataset", "sample", "--limit", "10")
    lines = [line for line in err.splitlines() if line.startswith("cbtool:")]  # not save_pretrained's bar
    assert code == 2 and len(lines) == 1 and said in lines[0] and "Traceback" not in err, err


def test_model_kwargs_and_grids_that_cannot_work_are_refused(tmp_path, main_cli):
    import transformers

    transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**_HF_NAFLEX)).save_pretrained(tmp_path / "t")
    classifier().save_pretrained(tmp_path / "c")
    out = tmp_path / "out.safetensors"
    cases = [
        ((tmp_path / "t", "--model-kwargs", "nonsense=3"), "Siglip2VisionConfig has no field 'nonsense'"),
        ((tmp_path / "c", "--model-kwargs", "num_patches=25"),
         "Siglip2Config has no field 'num_patches'; it is a field of Siglip2VisionConfig"),
        ((tmp_path / "t", "--model-kwargs", "num_patches=25"), "its weights have other shapes than the model "
                                                                "--model-kwargs describe"),
        ((tmp_path / "t", "--no-pretrained", "--model-kwargs", "num_patches=15"), "num_patches 15, not a square"),
    ]
    for args, said in cases:
        code, err = main_cli("inject", *args, "-o", out)
        lines = [line for line in err.splitlines() if line.startswith("cbtool:")]
        assert code == 2 and len(lines) == 1 and said in lines[0] and "Traceback" not in err, (args, err)
        assert not out.exists()


def test_eval_says_how_siglip2_images_are_resized(tmp_path, main_cli):
    classifier().save_pretrained(tmp_path / "m")
    code, err = main_cli("eval", tmp_path / "m", "--dataset", "sample", "--limit", "10")
    assert code == 0, err
    assert "SigLIP2 gets every image resized to 32x32 px; its image processor keeps each image's aspect ratio" in err
