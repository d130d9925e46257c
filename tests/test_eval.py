"""``cbtool eval`` on real image folders: the figures equal a hand-written timm loop, and bad input fails in one line.

The images are scikit-learn's 8x8 digits, upscaled and written as PNG class folders. The model is a
tiny timm ViT trained here for a few steps, so its accuracy is well above chance and equal figures
mean something.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cbtool.models.checkpoint import save
from cbtool.cli.app import app
from cbtool.models.resolve import resolve

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")
TINY_VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=48, num_heads=3)
EVAL_IMAGES = 101  # odd, so two ranks get different shard sizes
BATCH = 16


# ----- data ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images * (255 / 16)).round().astype(np.uint8), data.target.astype(np.int64)


def to_pil(pixels: np.ndarray, size: int = 32, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert(mode)


def write_folder(root: Path, picks, class_names: list[str], *, size: int = 32, mode: str = "RGB") -> Path:
    """``picks``: (digit index, class position) pairs -> ``root/<class name>/<digit index>.png``."""
    images, _ = digits()
    for index, label in picks:
        path = root / class_names[label] / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        to_pil(images[index], size, mode).save(path)
    return root


def digit_picks(start: int, count: int):
    _, labels = digits()
    return [(i, int(labels[i])) for i in range(start, start + count)]


DIGIT_CLASSES = [f"digit{i}" for i in range(10)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("digits"), digit_picks(0, EVAL_IMAGES), DIGIT_CLASSES)


# ----- models -------------------------------------------------------------------------------------------
def tiny_vit(num_classes: int = 10, **overrides):
    return resolve("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, model_kwargs={**TINY_VIT, **overrides})


def train(model, steps: int = 160, seed: int = 0, lr: float = 3e-3):
    """A few AdamW steps on digits the evaluation folder does not hold; enough for ~50% top-1."""
    from timm.data import create_transform

    images, labels = digits()
    transform = create_transform(**model.cbtool_data_config)
    picks = range(300, 1500)
    x = torch.stack([transform(to_pil(images[i])) for i in picks])
    y = torch.as_tensor(labels[list(picks)])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # decay to 0: a steadier end
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads are slower than one for a model this small
    try:
        model.train()
        for _ in range(steps):
            batch = torch.randint(0, len(x), (64,), generator=generator)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A trained tiny ViT (``plain``) and the same weights with CB after every MLP (``cb``)."""
    import cbtool

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    trained = train(tiny_vit())
    with_cb = cbtool.inject(copy.deepcopy(trained), cbtool.CBSpec(variant="cb", position="mlp", layers="all"))
    return {"plain": save(trained, root / "plain.safetensors"), "cb": save(with_cb, root / "cb.safetensors")}


def crafted_head(num_classes: int, bias: dict[int, float], path: Path, **overrides) -> Path:
    """A tiny ViT whose logits are ``bias`` whatever the image: a zero head weight and a chosen bias."""
    model = tiny_vit(num_classes, **overrides)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        for index, value in bias.items():
            model.head.bias[index] = value
    return save(model, path)


