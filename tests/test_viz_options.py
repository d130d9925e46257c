"""``cbtool viz`` takes eval's model options (--checkpoint, --num-classes, --img-size, --model-kwargs, --seed,
--no-pretrained) with eval's meaning, and the rollout settings have one check (``check_rollout_options``)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturb_

import cbtool
from cbtool.errors import VizError
from cbtool.viz import figure
from cbtool.viz.figure import VizOptions
from cbtool.viz.rollout import check_rollout_options

NAME = "vit_small_patch16_224"
ARCH = ["patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"]  # a tiny ViT-S/8; no img_size: --img-size sets it
TINY = [*ARCH, "img_size=32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with a plain timm state dict of a tiny 10-class ViT for 32 px images (``w.safetensors``), the
    same model as a cbtool file (``tiny.safetensors``), a Hugging Face folder and two real photos."""
    skimage = pytest.importorskip("skimage.data")
    from PIL import Image
    from safetensors.torch import save_file

    from cbtool.models.resolve import resolve

    folder = tmp_path_factory.mktemp("viz_options")
    torch.manual_seed(7)
    model = perturb_(resolve(NAME, pretrained=False, num_classes=10, model_kwargs=TINY), std=0.3, seed=7)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(folder / "w.safetensors"))
    cbtool.save(model, folder / "tiny.safetensors")
    (folder / "hf").mkdir()
    (folder / "hf" / "config.json").write_text('{"model_type": "vit", "architectures": ["ViTForImageClassification"]}')
    Image.fromarray(skimage.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage.coffee()).save(folder / "coffee.jpg")
    return folder


@pytest.fixture
def drawn(monkeypatch):
    """What ``cbtool viz`` computed and drew: every ``attention_maps`` call (model, batch, maps) and the panel rows."""
    seen: dict[str, list] = {"maps": [], "rows": []}
    real_maps, real_compose = figure.attention_maps, figure.compose

    def maps_spy(model, batch, layers=None):
        found = real_maps(model, batch, layers)
        seen["maps"].append((model, batch.clone(), found))
        return found

    def compose_spy(rows, **kwargs):
        seen["rows"].append(rows)
        return real_compose(rows, **kwargs)

    monkeypatch.setattr(figure, "attention_maps", maps_spy)
    monkeypatch.setattr(figure, "compose", compose_spy)
    return seen


def eval_model_and_batch(files, **options):
    """The model as ``cbtool eval`` builds it (``pipeline.evaluate_dataset``'s ``resolve`` call) and the photos
    through eval's transform (its data config, as the pipeline resolves it)."""
    from cbtool import data
    from cbtool.models import provenance
    from cbtool.models.resolve import resolve
    from cbtool.viz.figure import load_images

    model = resolve(NAME, seed=0, **options)
    transform = data.build_transform(data.resolve_preprocessing(provenance.data_config_of(model)))
    photos = load_images([files / "astronaut.png", files / "coffee.jpg"])
    return model, torch.stack([transform(photo) for photo in photos])


def provenance_of(model) -> dict:
    from cbtool.models import provenance

    return provenance.source_of(model)


def test_viz_checkpoint_draws_the_checkpoints_weights(files, tmp_path, main_cli, drawn):
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", NAME, "--checkpoint", files / "w.safetensors", "--num-classes", "10",
                         "--model-kwargs", *TINY, "--images", files / "astronaut.png", files / "coffee.jpg",
                         "--layers", "0,1", "--rollout", "-o", out)
    assert code == 0 and out.is_file(), err
    (model, batch, maps), = drawn["maps"]  # rollout asks for every layer: both, in order
    assert provenance_of(model)["checkpoint"] == str(files / "w.safetensors")
    reference, expected_batch = eval_model_and_batch(files, checkpoint=files / "w.safetensors", num_classes=10,
                                                     model_kwargs=TINY)
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch, expected_batch)
    expected = cbtool.attention_maps(reference, expected_batch)
    assert [m.shape for m in maps] == [(2, 2, 17, 17)] * 2
    for got, want in zip(maps, expected):
        assert torch.allclose(got, want, atol=1e-6)
    # the file's weights, not the seed's: random weights of the same architecture draw other maps
    random, _ = eval_model_and_batch(files, pretrained=False, num_classes=10, model_kwargs=TINY)
    assert (cbtool.attention_maps(random, expected_batch)[0] - maps[0]).abs().max() > 1e-2
    assert (maps[0] - 1 / 17).abs().max() > 1e-2  # perturbed weights: not the uniform maps of a fresh init


