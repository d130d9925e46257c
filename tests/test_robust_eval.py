"""``cbtool eval --corruptions``: every cell equals an independent corrupt-and-count loop, does not depend on the
batch size, CE/mCE agree with ``summarize``, and the plot, the example pictures and the label spaces of the
distribution-shift sets (ImageNet-A/R, Sketch, V2) are right.

Real images (scikit-learn digits as PNG folders) and a tiny timm ViT trained here for a few steps, at 32 px (the
corruptions need 32 px or more).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cbtool import data
from cbtool.models.checkpoint import save
from cbtool.results import SCHEMA_VERSION
from cbtool.cli.app import app
from cbtool.robustness import corrupt, summarize
from cbtool.models.resolve import resolve
from test_eval import DIGIT_CLASSES, digit_picks, tiny_vit, train, write_folder

CORRUPTIONS = ["gaussian_noise", "fog"]
IMAGES = 24


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("digits"), digit_picks(0, IMAGES), DIGIT_CLASSES)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    import cbtool

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    trained = train(tiny_vit(), steps=60)
    with_cb = cbtool.inject(copy.deepcopy(trained), cbtool.CBSpec(variant="cb", position="mlp", layers="all"))
    return {"plain": save(trained, root / "plain.safetensors"), "cb": save(with_cb, root / "cb.safetensors")}


def run_eval(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *map(str, args), "--workers", "0", "-q"])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def document(models, folder, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("out")
    code, output = run_eval(models["plain"], models["cb"], "--dataset", folder, "--corruptions", ",".join(CORRUPTIONS),
                            "--severities", "1-5", "--batch-size", "7", "--json", out / "r.json",
                            "--plot", out / "robust.png")  # fmt: skip
    assert code == 0, output
    assert "gaussian_noise" in output and "vs first" in output and "mean of 2 corruptions" in output
    assert "in % of AlexNet's" not in output and "no CE or mCE" in output and "has 10 classes" in output
    assert (out / "robust.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "r.json").read_text())


def independent_cells(model_path: Path, folder: Path, config: dict, corruption: str, severities) -> dict[int, str]:
    """Corrupt un-normalised images with ``corrupt`` (keys: dataset indices), normalise, run the model, count hits.

    ``config``: the preprocessing record of the document, handed to timm's own ``create_transform``."""
    model = resolve(str(model_path)).eval()
    unit, labels = unit_images(folder, config)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    found = {}
    with torch.no_grad():
        for severity in severities:
            images = (corrupt(unit, corruption, severity, list(range(len(labels)))) - mean) / std
            hits = model(images).argmax(1).eq(torch.tensor(labels))
            found[severity] = "".join("1" if h else "0" for h in hits.tolist())
    return found


def unit_images(folder: Path, config: dict) -> tuple[torch.Tensor, list[int]]:
    """The folder's images resized and cropped by timm's own ``create_transform`` (from the document's
    ``preprocessing`` record), in [0, 1] before normalisation, and their labels."""
    from timm.data import create_transform

    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    steps = create_transform(**config, is_training=False).transforms
    to_unit = [t for t in steps if type(t).__name__ != "Normalize"]  # resize, crop, ToTensor
    ds = data.resolve_dataset(str(folder), None, purpose="eval", num_model_classes=10)
    pictures, labels = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack([_compose(to_unit, p) for p in pictures]), list(labels)


def _compose(steps, picture):
    for step in steps:
        picture = step(picture)
    return picture


def test_cells_equal_an_independent_computation(document, models, folder):
    assert document["schema_version"] == SCHEMA_VERSION == 3
    for model, path in zip(document["models"], [models["plain"], models["cb"]]):
        record = model["robustness"]
        assert record["corruptions"] == CORRUPTIONS and record["severities"] == [1, 2, 3, 4, 5]
        for corruption in CORRUPTIONS:
            expected = independent_cells(path, folder, document["preprocessing"], corruption, [1, 3, 5])
            for severity, correct in expected.items():
                assert record["correct"][corruption][str(severity)] == correct, (corruption, severity)
                error = 100.0 * correct.count("0") / len(correct)
                assert record["error"][corruption][str(severity)] == pytest.approx(error)
        assert record["clean_error"] == pytest.approx(100.0 - model["metrics"]["top1"])