# ----- running cbtool -------------------------------------------------------------------------------------
def cli_eval(*args, json_path: Path) -> dict:
    """``cbtool eval`` in this process (CliRunner); returns the JSON document."""
    result = CliRunner().invoke(app, ["eval", *map(str, args), "--json", str(json_path), "--workers", "0", "-q"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return json.loads(json_path.read_text())


def start_cbtool(*args, env: dict) -> subprocess.Popen:
    """``python -m cbtool ARGS`` as a user runs it; ``env`` is conftest's ``cli_env`` (no CBTOOL_DEBUG, empty HF cache)."""
    return subprocess.Popen(
        [sys.executable, "-m", "cbtool", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=REPO, env=env,
    )  # fmt: skip


def run_cbtool(*args, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    process = start_cbtool(*args, env=env)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def metrics(document: dict, model: int = 0) -> dict:
    return document["models"][model]["metrics"]


# ----- the reference: timm's transforms and a plain loop ---------------------------------------------------
def timm_reference(weights: Path, folder: Path, *, batch_size: int) -> dict:
    """top-1/top-5/loss/correctness the way timm's validate.py would get them, written out by hand."""
    import timm
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_model_data_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **TINY_VIT)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    config = resolve_model_data_config(model, args={"img_size": TINY_VIT["img_size"]})  # validate.py --img-size
    transform = create_transform(**config)
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())  # torchvision ImageFolder order
    samples = [(path, label) for label, name in enumerate(classes) for path in sorted((folder / name).iterdir())]
    top1 = top5 = 0
    loss = 0.0
    correct = []
    with torch.no_grad():
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            x = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in batch])
            y = torch.tensor([label for _, label in batch])
            logits = model(x)
            best = logits.topk(5, dim=1).indices
            top1 += (best[:, 0] == y).sum().item()
            top5 += (best == y[:, None]).any(dim=1).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (best[:, 0] == y).tolist()
    n = len(samples)
    return {"num_samples": n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n,
            "correct": "".join("1" if hit else "0" for hit in correct)}  # fmt: skip


def assert_same_metrics(found: dict, expected: dict, loss_rel: float = 1e-6) -> None:
    assert found["num_samples"] == expected["num_samples"]
    assert found["correct"] == expected["correct"]
    assert found["top1"] == pytest.approx(expected["top1"], abs=1e-9)
    assert found["top5"] == pytest.approx(expected["top5"], abs=1e-9)
    assert found["loss"] == pytest.approx(expected["loss"], rel=loss_rel)


# ===========================================================================================================
# 1. The figures equal timm's pipeline
# ===========================================================================================================
def test_top1_equals_hand_written_timm_loop(models, folder, tmp_path, cli_env):
    reference = timm_reference(models["plain"], folder, batch_size=BATCH)
    assert reference["top1"] > 30.0, "the trained model should be well above chance (10%)"
    assert 0 < reference["correct"].count("1") < EVAL_IMAGES

    document = cli_eval(models["plain"], "--dataset", folder, "-b", BATCH, json_path=tmp_path / "cli.json")
    assert_same_metrics(metrics(document), reference)

    process = run_cbtool("eval", models["plain"], "--dataset", folder, "-b", BATCH, "--workers", "0", "-q",
                         "--json", tmp_path / "subprocess.json", env=cli_env)  # fmt: skip
    assert process.returncode == 0, process.stderr
    assert_same_metrics(metrics(json.loads((tmp_path / "subprocess.json").read_text())), reference)
    assert f"{reference['top1']:.2f}" in process.stdout  # the printed table shows the same figure


def test_library_call_equals_cli(models, folder, tmp_path):
    import cbtool
    from cbtool import data

    model = cbtool.load(models["plain"])
    ds = data.resolve_dataset(str(folder), num_model_classes=10)
    loader = data.build_loader(ds.with_transform(data.build_transform(model.cbtool_data_config)), batch_size=BATCH, workers=0)
    (result,) = cbtool.evaluate([model], loader, progress=False)
    document = cli_eval(models["plain"], "--dataset", folder, "-b", BATCH, json_path=tmp_path / "cli.json")
    assert_same_metrics(result.metrics, metrics(document), loss_rel=1e-12)


def test_two_models_at_once_equal_separate_runs(models, folder, tmp_path):
    both = cli_eval(models["plain"], models["cb"], "--dataset", folder, "-b", BATCH, json_path=tmp_path / "both.json")
    for position, name in enumerate(("plain", "cb")):
        alone = cli_eval(models[name], "--dataset", folder, "-b", BATCH, json_path=tmp_path / f"{name}.json")
        assert_same_metrics(metrics(both, position), metrics(alone), loss_rel=1e-12)
        assert both["models"][position]["label"] == str(models[name])
    # CB changes the predictions, so equal figures above are not one model's results copied twice.
    assert metrics(both, 0)["correct"] != metrics(both, 1)["correct"]
    assert both["models"][0]["cb_spec"] is None
    assert both["models"][1]["cb_spec"] == {"variant": "cb", "position": "mlp", "layers": "all", "scale_init": 0.5}