def test_viz_img_size_draws_on_the_new_grid(files, tmp_path, main_cli, drawn):
    out = tmp_path / "attn64.png"
    code, err = main_cli("viz", NAME, "--no-pretrained", "--model-kwargs", *ARCH, "--img-size", "64", "--images",
                         files / "astronaut.png", "--query", "7,7", "--panel", "64", "-o", out)
    assert code == 0 and out.is_file(), err
    (model, batch, maps), = drawn["maps"]
    reference, expected_batch = eval_model_and_batch(files, pretrained=False, img_size=64, model_kwargs=ARCH)
    assert batch.shape == (1, 3, 64, 64) and torch.equal(batch, expected_batch[:1])
    assert maps[0].shape == (1, 2, 65, 65)  # the class token and 8 x 8 patches of 8 px
    assert torch.allclose(maps[0], cbtool.attention_maps(reference, expected_batch[:1], layers=[-1])[0], atol=1e-6)
    (row,) = drawn["rows"][0]
    image, class_panel, query_panel = row
    assert image.image.shape == (64, 64, 3)  # the picture as the 64 px model sees it
    assert class_panel.heat.shape == query_panel.heat.shape == (8, 8)
    assert torch.allclose(torch.from_numpy(class_panel.heat), maps[0][0, :, 0, 1:].mean(0).reshape(8, 8), atol=1e-6)
    assert torch.allclose(torch.from_numpy(query_panel.heat), maps[0][0, :, 1 + 63, 1:].mean(0).reshape(8, 8),
                          atol=1e-6)  # the query (7,7): the last patch of the 8 x 8 grid
    assert "query (7,7)" in query_panel.title and image.title.endswith("query (7,7) outlined")
    assert query_panel.marker == (7, 7, 8, 8)
    # without --img-size the same architecture is built for 224 px: the 28 x 28 grid, and 224 px images
    code, err = main_cli("viz", NAME, "--no-pretrained", "--model-kwargs", *ARCH, "--images", files / "astronaut.png",
                         "--panel", "64", "-o", out)
    assert code == 0, err
    assert drawn["maps"][1][1].shape == (1, 3, 224, 224) and drawn["rows"][1][0][1].heat.shape == (28, 28)


@pytest.mark.parametrize("extra, message", [
    (["--no-pretrained", "--model-kwargs", *ARCH, "--img-size", "60"],
     "--img-size 60 is not a multiple of vit_small_patch16_224's patch size 8; use 56 or 64"),
    (["--no-pretrained", "--model-kwargs", *TINY, "--img-size", "64"],
     "--img-size 64 and --model-kwargs img_size=32 disagree; give one of them"),
    (["--checkpoint", "{files}/w.safetensors", "--model-kwargs", *TINY],
     "head.weight is (10, 32) in the file but (1000, 32) in the model; check the model name and --model-kwargs (or "
     "--num-classes for another head)"),
    (["--checkpoint", "{files}/missing.safetensors", "--model-kwargs", *TINY], "{files}/missing.safetensors does not exist"),
    (["--no-pretrained", "--model-kwargs", *TINY, "--seed", "-1"], "--seed must be in [0, 4294967295], not -1"),
    (["--no-pretrained", "--model-kwargs", *TINY, "--num-classes", "3", "--model-kwargs", "num_classes=10"],
     "--num-classes 3 and --model-kwargs num_classes=10 disagree"),
    (["--no-pretrained", "--model-kwargs", *TINY, "--head-fusion", "max"],
     "--head-fusion sets how attention rollout is drawn; add --rollout, or drop --head-fusion"),
    (["--no-pretrained", "--model-kwargs", *TINY, "--rollout", "--head-fusion", "median"],
     "rollout fuses heads by mean, max or min (--head-fusion), not 'median'"),
    (["--no-pretrained", "--model-kwargs", *TINY, "--rollout", "--discard-ratio", "1"], "--discard-ratio must be in [0, 1)"),
])
def test_viz_bad_model_options_are_one_line(files, tmp_path, main_cli, extra, message):
    out = tmp_path / "attn.png"
    extra = [str(item).format(files=files) for item in extra]
    code, err = main_cli("viz", NAME, *extra, "--images", files / "astronaut.png", "-o", out)
    assert code == 2 and message.format(files=files) in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".attn.png.*"))


@pytest.mark.parametrize("model, extra, message", [
    ("{files}/hf", ["--checkpoint", "{files}/w.safetensors"],
     "--checkpoint goes with a timm model name; a Hugging Face folder holds its own weights"),
    ("{files}/hf", ["--img-size", "64"], "--img-size is not supported for transformers models"),
    ("{files}/tiny.safetensors", ["--checkpoint", "{files}/w.safetensors"],
     "--checkpoint goes with a timm model name, not with a file"),
    ("{files}/tiny.safetensors", ["--img-size", "64"], "takes 32 px inputs, not 64 (--img-size)"),
    ("{files}/tiny.safetensors", ["--model-kwargs", "depth=3"],
     "--img-size and --model-kwargs cannot change a saved model's architecture"),
])
def test_viz_refuses_what_eval_refuses(files, tmp_path, main_cli, model, extra, message):
    out = tmp_path / "attn.png"
    extra = [item.format(files=files, out=out) for item in extra]
    code, err = main_cli("viz", model.format(files=files), *extra, "--images", files / "astronaut.png", "-o", out)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    code, eval_err = main_cli("eval", model.format(files=files), *extra, "--dataset", "sample", "--limit", "2")
    assert code == 2 and message in eval_err, eval_err  # eval's own words for the same options


