"""Datasets read with the ``datasets`` library: Hub repositories and ``save_to_disk`` folders.

Hub access is checked first with one metadata request that does not retry, so an offline
machine or a gated dataset fails in well under a second with one line saying what to do,
instead of ``datasets``' retry loop. Only the requested split's files are downloaded
(``datasets`` would otherwise prepare every split: ImageNet's train split is 140 GB).
Loading never runs remote code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cbtool.data.images import BadImage, open_rgb
from cbtool.errors import CbtoolError, DatasetError, NetworkError, first_line
from cbtool.models.hub import hub_reachable

IMAGENET_1K_REPO = "ILSVRC/imagenet-1k"
HUB_ALIASES = {"imagenet-1k": IMAGENET_1K_REPO}
PROBE_TIMEOUT_S = 10.0
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels")
SYNSET_COLUMN_NAMES = ("wnid", "synset")  # string columns of WordNet ids (ImageNet-R on the Hub)


# ----- errors ---------------------------------------------------------------------------------
def gated_message(repo: str) -> str:
    return (
        f"'{repo}' is gated on the Hugging Face Hub: accept its terms at https://huggingface.co/datasets/{repo}, "
        "then log in with `hf auth login` (or `huggingface-cli login`); or pass a local folder instead"
    )


def offline_message(repo: str, reason: str) -> str:
    return (
        f"cannot reach the Hugging Face Hub for dataset '{repo}' ({reason}); check the network, "
        "set HF_HUB_OFFLINE=1 to use a copy already in the cache, or pass a local folder"
    )


def hub_error(repo: str, error: Exception) -> CbtoolError:
    """The one-line cbtool error for an exception raised while loading ``repo`` from the Hub."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    text = str(error)
    if isinstance(error, GatedRepoError) or "gated" in text.lower():
        return NetworkError(gated_message(repo))
    if isinstance(error, (DatasetNotFoundError, RepositoryNotFoundError)):
        return DatasetError(
            f"no dataset '{repo}' on the Hugging Face Hub that this account can read; check the name, "
            "log in with `hf auth login` if it is private, or pass a local folder (none exists at that path)"
        )
    if isinstance(error, OfflineModeIsEnabled) or "offline" in text.lower():
        return NetworkError(f"'{repo}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set; unset it to download, or pass a local folder")
    if isinstance(error, (ConnectionError, TimeoutError)):
        return NetworkError(offline_message(repo, first_line(error)))
    return DatasetError(f"cannot load '{repo}' from the Hugging Face Hub: {first_line(error)}")


def probe_hub(repo: str) -> None:
    """Fail fast, with one line, when ``repo`` cannot be read from the Hub (no retries)."""
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return  # load_dataset reads the cache; hub_error explains a miss
    if not hub_reachable():  # the same probe as for models: one TCP connection, once per process
        raise NetworkError(offline_message(repo, "no connection"))
    try:
        info = HfApi().dataset_info(repo, timeout=PROBE_TIMEOUT_S)
    except RepositoryNotFoundError as error:
        raise hub_error(repo, error) from error
    except HfHubHTTPError as error:
        raise NetworkError(f"the Hugging Face Hub answered '{first_line(error)}' for dataset '{repo}'; try again later, or pass a local folder") from error
    except Exception as error:  # connection refused, DNS failure, timeout, proxy errors: all "offline"
        raise NetworkError(offline_message(repo, type(error).__name__)) from error
    if getattr(info, "gated", False) and get_token() is None:
        raise NetworkError(gated_message(repo))