# ===========================================================================================================
# 3. ImageNet synset folders
# ===========================================================================================================
@functools.lru_cache(maxsize=1)
def synsets() -> list[str]:
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


# (ImageNet indices of the folder's classes, images per class, head bias, expected correct string, top-1, top-5)
SYNSET_CASES = {
    # The prediction is always class 300; only its images are right.
    "predicts-300": ([7, 300, 999], [4, 3, 2], {300: 5.0, 7: 4.0, 12: 3.0, 13: 2.0, 14: 1.0}, "0000" + "111" + "00", 3 / 9, 7 / 9),
    # The prediction is a class the folder does not have: nothing is right, top-5 holds 7 and 999.
    "predicts-absent": ([7, 300, 999], [4, 3, 2], {1: 9.0, 7: 8.0, 999: 7.0, 2: 6.0, 3: 5.0}, "0" * 9, 0.0, 6 / 9),
    # One class only, at the far end of the index range.
    "last-class": ([999], [3], {999: 1.0}, "111", 1.0, 1.0),
}


@pytest.mark.parametrize("case", list(SYNSET_CASES))
def test_synset_folder_uses_imagenet_indices(case, tmp_path):
    indices, counts, bias, correct, top1, top5 = SYNSET_CASES[case]
    names = [synsets()[i] for i in indices]
    picks = [(100 * c + k, c) for c, count in enumerate(counts) for k in range(count)]
    folder = write_folder(tmp_path / "imagenet", picks, names)
    model = crafted_head(1000, bias, tmp_path / "model.safetensors")
    document = cli_eval(model, "--dataset", folder, json_path=tmp_path / "out.json")
    found = metrics(document)
    assert document["dataset"]["num_classes"] == 1000
    assert found["correct"] == correct
    assert found["top1"] == pytest.approx(100 * top1)
    assert found["top5"] == pytest.approx(100 * top5)
    assert set(found["per_class_top1"]) == {str(i) for i in indices}  # keyed by ImageNet index


def test_two_hundred_class_folder_restricts_logits_to_its_classes(tmp_path):
    subset = list(range(0, 1000, 5))  # 200 synsets, like ImageNet-R/A
    names = [synsets()[i] for i in subset]
    # Class position 3 (ImageNet 15) has three images, every other class one.
    picks = [(c, c) for c in range(200)] + [(1000 + k, 3) for k in range(2)]
    folder = write_folder(tmp_path / "imagenet-r", picks, names)
    # ImageNet class 1 is not in the subset and wins over all 1000 logits; inside the subset 15 wins,
    # then positions 0, 1, 2, 4 by a small decreasing bias.
    bias = {index: -0.01 * position for position, index in enumerate(subset)}
    bias.update({1: 10.0, 15: 5.0})
    model = crafted_head(1000, bias, tmp_path / "model.safetensors")
    document = cli_eval(model, "--dataset", folder, json_path=tmp_path / "out.json")
    found = metrics(document)
    assert document["dataset"]["class_subset"] == subset
    assert document["dataset"]["num_classes"] == 200
    assert found["num_samples"] == 202
    assert found["top1"] == pytest.approx(100 * 3 / 202)
    assert found["top5"] == pytest.approx(100 * 7 / 202)
    assert found["per_class_top1"]["3"] == 100.0 and found["per_class_top1"]["0"] == 0.0