def test_no_mce_outside_imagenet_but_the_mean_corruption_error(document):
    """Digits (10 classes) are not ImageNet-1k validation: no CE, no mCE, the reason in the record; the mean
    corruption error is the mean of the per-corruption means, in points, and names the corruptions it averages."""
    for model in document["models"]:
        record = model["robustness"]
        table = {c: {int(s): e / 100 for s, e in record["error"][c].items()} for c in CORRUPTIONS}
        summary = summarize(table, clean_error=record["clean_error"] / 100)
        assert record["mean_error"] == pytest.approx({c: 100 * v for c, v in summary.mean_error.items()})
        assert record["mean_corruption_error"] == pytest.approx(np.mean([record["mean_error"][c] for c in CORRUPTIONS]))
        assert record["mean_corruption_error_over"] == CORRUPTIONS
        assert record["ce"] == {} and record["relative_ce"] == {} and record["mce_over"] == []
        assert record["mce"] is None and record["relative_mce"] is None and record["complete"] is False
        assert "has 10 classes, not ImageNet-1k's 1,000" in record["incomplete_reason"]
        assert record["jpeg_quality"] == 85


def test_ce_relative_to_the_first_model(document):
    first, second = (m["robustness"] for m in document["models"])
    assert first["relative_to_first"]["ce"] == {c: pytest.approx(100.0) for c in CORRUPTIONS}
    assert second["relative_to_first"]["reference"] == document["models"][0]["label"]
    for c in CORRUPTIONS:
        ratio = sum(second["error"][c].values()) / sum(first["error"][c].values())
        assert second["relative_to_first"]["ce"][c] == pytest.approx(100 * ratio)
    assert second["relative_to_first"]["mean"] == pytest.approx(np.mean(list(second["relative_to_first"]["ce"].values())))
    assert second["relative_to_first"]["mean_over"] == second["mean_corruption_error_over"] == CORRUPTIONS
    assert "mce" not in second["relative_to_first"]  # it averages all corruptions evaluated: not an mCE


def test_cells_do_not_depend_on_the_batch_size(document, models, folder, tmp_path):
    code, output = run_eval(models["plain"], "--dataset", folder, "--corruptions", ",".join(CORRUPTIONS),
                            "--severities", "1-5", "--batch-size", "24", "--json", tmp_path / "r.json")
    assert code == 0, output
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["robustness"]["correct"] == (
        document["models"][0]["robustness"]["correct"])


def test_fewer_severities_give_errors_but_no_ce_and_labelled_examples_are_written(models, folder, tmp_path):
    examples = tmp_path / "new" / "examples"  # created, parents too
    code, output = run_eval(models["cb"], "--dataset", folder, "--corruptions", "fog,snow", "--severities", "1,3",
                            "--batch-size", "8", "--json", tmp_path / "r.json", "--save-examples", examples)
    assert code == 0, output
    record = json.loads((tmp_path / "r.json").read_text())["models"][0]["robustness"]
    assert set(record["error"]["fog"]) == {"1", "3"} and record["ce"] == {} and record["mce"] is None
    assert "complete: false: 'digits" not in output and "has 10 classes" in output
    assert sorted(p.name for p in examples.iterdir()) == ["fog.png", "snow.png"]  # no temporary left
    picture = np.asarray(Image.open(examples / "fog.png").convert("RGB"))
    header = 2 * 14 + 6  # two lines of labels, then clean + the 2 asked severities across, 4 images down at 96 px
    assert picture.shape == (header + 4 * 96 + 3 * 2, 3 * 96 + 2 * 2, 3)
    assert (picture[:header] < 128).any(axis=2).sum() > 200  # the labels are drawn
    # The tiles are the pixels the model saw, enlarged 3x (nearest): image 1 clean and at severity 3.
    config = json.loads((tmp_path / "r.json").read_text())["preprocessing"]
    unit, _ = unit_images(folder, config)
    for column, pixels in [(0, unit[1]), (2, corrupt(unit[1:2], "fog", 3, [1])[0])]:
        expected = (pixels * 255).round().to(torch.uint8).permute(1, 2, 0).numpy().repeat(3, 0).repeat(3, 1)
        top, left = header + 96 + 2, column * (96 + 2)
        assert np.abs(picture[top:top + 96, left:left + 96].astype(int) - expected).max() <= 1, column


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--corruptions", "fogg"], "unknown corruption 'fogg'"),
        (["--corruptions", "fog", "--severities", "6"], "severit"),
        (["--save-examples", "."], "--save-examples only applies to corrupted images; give --corruptions too"),
        (["--severities", "1,3"], "--severities only applies to corrupted images; give --corruptions too"),
        (["--no-jpeg"], "--no-jpeg only applies to corrupted images"),
        (["--corruptions", "fog", "--density"], "--density measures clean images"),
    ],
)
def test_bad_corruption_options_fail_before_any_work(models, folder, args, phrase, main_cli):
    code, err = main_cli("eval", models["cb"], "--dataset", folder, "--workers", "0", *args)
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err