def test_viz_output_cannot_be_the_checkpoint(files, tmp_path, main_cli):
    weights = tmp_path / "weights.png"  # a weights file under a name -o takes
    weights.write_bytes((files / "w.safetensors").read_bytes())
    code, err = main_cli("viz", NAME, "--checkpoint", weights, "--num-classes", "10", "--model-kwargs", *TINY,
                         "--images", files / "astronaut.png", "-o", weights)
    assert code == 2 and f"--output {weights} is an input of this command" in err, err
    assert weights.read_bytes() == (files / "w.safetensors").read_bytes()


def test_viz_num_classes_keeps_a_saved_model_drawable(files, tmp_path, main_cli, drawn):
    """--num-classes changes the head, which attention never reaches: the maps are the file's."""
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", files / "tiny.safetensors", "--num-classes", "3", "--images", files / "astronaut.png",
                         "-o", out)
    assert code == 0, err
    (model, batch, maps), = drawn["maps"]
    assert model.num_classes == 3
    reference = cbtool.load(files / "tiny.safetensors")
    assert torch.allclose(maps[0], cbtool.attention_maps(reference, batch, layers=[-1])[0], atol=1e-6)


# ----- the rollout settings: one check ----------------------------------------------------------------------------
@pytest.mark.parametrize("head_fusion, ratio, rollout, expected", [
    (None, None, True, ("mean", 0.0)),
    ("max", 0.5, True, ("max", 0.5)),
    ("min", 0, True, ("min", 0.0)),
    (None, None, False, ("mean", 0.0)),
    ("median", None, True, "rollout fuses heads by mean, max or min"),
    ("all", None, True, "rollout fuses heads by mean, max or min"),
    (None, 1.0, True, "--discard-ratio must be in [0, 1), not 1.0"),
    (None, -0.1, True, "--discard-ratio must be in [0, 1), not -0.1"),
    (None, float("nan"), True, "--discard-ratio must be in [0, 1), not nan"),
    ("max", None, False, "--head-fusion sets how attention rollout is drawn; add --rollout"),
    (None, 0.5, False, "--discard-ratio sets how attention rollout is drawn; add --rollout"),
    ("mean", 0.0, False, ("mean", 0.0)),  # the defaults change nothing: replace(options, rollout=False) works
])
def test_check_rollout_options(head_fusion, ratio, rollout, expected):
    if isinstance(expected, str):
        with pytest.raises(VizError, match=expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            check_rollout_options(head_fusion, ratio, rollout=rollout)
        with pytest.raises(VizError):  # VizOptions asks the same check when it is made
            VizOptions(rollout=rollout, head_fusion=head_fusion, discard_ratio=ratio)
        return
    assert check_rollout_options(head_fusion, ratio, rollout=rollout) == expected
    options = VizOptions(rollout=rollout, head_fusion=head_fusion, discard_ratio=ratio)
    drawn_with = (options.head_fusion, options.discard_ratio)
    assert drawn_with == (expected if rollout else (head_fusion, ratio))  # without rollout: kept as given


def test_viz_options_check_themselves():
    from dataclasses import replace

    with pytest.raises(VizError, match="--scale must be shared or per-panel"):
        VizOptions(scale="stretch")
    assert replace(VizOptions(rollout=True), rollout=False).rollout is False
    assert VizOptions(rollout=True, discard_ratio=0.9).head_fusion == "mean"
    with pytest.raises(VizError, match="rollout fuses heads"):
        cbtool.viz.attention_rollout([torch.full((1, 1, 5, 5), 0.2)], [], head_fusion="median")


def test_viz_checks_the_input_size_as_eval_does(files, tmp_path, main_cli):
    """A file whose data config names a size its model does not take is refused in eval's words (it was a
    traceback from the forward), and --img-size draws it at the size it takes."""
    from cbtool.models import provenance

    model = cbtool.load(files / "tiny.safetensors")
    provenance.attach(model, data_config={**provenance.data_config_of(model), "input_size": [3, 48, 48]})
    cbtool.save(model, tmp_path / "says48.safetensors")
    out = tmp_path / "attn.png"
    code, err = main_cli("viz", tmp_path / "says48.safetensors", "--images", files / "astronaut.png", "-o", out)
    message = "says48 takes 32 px inputs, not 48 (the input size); pass --img-size 32"
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    code, eval_err = main_cli("eval", tmp_path / "says48.safetensors", "--dataset", "sample", "--limit", "2")
    assert code == 2 and message.replace("says48", str(tmp_path / "says48.safetensors")) in eval_err, eval_err
    code, err = main_cli("viz", tmp_path / "says48.safetensors", "--img-size", "32", "--images", files / "astronaut.png",
                         "-o", out)
    assert code == 0 and out.is_file(), err