# ===========================================================================================================
# 4. Every bad input: one line on stderr, exit code 2, no traceback
# ===========================================================================================================
def _broken_folder(tmp_path: Path) -> Path:
    folder = write_folder(tmp_path / "broken", digit_picks(0, 20), DIGIT_CLASSES)
    (folder / "digit3" / "zz-truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _headless(kind: str, tmp_path: Path) -> Path:
    import transformers

    common = dict(image_size=32, patch_size=4, hidden_size=48, num_hidden_layers=2, num_attention_heads=3)
    if kind == "vit":
        config = transformers.ViTConfig(intermediate_size=96, architectures=["ViTModel"], **common)
    else:
        config = transformers.Dinov2Config(mlp_ratio=2, architectures=["Dinov2Model"], **common)
    hf_folder = tmp_path / f"hf-{kind}"
    config.save_pretrained(hf_folder)
    return save(resolve(str(hf_folder), pretrained=False), tmp_path / f"{kind}-headless.safetensors")


# Each case: (tmp_path, models, folder) -> argv after `cbtool eval`, and the words the one-line message must hold.
ERROR_CASES = {
    "missing-dataset-folder": (lambda t, m, f: [m["plain"], "--dataset", t / "no" / "such" / "folder"],
                               ["no dataset", "no such folder"]),
    "dataset-is-a-file": (lambda t, m, f: [m["plain"], "--dataset", m["plain"]], ["is a file"]),
    "class-count-mismatch": (lambda t, m, f: [crafted_head(5, {}, t / "five.safetensors"), "--dataset", f],
                             ["10 classes", "head has 5", "--num-classes", "finetune"]),
    "different-preprocessing": (lambda t, m, f: [m["plain"], save(tiny_vit(img_size=48), t / "48px.safetensors"), "--dataset", f],
                                ["preprocess images differently"]),
    "unreadable-image": (lambda t, m, f: [m["plain"], "--dataset", _broken_folder(t)], ["zz-truncated.png", "--skip-bad-images"]),
    "json-in-missing-folder": (lambda t, m, f: [m["plain"], "--dataset", f, "--json", t / "missing" / "out.json"], ["does not exist"]),
    "plot-in-missing-folder": (lambda t, m, f: [m["plain"], "--dataset", f, "--plot", t / "missing" / "p.png"], ["does not exist"]),
    "split-on-plain-folder": (lambda t, m, f: [m["plain"], "--dataset", f, "--split", "train"], ["no split folders"]),
    "headless-hf-vit": (lambda t, m, f: [_headless("vit", t), "--dataset", f], ["no classification head", "--num-classes"]),
    "headless-hf-dinov2": (lambda t, m, f: [_headless("dinov2", t), "--dataset", f], ["no classification head", "--num-classes"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def failed_runs(models, folder, tmp_path_factory, cli_env) -> dict:
    """Every ERROR_CASES run, started together: each spends most of its time importing torch."""
    running = {}
    for case, (build, _) in ERROR_CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        argv = build(tmp, models, folder)
        if "--json" not in argv:
            argv += ["--json", tmp / "results.json"]
        running[case] = (tmp, start_cbtool("eval", *argv, "--workers", "0", "-q", env=cli_env))
    finished = {}
    try:
        for case, (tmp, process) in running.items():
            stdout, stderr = process.communicate(timeout=180)
            finished[case] = (tmp, process.returncode, stdout, stderr)
    finally:
        for _, process in running.values():
            if process.poll() is None:
                process.kill()
    return finished


def assert_one_line_error(returncode: int, stderr: str, words: list[str]) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_input_is_one_line_and_exit_code_2(case, failed_runs):
    tmp, returncode, _stdout, stderr = failed_runs[case]
    assert_one_line_error(returncode, stderr, ERROR_CASES[case][1])
    assert not (tmp / "results.json").exists(), "a failed run must not leave a results file"


# Without HF_HUB_OFFLINE the Hub is asked: here there is no network; where there is, the id does not exist.
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {}], ids=["HF_HUB_OFFLINE", "hub-asked"])
def test_hub_dataset_that_cannot_be_fetched_fails_fast(env, models, cli_env):
    started = time.perf_counter()
    process = run_cbtool("eval", models["plain"], "--dataset", "cbtool-tests/no-such-dataset", "--workers", "0", "-q",
                         env={**cli_env, **env}, timeout=60)  # fmt: skip
    seconds = time.perf_counter() - started
    assert_one_line_error(process.returncode, process.stderr, ["cbtool-tests/no-such-dataset"])
    assert seconds < 15, f"took {seconds:.1f} s to fail"


def test_skip_bad_images_counts_them(models, tmp_path):
    folder = _broken_folder(tmp_path)
    document = cli_eval(models["plain"], "--dataset", folder, "--skip-bad-images", json_path=tmp_path / "out.json")
    assert document["dataset"]["bad_images"] == 1
    assert document["dataset"]["num_samples"] == metrics(document)["num_samples"] == 20
    assert len(metrics(document)["correct"]) == 20


# ===========================================================================================================
# 5. torchrun: two ranks, an odd number of images
# ===========================================================================================================
def folder_with_bad_image_on_rank_1(folder: Path, tmp_path: Path) -> Path:
    """A copy of ``folder`` plus one undecodable file at an odd position, which rank 1 of 2 reads."""
    copy_root = tmp_path / "with-bad"
    shutil.copytree(folder, copy_root)
    first = sorted((copy_root / DIGIT_CLASSES[0]).iterdir())[0]
    broken = first.with_name(first.stem + ".zz-broken.png")  # sorts right after the first image
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    files = sorted(path.relative_to(copy_root).as_posix() for path in copy_root.glob("*/*.png"))
    assert files.index(broken.relative_to(copy_root).as_posix()) == 1
    return copy_root


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to this Python")
@pytest.mark.parametrize("bad_image", [False, True], ids=["odd-size", "bad-image-on-rank-1"])
def test_torchrun_two_ranks_equal_one_process(bad_image, models, folder, tmp_path, cli_env):
    dataset = folder_with_bad_image_on_rank_1(folder, tmp_path) if bad_image else folder
    args = ["eval", models["plain"], "--dataset", dataset, "--workers", "0", "-b", "8", "--density", "-q"]
    args += ["--skip-bad-images"] if bad_image else []
    single = cli_eval(*args[1:], json_path=tmp_path / "single.json")
    process = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "cbtool", *map(str, args), "--json", str(tmp_path / "ranks.json")],
        capture_output=True, text=True, cwd=REPO, env=cli_env, timeout=180,
    )  # fmt: skip
    assert process.returncode == 0, process.stdout + process.stderr
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    assert ranks["environment"]["world_size"] == 2
    for document in (single, ranks):
        assert document["dataset"]["num_samples"] == metrics(document)["num_samples"] == EVAL_IMAGES
        assert document["dataset"]["bad_images"] == int(bad_image)
    for key in ("num_samples", "top1", "top5", "per_class_top1", "correct"):
        assert metrics(ranks)[key] == metrics(single)[key], key
    assert metrics(ranks)["loss"] == pytest.approx(metrics(single)["loss"], rel=1e-6)  # summed in another order
    found, expected = ranks["models"][0]["density"], single["models"][0]["density"]
    for key in ("entropy_per_layer", "distance_per_layer"):
        assert found[key] == pytest.approx(expected[key], abs=1e-6), key


