"""16-bit and float images are scaled to 8 bits, not clipped at 255 (PIL's ``convert('RGB')`` turns them white).

Real Fashion-MNIST images from the embedded sample, stored at 8 bits, 16 bits and as float TIFFs: every depth
decodes to the same pixels, and a model predicts the same classes on each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbtool.models.checkpoint import save
from cbtool.cli.app import main
from cbtool.data.dataset import open_rgb
from cbtool.data.embedded import read_sample
from cbtool.spec import CBSpec
from cbtool.surgery import inject

DEPTHS = {
    "8bit": (lambda a: Image.fromarray(a), "png"),
    "16bit": (lambda a: Image.fromarray(a.astype(np.uint16) * 257), "png"),  # mode I;16
    "32bit": (lambda a: Image.fromarray(a.astype(np.int32) * 257), "tiff"),  # mode I, 16-bit values
    "float": (lambda a: Image.fromarray(a.astype(np.float32) / 255), "tiff"),  # mode F in [0, 1]
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The first ten test images of each class, once per depth, as class folders."""
    source, _ = read_sample("test")
    root = tmp_path_factory.mktemp("depths")
    picked = [i for c in range(10) for i in np.flatnonzero(source.labels == c)[:10]]
    for depth, (make, ext) in DEPTHS.items():
        for i in picked:
            folder = root / depth / f"class{int(source.labels[i])}"
            folder.mkdir(parents=True, exist_ok=True)
            make(source.images[i]).save(folder / f"{i}.{ext}")
    return {depth: root / depth for depth in DEPTHS}


@pytest.mark.parametrize("depth", [d for d in DEPTHS if d != "8bit"])
def test_every_depth_decodes_to_the_same_pixels(folders, depth):
    for path in sorted(folders["8bit"].rglob("*.png")):
        twin = next((folders[depth] / path.parent.name).glob(path.stem + ".*"))
        assert np.array_equal(np.asarray(open_rgb(twin)), np.asarray(open_rgb(path))), twin
    sixteen = next(folders["16bit"].rglob("*.png"))
    with Image.open(sixteen) as img:  # what PIL alone gives: every non-black pixel clipped to white
        clipped = np.asarray(img.convert("RGB"))
        assert img.mode == "I;16" and set(np.unique(clipped)) <= {0, 1, 255}
    assert not np.array_equal(clipped, np.asarray(open_rgb(sixteen)))


def test_predictions_do_not_depend_on_the_bit_depth(folders, timm_model, tmp_path, capsys):
    model = inject(timm_model(img_size=28, patch_size=4, num_classes=10), CBSpec())
    path = save(model, tmp_path / "m.safetensors")
    correct = {}
    for depth in DEPTHS:
        out = tmp_path / f"{depth}.json"
        try:
            main(["eval", str(path), "--dataset", str(folders[depth]), "--workers", "0", "--quiet", "--json", str(out)])
        except SystemExit as exited:
            assert exited.code in (0, None), capsys.readouterr().err
        metrics = json.loads(out.read_text())["models"][0]["metrics"]
        correct[depth] = (metrics["correct"], round(metrics["loss"], 5))
    assert len(set(correct.values())) == 1, correct
    assert len(correct["8bit"][0]) == 100
