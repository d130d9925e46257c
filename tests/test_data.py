"""The data layer: resolving datasets, labels, preprocessing and sharded loading."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbtool.data import (
    ResolvedDataset,
    build_loader,
    build_transform,
    check_num_classes,
    limit_positions,
    resolve_dataset,
    split_validation,
)
from cbtool.errors import DatasetError, NetworkError

TINY_CONFIG = {"input_size": (3, 16, 16), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 0.875, "crop_mode": "center"}
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----- helpers ------------------------------------------------------------------------------------------
def write_image(path: Path, value: int = 128, mode: str = "RGB", size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[0, 0] = value
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def make_folder(root: Path, layout: dict) -> Path:
    """``layout``: {class: n_images} or {split: {class: n_images}}."""
    for name, content in layout.items():
        if isinstance(content, dict):
            make_folder(root / name, content)
        else:
            for i in range(content):
                write_image(root / name / f"img{i}.png", value=i)
    return root


def tensor_transform(image):
    import torch

    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[:, :2, :2].contiguous()


def loader_indices(ds, **kwargs) -> list[int]:
    loader = build_loader(ds.with_transform(tensor_transform), **kwargs)
    return [i for _, _, indices in loader for i in indices.tolist()]


# ----- local folders ------------------------------------------------------------------------------------
FOLDER_CASES = [
    # layout, split, purpose, expected split, classes, labels
    ({"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}}, None, "eval", "validation", ["a", "b"], [0, 1]),
    ({"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}}, None, "train", "train", ["a", "b"], [0, 0, 1]),
    ({"train": {"a": 1}, "test": {"a": 1, "b": 2}}, None, "eval", "test", ["a", "b"], [0, 1, 1]),
    ({"train": {"a": 1}, "valid": {"a": 1}, "test": {"b": 1}}, "val", "eval", "validation", ["a", "b"], [0]),
    ({"train": {"a": 1}, "validation": {"b": 1}, "test": {"a": 1}}, "test", "eval", "test", ["a", "b"], [0]),
    ({"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "c": 2}}, None, "eval", "validation", ["a", "b", "c"], [0, 2, 2]),
    ({"zebra": 1, "apple": 2, "Mango": 1}, None, "eval", None, ["apple", "Mango", "zebra"], [0, 0, 1, 2]),  # timm order: case ignored
]


@pytest.mark.parametrize("layout, split, purpose, want_split, classes, labels", FOLDER_CASES)
def test_folder_layouts(tmp_path, layout, split, purpose, want_split, classes, labels):
    root = make_folder(tmp_path / "ds", layout)
    ds = resolve_dataset(str(root), split, purpose=purpose)
    assert (ds.kind, ds.split, ds.class_names, ds.num_classes) == ("folder", want_split, classes, len(classes))
    assert ds.labels.tolist() == labels
    assert not {"train", "val", "valid", "validation", "test"} & set(ds.class_names)
    assert all(not os.path.isabs(i) for i in ds.sample_ids)


FOLDER_ERRORS = [
    ({"train": {"a": 1}}, None, "eval", "no validation or test split"),
    ({"val": {"a": 1}}, None, "train", "no train split"),
    ({"train": {"a": 1}, "cat": 1}, None, "eval", "mixes split folders"),
    ({"val": {"a": 1}, "validation": {"a": 1}}, None, "eval", "two folders for the validation split"),
    ({"a": 1, "b": 1}, "train", "eval", "has no split folders"),
    ({"train": {"a": 1}, "test": {"a": 1}}, "holdout", "eval", "no split 'holdout'"),
    ({}, None, "eval", "has no class folders"),
]


@pytest.mark.parametrize("layout, split, purpose, message", FOLDER_ERRORS)
def test_folder_errors(tmp_path, layout, split, purpose, message):
    root = make_folder(tmp_path / "ds", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(DatasetError, match=message):
        resolve_dataset(str(root), split, purpose=purpose)


def test_folder_without_images_and_hidden_and_other_files(tmp_path):
    (tmp_path / "ds" / "a").mkdir(parents=True)
    (tmp_path / "ds" / "a" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="no images under"):
        resolve_dataset(str(tmp_path / "ds"))
    write_image(tmp_path / "ds" / "a" / "sub" / "deep.JPG")
    write_image(tmp_path / "ds" / ".ipynb_checkpoints" / "x.png")
    ds = resolve_dataset(str(tmp_path / "ds"))
    assert ds.class_names == ["a"] and ds.sample_ids == ["a/sub/deep.JPG"]


# ----- ImageNet label spaces ----------------------------------------------------------------------------
def test_imagenet_synsets_known_indices():
    from timm.data import ImageNetInfo

    synsets = ImageNetInfo("imagenet-1k").label_names()
    assert (synsets[0], synsets[1], synsets[160], synsets[908]) == ("n01440764", "n01443537", "n02088094", "n04592741")


SYNSETS = ["n04592741", "n01440764", "n02088094", "n01443537"]


@pytest.mark.parametrize(
    "num_model_classes, purpose, num_classes, labels",
    [
        (1000, "eval", 1000, [0, 1, 160, 908]),  # subset of ImageNet: standard indices
        (1000, "train", 1000, [0, 1, 160, 908]),
        (None, "eval", 1000, [0, 1, 160, 908]),  # evaluation assumes an ImageNet model
        (None, "train", 4, [0, 1, 2, 3]),  # fine-tuning a new head: sorted folder names
        (4, "eval", 4, [0, 1, 2, 3]),
    ],
)
def test_synset_folders(tmp_path, num_model_classes, purpose, num_classes, labels):
    root = make_folder(tmp_path / "ds", {s: 1 for s in SYNSETS})
    ds = resolve_dataset(str(root), purpose=purpose, num_model_classes=num_model_classes)
    assert ds.num_classes == num_classes and ds.labels.tolist() == labels and ds.class_subset is None
    if num_classes == 1000:
        assert ds.class_names[0].startswith("tench") and ds.class_names[908].startswith("wing")
        check_num_classes(ds, 1000)
    else:
        assert ds.class_names == sorted(SYNSETS)


def _timm_list(name: str) -> list[str]:
    import pkgutil

    return pkgutil.get_data("timm.data", f"_info/{name}").decode().split()


@pytest.mark.parametrize("subset", ["imagenet_r", "imagenet_a"])
def test_200_class_subset_matches_timm(tmp_path, subset):
    synsets = _timm_list(f"{subset}_synsets.txt")
    indices = [int(i) for i in _timm_list(f"{subset}_indices.txt")]
    for synset in synsets:
        write_image(tmp_path / "ds" / synset / "0.png")
    ds = resolve_dataset(str(tmp_path / "ds"), num_model_classes=1000)
    assert ds.num_classes == 200 and ds.class_subset == indices
    assert ds.labels.tolist() == list(range(200))
    check_num_classes(ds, 1000)
    with pytest.raises(DatasetError, match="200-class subset of ImageNet-1k.*head has 10 classes"):
        check_num_classes(ds, 10)
    assert ds.describe()["class_subset"] == indices


# ----- save_to_disk and Hub datasets --------------------------------------------------------------------
def hf_dataset(labels, names=("cat", "dog", "eel"), image_column="image", label_column="label", label_type="classlabel"):
    import datasets

    images = [Image.fromarray(np.full((6, 5, 3), (10 * i) % 256, np.uint8)) for i in range(len(labels))]
    label_feature = {
        "classlabel": datasets.ClassLabel(names=list(names)),
        "int": datasets.Value("int64"),
        "string": datasets.Value("string"),
    }[label_type]
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature, "caption": datasets.Value("string")})
    data = {image_column: images, label_column: labels, "caption": [f"c{i}" for i in range(len(labels))]}
    return datasets.Dataset.from_dict(data, features=features)


def test_save_to_disk_dataset_round_trip(tmp_path):
    hf_dataset([2, 0, 1, 1]).save_to_disk(tmp_path / "saved")
    ds = resolve_dataset(str(tmp_path / "saved"))
    assert (ds.kind, ds.split, ds.num_classes, ds.class_names) == ("saved", None, 3, ["cat", "dog", "eel"])
    assert ds.labels.tolist() == [2, 0, 1, 1] and len(ds) == 4
    image, label = ds[3]
    assert image.mode == "RGB" and image.size == (5, 6) and image.getpixel((0, 0)) == (30, 30, 30) and label == 1
    again = resolve_dataset(str(tmp_path / "saved"))
    assert again.samples_sha256() == ds.samples_sha256() and ds.sample_ids[0].endswith("/all/0")


def test_save_to_disk_dataset_dict_splits(tmp_path):
    import datasets

    datasets.DatasetDict(train=hf_dataset([0, 1, 2, 0]), test=hf_dataset([1, 2])).save_to_disk(tmp_path / "saved")
    ds = resolve_dataset(str(tmp_path / "saved"))
    assert (ds.split, ds.available_splits, ds.labels.tolist()) == ("test", ["train", "test"], [1, 2])
    train = resolve_dataset(str(tmp_path / "saved"), purpose="train")
    assert (train.split, len(train)) == ("train", 4)
    with pytest.raises(DatasetError, match="no split 'validation'.*splits: train, test"):
        resolve_dataset(str(tmp_path / "saved"), "validation")


@pytest.mark.parametrize(
    "kwargs, image_column, label_column, label_type, classes, labels",
    [
        ({}, "img", "labels", "classlabel", ["cat", "dog", "eel"], [0, 2, 1]),
        ({}, "photo", "label", "int", ["0", "1", "2"], [0, 2, 1]),
        ({}, "image", "wnid", "string", None, [0, 2, 1]),  # ImageNet-R on the Hub: synsets in a string column
        ({"image_column": "pic", "label_column": "kind"}, "pic", "kind", "string", ["a", "c", "z"], [0, 2, 1]),
    ],
)
def test_column_detection(tmp_path, kwargs, image_column, label_column, label_type, classes, labels):
    raw = {"classlabel": [0, 2, 1], "int": [0, 2, 1], "string": ["a", "z", "c"]}[label_type]
    if label_column == "wnid":
        raw = ["n01440764", "n04592741", "n01443537"]
    hf_dataset(raw, image_column=image_column, label_column=label_column, label_type=label_type).save_to_disk(tmp_path / "s")
    ds = resolve_dataset(str(tmp_path / "s"), num_model_classes=None if label_column == "wnid" else 3, purpose="train", **kwargs)
    assert ds.labels.tolist() == labels
    if classes is not None:
        assert ds.class_names == classes


def test_readable_class_names_beside_a_synset_column(tmp_path):
    import datasets

    names = ["goldfish", "great white shark"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names), "wnid": datasets.Value("string")})
    images = [Image.new("RGB", (4, 4))] * 3
    data = {"image": images, "label": [1, 0, 1], "wnid": ["n01491361", "n01443537", "n01491361"]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(tmp_path / "s")
    imagenet = resolve_dataset(str(tmp_path / "s"), num_model_classes=1000)
    assert imagenet.num_classes == 1000 and imagenet.labels.tolist() == [3, 1, 3]
    own_head = resolve_dataset(str(tmp_path / "s"), num_model_classes=2, purpose="train")
    assert own_head.class_names == names and own_head.labels.tolist() == [1, 0, 1]


def test_empty_split_is_an_error(local_hub, tmp_path):
    repo = local_hub("empty", {"validation": hf_dataset([])})
    with pytest.raises(DatasetError, match="cannot load 'fake/empty' .*no data"):
        resolve_dataset(repo)
    hf_dataset([]).save_to_disk(tmp_path / "s")
    with pytest.raises(DatasetError, match="cannot read the saved dataset"):
        resolve_dataset(str(tmp_path / "s"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"label_column": "nope"}, "no column 'nope'.*--label-column"),
        ({"image_column": "caption"}, None),  # a text column is accepted as a column but fails to decode
        ({"streaming": True}, "leave out --streaming"),
    ],
)
def test_saved_column_errors(tmp_path, kwargs, message):
    hf_dataset([0, 1]).save_to_disk(tmp_path / "s")
    if message is None:
        ds = resolve_dataset(str(tmp_path / "s"), **kwargs)
        with pytest.raises(DatasetError, match="cannot decode image"):
            ds[0]
        return
    with pytest.raises(DatasetError, match=message):
        resolve_dataset(str(tmp_path / "s"), **kwargs)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """Hub ids ``fake/<name>`` served from parquet folders under tmp_path (the real datasets code path)."""
    import datasets

    from cbtool.data import hub

    repos = tmp_path / "hub"

    def redirect(fn):
        def wrapper(path, *args, **kwargs):
            if str(path).startswith("fake/"):
                path = str(repos / str(path)[5:])
            return fn(path, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(hub, "probe_hub", lambda repo: None)
    monkeypatch.setattr(datasets, "load_dataset_builder", redirect(datasets.load_dataset_builder))
    monkeypatch.setattr(datasets, "load_dataset", redirect(datasets.load_dataset))

    def add(name: str, splits: dict) -> str:
        (repos / name / "data").mkdir(parents=True)
        for split, ds in splits.items():
            ds.to_parquet(str(repos / name / "data" / f"{split}-00000-of-00001.parquet"))
        return f"fake/{name}"

    return add


def test_hub_reads_only_the_requested_split(local_hub, tmp_path):
    repo = local_hub("imnet", {"train": hf_dataset([0, 1]), "validation": hf_dataset([2, 1, 0]), "test": hf_dataset([-1, -1], label_type="int")})
    (tmp_path / "hub" / "imnet" / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet")  # must not be read
    ds = resolve_dataset(repo)
    assert (ds.kind, ds.split, ds.labels.tolist(), ds.class_names) == ("hub", "validation", [2, 1, 0], ["cat", "dog", "eel"])
    assert ds.available_splits == ["train", "validation", "test"] and ds.sample_ids[0] == "fake/imnet/validation/0"
    with pytest.raises(DatasetError, match="unlabelled images"):
        resolve_dataset(repo, "test")


def test_hub_imagenet_r_style_gets_class_subset(local_hub):
    synsets = _timm_list("imagenet_r_synsets.txt")
    rows = list(reversed(synsets))  # stored in any order; classes are the sorted synsets
    repo = local_hub("imagenet-r", {"test": hf_dataset(rows, image_column="image", label_column="wnid", label_type="string")})
    ds = resolve_dataset(repo, num_model_classes=1000)
    assert ds.split == "test" and ds.num_classes == 200
    assert ds.class_subset == [int(i) for i in _timm_list("imagenet_r_indices.txt")]
    assert ds.labels.tolist() == list(range(199, -1, -1))


def test_hub_streaming_shards_and_limit(local_hub):
    repo = local_hub("stream", {"validation": hf_dataset([0, 1, 2, 0, 1, 2, 0])})
    ds = resolve_dataset(repo, streaming=True, limit=5)
    assert ds.streaming and ds.describe()["num_samples"] == 5 and ds.samples_sha256() is not None
    seen = {}
    for rank in range(2):
        loader = build_loader(ds.with_transform(tensor_transform), batch_size=2, workers=0, rank=rank, world_size=2)
        for _, labels, indices in loader:
            seen.update(zip(indices.tolist(), labels.tolist()))
    assert seen == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1}
    with pytest.raises(TypeError):
        len(ds)


# ----- Hub errors -------------------------------------------------------------------------------------
def test_hub_offline_fails_fast_real():
    """A real request to an endpoint that refuses connections: one line, well under the retry loop's 20 s."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    code = "from cbtool.data import resolve_dataset\nresolve_dataset('imagenet-1k')"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert time.monotonic() - start < 15
    last = done.stderr.strip().splitlines()[-1]
    assert "NetworkError: cannot reach the Hugging Face Hub for dataset 'ILSVRC/imagenet-1k'" in last
    assert "HF_HUB_OFFLINE=1" in last and "local folder" in last