# ----- label spaces of the distribution-shift sets -------------------------------------------------------
def _label_of_each_class(root: Path, num_model_classes: int) -> dict[str, int]:
    ds = data.resolve_dataset(str(root), None, purpose="eval", num_model_classes=num_model_classes)
    return {ds.sample_ids[i].split("/")[0]: int(ds.labels[i]) for i in range(len(ds))}, ds


def test_imagenet_v2_folders_are_class_indices(tmp_path):
    names = ["0", "1", "2", "10"]
    root = write_folder(tmp_path / "v2", [(i, i % 4) for i in range(8)], names)
    labels, ds = _label_of_each_class(root, 1000)
    assert labels == {"0": 0, "1": 1, "2": 2, "10": 10} and ds.num_classes == 1000
    labels, _ = _label_of_each_class(root, 4)  # a 4-class model: the folders are its own classes, in order
    assert labels == {"0": 0, "1": 1, "2": 2, "10": 3}


def test_imagenet_sketch_synsets_map_to_imagenet_indices(tmp_path):
    from cbtool.data.imagenet import synset_to_index

    synsets = ["n01440764", "n01443537", "n15075141"]  # the first, second and last ImageNet class
    root = write_folder(tmp_path / "sketch", [(i, i % 3) for i in range(6)], synsets)
    labels, ds = _label_of_each_class(root, 1000)
    assert labels == {s: synset_to_index()[s] for s in synsets} and labels["n15075141"] == 999
    assert ds.num_classes == 1000 and ds.class_subset is None


def test_imagenet_a_and_r_keep_their_200_classes(tmp_path):
    from cbtool.data.imagenet import synset_to_index

    synsets = sorted(synset_to_index())[:200]
    root = write_folder(tmp_path / "r", [(i, i) for i in range(200)], synsets)
    labels, ds = _label_of_each_class(root, 1000)
    assert labels == {s: i for i, s in enumerate(synsets)}
    assert ds.class_subset == [synset_to_index()[s] for s in synsets]


def test_mce_on_imagenet_validation_images_under_limit(tmp_path, monkeypatch):
    """A folder of ImageNet synsets in the 1,000-class space whose size is ImageNet-1k validation's (made 6 here)
    gets CE and mCE, also under --limit (the source's size tells), with the sample named in the reason; the same
    folder of another size gets none."""
    from cbtool.robustness import baseline

    synsets = ["n01440764", "n01443537", "n15075141"]
    root = write_folder(tmp_path / "val", [(i, i % 3) for i in range(6)], synsets)
    torch.manual_seed(0)
    model = save(tiny_vit(num_classes=1000), tmp_path / "in1k.safetensors")
    for size, has_mce in ((6, True), (7, False)):
        monkeypatch.setattr(baseline, "IMAGENET_VAL_IMAGES", size)
        out = tmp_path / f"r{size}.json"
        code, output = run_eval(model, "--dataset", root, "--limit", 3, "--corruptions", "fog,saturate",
                                "--batch-size", 8, "--json", out)
        assert code == 0, output
        record = json.loads(out.read_text())["models"][0]["robustness"]
        assert (record["mce"] is not None) is has_mce and record["complete"] is False
        if has_mce:
            assert record["mce_over"] == ["fog"] and record["mean_corruption_error_over"] == ["fog", "saturate"]
            assert record["mce"] == pytest.approx(100 * record["mean_error"]["fog"] / 100 / 0.819324)
            assert "in % of AlexNet's" in output and "mCE over 1 corruptions" in output
        else:
            assert "cannot tell it is ImageNet-1k validation" in record["incomplete_reason"]