# ===========================================================================================================
# 6. The JSON document
# ===========================================================================================================
def test_json_provenance(models, folder, tmp_path):
    import timm

    document = cli_eval(models["cb"], "--dataset", folder, "--density", "--plot", tmp_path / "density.png",
                        json_path=tmp_path / "out.json")  # fmt: skip
    assert document["schema_version"] == 3
    assert document["dataset"]["name"] == str(folder)
    assert document["dataset"]["kind"] == "folder"
    assert document["dataset"]["split"] is None
    assert document["dataset"]["num_samples"] == EVAL_IMAGES
    assert document["dataset"]["num_classes"] == 10
    assert len(document["dataset"]["samples_sha256"]) == 64
    assert document["class_names"] == DIGIT_CLASSES
    assert document["preprocessing"]["input_size"] == [3, 32, 32]
    assert document["preprocessing"]["crop_pct"] == pytest.approx(0.9)
    environment = document["environment"]
    assert environment["device"] == "cpu" and environment["world_size"] == 1
    assert environment["torch"] == torch.__version__.split("+")[0]
    assert environment["timm"] == timm.__version__ and environment["python"]
    model = document["models"][0]
    assert model["source"]["library"] == "timm"
    assert model["source"]["model_name"].split(".")[0] == "vit_tiny_patch16_224"
    assert model["source"]["pretrained"] is False
    assert {k: model["source"]["model_kwargs"][k] for k in TINY_VIT} == TINY_VIT
    assert model["cb_spec"]["variant"] == "cb" and model["cb_spec"]["position"] == "mlp"
    assert model["metrics"]["throughput"]["model_images_per_s"] > 0
    assert len(model["density"]["entropy_per_layer"]) == TINY_VIT["depth"]
    assert (tmp_path / "density.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_limit_is_deterministic_and_nested(models, folder, tmp_path):
    first = cli_eval(models["plain"], "--dataset", folder, "--limit", "30", json_path=tmp_path / "a.json")
    again = cli_eval(models["plain"], "--dataset", folder, "--limit", "30", json_path=tmp_path / "b.json")
    fewer = cli_eval(models["plain"], "--dataset", folder, "--limit", "20", json_path=tmp_path / "c.json")
    full = cli_eval(models["plain"], "--dataset", folder, json_path=tmp_path / "d.json")
    assert first["dataset"]["samples_sha256"] == again["dataset"]["samples_sha256"]
    assert metrics(first)["correct"] == metrics(again)["correct"]
    assert metrics(first)["num_samples"] == first["dataset"]["num_samples"] == 30
    assert first["dataset"]["limit"] == 30
    assert fewer["dataset"]["samples_sha256"] != first["dataset"]["samples_sha256"]
    # Class-balanced: 30 images over 10 classes is 3 per class.
    assert all(metrics(first)["per_class_top1"][str(c)] in (0.0, 100 / 3, 200 / 3, 100.0) for c in range(10))
    assert full["dataset"]["limit"] is None and metrics(full)["num_samples"] == EVAL_IMAGES


def test_grayscale_images_become_rgb(models, tmp_path):
    picks = digit_picks(0, 40)
    gray = write_folder(tmp_path / "gray", picks, DIGIT_CLASSES, mode="L")
    rgb = write_folder(tmp_path / "rgb", picks, DIGIT_CLASSES, mode="RGB")
    assert Image.open(next(gray.glob("*/*.png"))).mode == "L"
    from_gray = cli_eval(models["plain"], "--dataset", gray, json_path=tmp_path / "gray.json")
    from_rgb = cli_eval(models["plain"], "--dataset", rgb, json_path=tmp_path / "rgb.json")
    assert_same_metrics(metrics(from_gray), metrics(from_rgb), loss_rel=1e-12)


def test_library_evaluate_dataset_returns_what_the_command_writes(models, folder, tmp_path):
    import cbtool

    written = cli_eval(models["plain"], models["cb"], "--dataset", folder, "--density", "--limit", "40",
                       json_path=tmp_path / "out.json")  # fmt: skip
    returned = cbtool.evaluate_dataset([str(models["plain"]), str(models["cb"])], str(folder), density=True,
                                       limit=40, workers=0, progress=False)  # fmt: skip
    returned = json.loads(json.dumps(returned))  # as JSON holds it (tuples become lists)

    def timeless(document: dict) -> dict:  # the creation time and the speeds differ from run to run
        document = copy.deepcopy(document)
        document.pop("created")
        for model in document["models"]:
            model["metrics"].pop("throughput")
        return document

    assert timeless(returned) == timeless(written)
    assert returned["models"][1]["density"]["entropy_per_layer"] == written["models"][1]["density"]["entropy_per_layer"]


def test_top5_of_a_three_class_model_is_null_with_its_reason():
    from cbtool.metrics.accuracy import AccuracyAccumulator

    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    three = AccuracyAccumulator(3)
    three.update(logits, labels, torch.arange(4))
    result = three.result()
    assert result["top1"] == 50.0 and result["correct"] == "1010"
    assert result["top5"] is None and result["null_reasons"] == {"top5": "top-5 needs 5 classes; the model has 3"}
    five = AccuracyAccumulator(5)
    five.update(torch.cat([logits, torch.zeros(4, 2)], dim=1), labels, torch.arange(4))
    assert five.result()["top5"] == 100.0 and "null_reasons" not in five.result()