class _Info:
    def __init__(self, gated):
        self.gated = gated


@pytest.mark.parametrize(
    "behaviour, token, error, message",
    [
        ("connect", None, NetworkError, "cannot reach the Hugging Face Hub"),
        ("gated", None, NetworkError, "gated.*accept its terms.*hf auth login"),
        ("open", None, None, None),
        ("gated", "hf_token", None, None),
    ],
)
def test_hub_probe(monkeypatch, behaviour, token, error, message):
    import httpx2
    import huggingface_hub

    from cbtool.data import hub

    def dataset_info(self, repo, timeout=None):
        if behaviour == "connect":
            raise httpx2.ConnectError("[Errno -2] Name or service not known")
        return _Info("manual" if behaviour == "gated" else False)

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", dataset_info)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # the shared TCP probe; dataset_info is mocked above
    if error is None:
        hub.probe_hub("ILSVRC/imagenet-1k")
        return
    with pytest.raises(error, match=message) as caught:
        hub.probe_hub("ILSVRC/imagenet-1k")
    assert "\n" not in str(caught.value)


def _hub_exceptions():
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import OfflineModeIsEnabled

    return [
        (DatasetNotFoundError("Dataset 'x' is a gated dataset on the Hub. You must be authenticated"), NetworkError, "gated"),
        (DatasetNotFoundError("Dataset 'x' doesn't exist on the Hub or cannot be accessed."), DatasetError, "no dataset 'x'"),
        (ConnectionError("Couldn't reach 'x' on the Hub (LocalEntryNotFoundError)"), NetworkError, "cannot reach"),
        (OfflineModeIsEnabled("offline"), NetworkError, "HF_HUB_OFFLINE is set"),
        (ValueError("Unknown split \"nope\".\nShould be one of ['train']."), DatasetError, 'Unknown split "nope".$'),
    ]