def hub_layout(repo: str) -> tuple[list[str], dict | None, object]:
    """``(split names, data files per split or None, features or None)`` without downloading data."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(repo)
    except Exception as error:
        raise hub_error(repo, error) from error
    data_files = builder.config.data_files
    if data_files:
        files = {split: list(paths) for split, paths in data_files.items()}
        return list(files), files, builder.info.features
    splits = list(builder.info.splits or {})
    return splits, None, builder.info.features


def load_hub_split(repo: str, split: str, *, streaming: bool, data_files: dict | None, features):
    """One split of a Hub dataset, downloading only that split's files."""
    import datasets

    kwargs = {"split": split, "streaming": streaming}
    if data_files is not None:
        kwargs["data_files"] = {split: data_files[split]}
    if features is not None:
        kwargs["features"] = features
    try:
        return datasets.load_dataset(repo, **kwargs)
    except Exception as error:
        raise hub_error(repo, error) from error


# ----- save_to_disk folders -------------------------------------------------------------------
def is_saved_dataset(path: Path) -> bool:
    """True for a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def load_saved(path: Path) -> tuple[dict, str]:
    """``({split or None: Dataset}, fingerprint)`` for a ``save_to_disk`` folder."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DatasetError(f"cannot read the saved dataset at '{path}': {first_line(error)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded), _fingerprint(path / "dataset_dict.json", path)
    if isinstance(loaded, datasets.Dataset):
        return {None: loaded}, _fingerprint(path / "state.json", path)
    raise DatasetError(f"'{path}' holds a {type(loaded).__name__}, not a Dataset or DatasetDict")


def _fingerprint(json_file: Path, path: Path) -> str:
    """A stable name for a saved dataset: ``datasets``' fingerprint, else the folder name."""
    try:
        state = json.loads(json_file.read_text())
    except (OSError, ValueError):
        return path.name
    if isinstance(state, dict) and state.get("_fingerprint"):
        return str(state["_fingerprint"])
    if isinstance(state, dict) and state.get("splits"):  # dataset_dict.json lists splits only
        split = state["splits"][0]
        return _fingerprint(path / split / "state.json", path)
    return path.name


# ----- columns and labels ---------------------------------------------------------------------
def pick_columns(features, image_column: str | None, label_column: str | None, where: str) -> tuple[str, str]:
    """The image and label column names: the given ones, else detected from the features."""
    import datasets

    if features is None:
        if image_column and label_column:
            return image_column, label_column
        raise DatasetError(f"{where} does not describe its columns; pass --image-column and --label-column")
    columns = list(features)
    listed = ", ".join(columns)
    for given, kind in ((image_column, "--image-column"), (label_column, "--label-column")):
        if given is not None and given not in features:
            raise DatasetError(f"{where} has no column '{given}' (columns: {listed}); fix {kind}")
    if image_column is None:
        image_column = next((c for c in columns if isinstance(features[c], datasets.Image)), None)
        image_column = image_column or next((c for c in IMAGE_COLUMN_NAMES if c in features), None)
        if image_column is None:
            raise DatasetError(f"{where} has no image column (columns: {listed}); name it with --image-column")
    if label_column is None:
        candidates = [c for c in columns if isinstance(features[c], datasets.ClassLabel)]
        candidates += [c for c in LABEL_COLUMN_NAMES + SYNSET_COLUMN_NAMES if c in features]
        label_column = next((c for c in candidates if c != image_column), None)
        if label_column is None:
            raise DatasetError(f"{where} has no label column (columns: {listed}); name it with --label-column")
    return image_column, label_column


def synset_column_for(features, image_column: str) -> str | None:
    """A string column of WordNet ids (``wnid``, ``synset``), if the dataset has one."""
    return next((c for c in SYNSET_COLUMN_NAMES if c in features and c != image_column and _is_string(features[c])), None)