@pytest.mark.parametrize("case", range(5))
def test_hub_error_messages(case):
    from cbtool.data.hub import hub_error

    exception, kind, message = _hub_exceptions()[case]
    converted = hub_error("x", exception)
    assert type(converted) is kind and "\n" not in str(converted)
    assert re.search(message, str(converted))


# ----- unknown names ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("./no/such/folder", {}, "no dataset './no/such/folder': no such folder"),
        ("not a dataset!", {}, "no such folder, and not 'sample'"),
        ("nosuchdir", {}, "no dataset 'nosuchdir': no such folder, .*a Hub id, which needs ORG/NAME"),
        ("", {}, "no dataset given"),
        ("sample", {"streaming": True}, "--streaming only apply"),
        ("sample", {"split": "validation"}, "no split 'validation'.*splits: train, test"),
        ("sample", {"limit": 0}, "--limit must be a positive"),
    ],
)
def test_unknown_dataset_messages(name, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        resolve_dataset(name, **kwargs)


def test_file_instead_of_folder(tmp_path):
    write_image(tmp_path / "one.png")
    with pytest.raises(DatasetError, match="is a file"):
        resolve_dataset(str(tmp_path / "one.png"))


# ----- the embedded sample ---------------------------------------------------------------------------
@pytest.mark.parametrize("split, purpose, size", [(None, "eval", 1000), ("test", "eval", 1000), (None, "train", 5000), ("train", "eval", 5000)])
def test_sample_dataset(split, purpose, size):
    ds = resolve_dataset("sample", split, purpose=purpose)
    assert len(ds) == size and ds.kind == "sample" and ds.available_splits == ["train", "test"]
    assert ds.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert np.bincount(ds.labels).tolist() == [size // 10] * 10
    assert len(set(ds.sample_ids)) == size
    image, label = ds[0]
    assert image.mode == "RGB" and image.size == (28, 28) and 0 <= label < 10
    pixels = np.asarray(image)
    assert (pixels[..., 0] == pixels[..., 1]).all() and pixels.max() > 0


def test_sample_file_is_small_and_licensed():
    from cbtool.data.embedded import SAMPLE_FILE

    assert SAMPLE_FILE.stat().st_size < 3_000_000
    notice = (SAMPLE_FILE.parent / "LICENSE").read_text()
    assert "Zalando SE" in notice and "MIT License" in notice and "fashion-mnist" in notice


# ----- image modes and bad images ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I"])
def test_image_modes_become_rgb(tmp_path, mode):
    path = tmp_path / "ds" / "a" / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    write_image(path, value=77, mode=mode)
    image, label = resolve_dataset(str(tmp_path / "ds"))[0]
    assert image.mode == "RGB" and image.size == (12, 10) and label == 0


def test_grayscale_pixels_are_replicated(tmp_path):
    path = tmp_path / "ds" / "a" / "gray.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 77, np.uint8)).save(path)
    image, _ = resolve_dataset(str(tmp_path / "ds"))[0]
    assert image.getpixel((1, 1)) == (77, 77, 77)


def _folder_with_bad_images(root: Path) -> Path:
    make_folder(root, {"a": 3, "b": 3})
    (root / "a" / "broken.jpg").write_bytes(b"definitely not a jpeg")
    good = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good, format="PNG")
    (root / "b" / "truncated.png").write_bytes(good.getvalue()[:60])
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_skipped_and_counted(tmp_path, workers):
    ds = resolve_dataset(str(_folder_with_bad_images(tmp_path / "ds")), skip_bad_images=True)
    assert len(ds) == 8
    got = loader_indices(ds, batch_size=3, workers=workers)
    bad = {ds.sample_ids.index("a/broken.jpg"), ds.sample_ids.index("b/truncated.png")}
    assert sorted(got) == sorted(set(range(8)) - bad)
    assert ds.bad_images == 2 and sorted(ds.bad_image_ids) == ["a/broken.jpg", "b/truncated.png"]
    assert ds.describe()["bad_images"] == 2 and ds.describe()["num_samples"] == 6


def test_bad_images_fail_without_skip(tmp_path):
    ds = resolve_dataset(str(_folder_with_bad_images(tmp_path / "ds")))
    with pytest.raises(DatasetError, match=r"cannot decode image 'a/broken.jpg' \(.*\); .*--skip-bad-images"):
        loader_indices(ds, batch_size=4, workers=0)
    with pytest.raises(DatasetError, match="cannot decode image 'b/truncated.png'"):
        ds[ds.sample_ids.index("b/truncated.png")]


# ----- limit and held-out validation --------------------------------------------------------------------
@pytest.mark.parametrize(
    "labels, limit, expected",
    [
        ([0, 0, 0, 1, 1, 1, 2, 2, 2], 3, [0, 3, 6]),  # one per class, the first of each
        ([0, 0, 0, 1, 1, 1, 2, 2, 2], 5, [0, 1, 3, 4, 6]),
        ([2, 1, 0, 2, 1, 0], 4, [0, 1, 2, 5]),  # classes in label order: 0, 1, 2, then 0 again
        ([0, 0, 0, 0, 1], 3, [0, 1, 4]),  # a small class runs out, the others fill in
        ([0, 1], 10, [0, 1]),
    ],
)
def test_limit_positions(labels, limit, expected):
    assert limit_positions(np.array(labels), limit).tolist() == expected


def test_limit_on_sample_is_balanced_deterministic_and_nested():
    small, big = resolve_dataset("sample", limit=20), resolve_dataset("sample", limit=50)
    assert len(small) == 20 and np.bincount(small.labels).tolist() == [2] * 10
    assert resolve_dataset("sample", limit=20).sample_ids == small.sample_ids
    assert set(small.sample_ids) <= set(big.sample_ids)
    assert small.describe()["limit"] == 20 and small.samples_sha256() != big.samples_sha256()
    assert len(resolve_dataset("sample", limit=10_000)) == 1000


def test_split_validation_is_stratified_and_deterministic():
    ds = resolve_dataset("sample", purpose="train")
    train, val = split_validation(ds, 0.1, seed=3)
    assert (len(train), len(val)) == (4500, 500)
    assert np.bincount(val.labels).tolist() == [50] * 10
    assert not set(train.sample_ids) & set(val.sample_ids) and len(set(train.sample_ids) | set(val.sample_ids)) == 5000
    assert split_validation(ds, 0.1, seed=3)[1].sample_ids == val.sample_ids
    assert split_validation(ds, 0.1, seed=4)[1].sample_ids != val.sample_ids
    assert val.describe()["holdout"] == {"part": "validation", "fraction": 0.1, "seed": 3, "from_split": "train"}
    for fraction in (0.0, 1.0):
        with pytest.raises(DatasetError, match="--val-fraction"):
            split_validation(ds, fraction)


# ----- loaders ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 7, 10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_eval_sharding_covers_every_sample_once(size, world_size, batch_size):
    ds = resolve_dataset("sample", limit=size)
    shards = [loader_indices(ds, batch_size=batch_size, workers=0, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == list(range(size))
    assert [len(s) for s in shards] == [len(range(r, size, world_size)) for r in range(world_size)]


def test_eval_batches_carry_labels_and_indices_with_workers():
    ds = resolve_dataset("sample", limit=30)
    loader = build_loader(ds.with_transform(tensor_transform), batch_size=4, workers=2, rank=1, world_size=2)
    assert len(loader) == 4
    for images, labels, indices in loader:
        assert images.shape[1:] == (3, 2, 2) and labels.dtype == indices.dtype
        assert labels.tolist() == ds.labels[indices.numpy()].tolist()


def test_train_sampler_shuffles_shards_and_resumes():
    ds = resolve_dataset("sample", limit=23, purpose="train")
    data = ds.with_transform(tensor_transform)

    def epoch(rank, epoch_, **kwargs):
        loader = build_loader(data, batch_size=3, workers=0, shuffle=True, seed=5, rank=rank, world_size=2, **kwargs)
        loader.set_epoch(epoch_)
        return [i for _, _, idx in loader for i in idx.tolist()]

    e0 = [epoch(r, 0) for r in range(2)]
    assert len(e0[0]) == len(e0[1]) == 11 and not set(e0[0]) & set(e0[1])
    assert e0 == [epoch(r, 0) for r in range(2)]  # same seed and epoch: same order
    assert epoch(0, 1) != e0[0] and sorted(e0[0]) != list(range(0, 22, 2))
    resumed = epoch(0, 0, start_epoch=0, start_batch=2)
    assert resumed == e0[0][6:]
    loader = build_loader(data, batch_size=3, workers=0, shuffle=True, seed=5, start_epoch=1, start_batch=1)
    loader.set_epoch(1)
    first = [i for _, _, idx in loader for i in idx.tolist()]
    loader.set_epoch(2)
    second = [i for _, _, idx in loader for i in idx.tolist()]
    assert len(first) == 20 and len(second) == 23  # the skip applies to the resumed epoch only


def test_build_loader_rejects_bad_arguments():
    data = resolve_dataset("sample", limit=4).with_transform(tensor_transform)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        build_loader(data, batch_size=2, workers=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start_batch"):
        build_loader(data, batch_size=2, workers=0, start_batch=1)


# ----- preprocessing ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(61, 83, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "overrides, timm_changes",
    [
        ({}, {}),
        ({"img_size": 24}, {"input_size": (3, 24, 24)}),
        ({"crop_pct": 1.0, "interpolation": "bilinear"}, {"crop_pct": 1.0, "interpolation": "bilinear"}),
        ({"img_size": (20, 28)}, {"input_size": (3, 20, 28)}),
    ],
)
def test_eval_transform_equals_timm(photo, overrides, timm_changes):
    import torch
    from timm.data import create_transform

    expected = create_transform(**{**TINY_CONFIG, **timm_changes}, is_training=False)(photo)
    got = build_transform(TINY_CONFIG, **overrides)(photo)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_transform_from_a_timm_model_config_equals_timm(photo):
    import timm
    import torch
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=1)
    config = resolve_data_config(model=model)
    assert torch.equal(build_transform(config)(photo), create_transform(**config)(photo))


def test_train_transform_equals_timm(photo):
    import random

    import torch
    from timm.data import create_transform

    expected_tf = create_transform(input_size=(3, 16, 16), is_training=True, interpolation="bicubic", mean=TINY_CONFIG["mean"], std=TINY_CONFIG["std"])
    got_tf = build_transform(TINY_CONFIG, is_training=True)
    outputs = []
    for tf in (expected_tf, got_tf):
        torch.manual_seed(0)
        random.seed(0)
        outputs.append(tf(photo))
    assert outputs[0].shape == (3, 16, 16) and torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize(
    "overrides, message",
    [({"interpolation": "cubic"}, "--interpolation must be one of"), ({"crop_pct": 1.5}, "--crop-pct"), ({"img_size": 0}, "--img-size")],
)
def test_transform_override_errors(overrides, message):
    with pytest.raises(DatasetError, match=message):
        build_transform(TINY_CONFIG, **overrides)


def test_random_interpolation_is_for_training_only(photo):
    assert build_transform(TINY_CONFIG, is_training=True, interpolation="random")(photo).shape == (3, 16, 16)
    with pytest.raises(DatasetError, match="--interpolation must be one of"):
        build_transform(TINY_CONFIG, interpolation="random")


# ----- class counts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_classes, ok", [(10, True), (1000, False), (9, False)])
def test_check_num_classes(model_classes, ok):
    ds = resolve_dataset("sample", limit=10)
    if ok:
        check_num_classes(ds, model_classes)
        return
    with pytest.raises(DatasetError) as caught:
        check_num_classes(ds, model_classes)
    text = str(caught.value)
    assert f"has 10 classes but the model's head has {model_classes}" in text
    assert "cbtool inject --num-classes 10" in text and "cbtool finetune" in text


# ----- import cost ------------------------------------------------------------------------------------
def test_import_is_light():
    code = "import sys, cbtool.data; print(sorted(m for m in ('torch', 'timm', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"


def test_resolved_dataset_is_exported():
    assert isinstance(resolve_dataset("sample", limit=1), ResolvedDataset)


def test_class_order_matches_timm_create_dataset(tmp_path):
    """Label indices must equal timm's (natural order, case ignored), not plain string order."""
    from PIL import Image
    from timm.data import create_dataset

    from cbtool.data import resolve_dataset

    for name in ["class10", "class2", "Banana", "apple", "class1"]:
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "0.png")
    ds = resolve_dataset(str(tmp_path))
    timm_order = create_dataset("", root=str(tmp_path)).reader.class_to_idx
    assert ds.class_names == sorted(timm_order, key=timm_order.get)
    assert ds.class_names == ["apple", "Banana", "class1", "class2", "class10"]


def test_folder_links_count_each_file_once_and_never_cross_classes(tmp_path, capsys):
    """Links are followed (datasets built from links work) but loops, repeats and links into another class are
    skipped and named; the order of the files is os.walk's (depth first, names sorted)."""
    from cbtool.data.folder import read_folder

    outside = tmp_path / "store"
    outside.mkdir()
    for name in ("x.png", "y.png"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside / name)
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c / "sub").mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / c / "1.png")
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / c / "sub" / "2.png")
    os.symlink(outside, root / "a" / "store")  # a folder elsewhere: followed
    os.symlink(outside / "x.png", root / "a" / "x-again.png")  # the same file twice: counted once
    os.symlink("..", root / "a" / "sub" / "up")  # a loop back to the class folder
    os.symlink("../../b", root / "a" / "sub" / "into-b")  # another class
    os.symlink("../b/1.png", root / "a" / "b1.png")  # another class's image
    os.symlink(root, root / "b" / "root")  # the folder above every class
    source, classes, _, _ = read_folder(root, None, purpose="eval")
    assert classes == ["a", "b"]
    # a folder's own files come before its subfolders (as os.walk gives them): x.png counts as a/x-again.png
    assert source.files == ["a/1.png", "a/x-again.png", "a/store/y.png", "a/sub/2.png", "b/1.png", "b/sub/2.png"]
    assert source.labels.tolist() == [0, 0, 0, 0, 1, 1]
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "skipped 5 link(s)" in warning[0]
    assert warning[0].endswith("a/b1.png, a/store/x.png, a/sub/into-b, a/sub/up and 1 more")


def test_folder_link_warning_is_printed_by_rank_0_only(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank reads the folder; the skipped links are named once, not once per rank."""
    from cbtool.data.folder import read_folder

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / c / "1.png")
    os.symlink("..", root / "a" / "up")  # a loop: skipped and named
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        source, _, _, _ = read_folder(root, None, purpose="eval")
        assert source.files == ["a/1.png", "b/1.png"]  # every rank reads the same files
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == lines and all("skipped 1 link(s)" in line and line.endswith("a/up") for line in err), err