def _is_string(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _is_integer(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and "int" in feature.dtype


def read_labels(ds, label_column: str, where: str) -> tuple[np.ndarray, list[str]]:
    """``(class index per row, class names)`` from a ClassLabel, integer or string label column.

    Integer labels name classes ``"0" .. str(max)``; string labels become sorted class names.
    """
    import datasets

    feature = ds.features[label_column]
    values = ds.select_columns([label_column]).with_format("numpy")[:][label_column]
    if isinstance(feature, datasets.ClassLabel) or _is_integer(feature):
        raw = np.asarray(values, dtype=np.int64)
        if len(raw) and raw.min() < 0:
            raise DatasetError(f"{where} has unlabelled images (label {raw.min()}), as ImageNet's test split does; evaluate on its validation split")
        if isinstance(feature, datasets.ClassLabel):
            return raw, list(feature.names)
        return raw, [str(i) for i in range(int(raw.max()) + 1 if len(raw) else 0)]
    if _is_string(feature):
        classes, raw = np.unique(np.asarray(values, dtype=str), return_inverse=True)
        return raw.astype(np.int64), [str(c) for c in classes]
    raise DatasetError(f"{where}: label column '{label_column}' holds {feature}, not class labels; pick another with --label-column")


def decode_hf_image(value):
    """Decode a ``datasets`` image cell (``{"bytes", "path"}``, a path, or a PIL image) to RGB."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return open_rgb(value["bytes"])
        if value.get("path"):
            return open_rgb(value["path"])
        raise BadImage("empty image cell")
    if isinstance(value, str):
        return open_rgb(value)
    if hasattr(value, "convert"):
        return value.convert("RGB")
    raise BadImage(f"not an image: {type(value).__name__}")


def undecoded(ds, image_column: str):
    """``ds`` with its image column left as bytes, so cbtool decodes (and counts failures) itself."""
    import datasets

    if isinstance(ds.features[image_column] if ds.features else None, datasets.Image):
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


class HFSource:
    """Rows of a ``datasets.Dataset``; ``sample_id`` is ``prefix/row``."""

    def __init__(self, images, image_column: str, labels: np.ndarray, id_prefix: str):
        self.images, self.image_column, self.labels, self.id_prefix = images, image_column, labels, id_prefix

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        return decode_hf_image(self.images[i][self.image_column])

    def sample_id(self, i: int) -> str:
        return f"{self.id_prefix}/{i}"


class StreamSource:
    """Rows of a streaming ``datasets.IterableDataset``, in stream order."""

    def __init__(self, stream, image_column: str, label_column: str, lookup: dict[str, int] | None, id_prefix: str):
        self.stream, self.image_column, self.label_column = stream, image_column, label_column
        self.lookup, self.id_prefix = lookup, id_prefix

    def iter_encoded(self):
        for row in self.stream:
            label = row[self.label_column]
            if self.lookup is not None:
                if label not in self.lookup:
                    raise DatasetError(f"label '{label}' of {self.id_prefix} is not an ImageNet-1k synset; drop --streaming")
                label = self.lookup[label]
            elif label is None or int(label) < 0:
                raise DatasetError(f"{self.id_prefix} has unlabelled images; evaluate on a labelled split")
            yield row[self.image_column], int(label)

    def decode(self, encoded):
        return decode_hf_image(encoded)

    def sample_id(self, k: int) -> str:
        return f"{self.id_prefix}/{k}"


def stream_classes(features, label_column: str, num_model_classes: int | None, where: str) -> tuple[list[str], dict | None]:
    """``(classes, string->index lookup or None)`` for a streamed label column, known without reading it."""
    import datasets

    from cbtool.data.imagenet import IMAGENET_NUM_CLASSES, synset_to_index

    feature = features[label_column] if features is not None else None
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    if feature is None or _is_integer(feature):
        if num_model_classes is None:
            raise DatasetError(f"{where}: streaming labels without class names need the model's class count; drop --streaming")
        return [str(i) for i in range(num_model_classes)], None
    if _is_string(feature) and num_model_classes in (None, IMAGENET_NUM_CLASSES):
        lookup = synset_to_index()  # the streamed strings must be ImageNet synsets
        return list(lookup), lookup
    raise DatasetError(f"{where}: cannot stream label column '{label_column}' ({feature}) without reading it all; drop --streaming")
