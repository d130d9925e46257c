"""``resolve_dataset``: turn what the user typed after ``--dataset`` into a ``ResolvedDataset``.

In order: ``sample`` (embedded Fashion-MNIST), ``imagenet-1k`` (the Hub's ILSVRC/imagenet-1k),
an existing local path (a ``save_to_disk`` folder, else an image folder), else a Hub dataset id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cbtool.data.dataset import ResolvedDataset, apply_limit
from cbtool.data.imagenet import IMAGENET_NUM_CLASSES, is_synset, label_space
from cbtool.data.splits import choose_split
from cbtool.errors import DatasetError

SAMPLE_NAME = "sample"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_PURPOSES = ("eval", "train")


@dataclass(frozen=True)
class _Request:
    """What the caller asked for, handed to the reader of each kind of dataset."""

    name: str
    split: str | None
    purpose: str
    image_column: str | None
    label_column: str | None
    streaming: bool
    num_model_classes: int | None
    skip_bad_images: bool

    def no_hub_options(self) -> None:
        flags = (("--image-column", self.image_column), ("--label-column", self.label_column), ("--streaming", self.streaming))
        given = [flag for flag, value in flags if value]
        if given:
            raise DatasetError(f"{', '.join(given)} only apply to Hub and save_to_disk datasets, not '{self.name}'; leave them out")

    def label_space(self, classes: list[str]):
        return label_space(classes, num_model_classes=self.num_model_classes, purpose=self.purpose)


def resolve_dataset(
    name: str,
    split: str | None = None,
    *,
    purpose: str = "eval",
    image_column: str | None = None,
    label_column: str | None = None,
    streaming: bool = False,
    limit: int | None = None,
    num_model_classes: int | None = None,
    skip_bad_images: bool = False,
) -> ResolvedDataset:
    """Find, open and label a dataset; every problem is a one-line ``DatasetError``/``NetworkError``.

    ``split`` defaults to validation, then test, for ``purpose="eval"`` and to train for
    ``purpose="train"``. ``num_model_classes`` decides whether ImageNet synset classes map
    into the 1000-class space (see ``cbtool.data.imagenet``). ``limit`` keeps a deterministic,
    class-balanced subset (``cbtool.data.dataset.limit_positions``).
    """
    if purpose not in _PURPOSES:
        raise ValueError(f"purpose must be 'eval' or 'train', not {purpose!r}")
    if not name or not name.strip():
        raise DatasetError("no dataset given; pass 'sample', 'imagenet-1k', a local folder, or a Hub dataset id")
    request = _Request(name, split, purpose, image_column, label_column, streaming, num_model_classes, skip_bad_images)

    from cbtool.data.hub import HUB_ALIASES

    if name == SAMPLE_NAME:
        ds = _resolve_sample(request)
    elif name in HUB_ALIASES:
        ds = _resolve_hub(request, HUB_ALIASES[name])
    else:
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise DatasetError(f"'{name}' is a file; pass a folder of class subfolders, a save_to_disk folder, or a Hub dataset id")
            ds = _resolve_local(request, path)
        elif _looks_like_path(name) or not _HUB_ID.fullmatch(name):
            # The Hub's dataset ids are ORG/NAME (its old single-word ids moved under organisations), so a bare
            # word is a folder that is missing, not a download to try.
            raise DatasetError(f"no dataset '{name}': no such folder, and not 'sample', 'imagenet-1k' or a Hub id, "
                               "which needs ORG/NAME (e.g. ylecun/mnist)")
        else:
            ds = _resolve_hub(request, name)
    return apply_limit(ds, limit)


def check_num_classes(ds: ResolvedDataset, model_num_classes: int) -> None:
    """Raise ``DatasetError`` when the model's head cannot score this dataset's labels."""
    if ds.class_subset is not None:
        if max(ds.class_subset) < model_num_classes:
            return
        raise DatasetError(
            f"dataset '{ds.name}' is a {len(ds.class_subset)}-class subset of ImageNet-1k, but the model's head has "
            f"{model_num_classes} classes; use an ImageNet-1k model, or fine-tune a head with `cbtool finetune`"
        )
    if ds.num_classes == model_num_classes:
        return
    raise DatasetError(
        f"dataset '{ds.name}' has {ds.num_classes} classes but the model's head has {model_num_classes}; "
        f"give the model a new head with `cbtool inject --num-classes {ds.num_classes}` and train it with `cbtool finetune`"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _resolve_sample(request: _Request) -> ResolvedDataset:
    from cbtool.data.embedded import SAMPLE_SPLITS, read_sample

    request.no_hub_options()
    chosen = choose_split(SAMPLE_SPLITS, request.split, purpose=request.purpose, where="the sample dataset")
    source, classes = read_sample(chosen)
    return ResolvedDataset.from_source(
        source, label_map=list(range(len(classes))), name=request.name, kind="sample", split=chosen,
        num_classes=len(classes), class_names=classes, available_splits=list(SAMPLE_SPLITS),
        skip_bad_images=request.skip_bad_images,
    )  # fmt: skip


def _resolve_local(request: _Request, path: Path) -> ResolvedDataset:
    from cbtool.data.folder import read_folder
    from cbtool.data.hub import is_saved_dataset

    if is_saved_dataset(path):
        return _resolve_saved(request, path)
    request.no_hub_options()
    source, classes, chosen, splits = read_folder(path, request.split, purpose=request.purpose)
    return _labelled(request, source, request.label_space(classes), kind="folder", split=chosen, splits=splits)


def _resolve_saved(request: _Request, path: Path) -> ResolvedDataset:
    from cbtool.data.hub import load_saved

    if request.streaming:
        raise DatasetError(f"'{request.name}' is already on disk; leave out --streaming")
    parts, fingerprint = load_saved(path)
    if None in parts:
        if request.split is not None:
            raise DatasetError(f"'{request.name}' is a single saved Dataset without splits; leave out --split")
        chosen, splits = None, []
    else:
        splits = list(parts)
        chosen = choose_split(splits, request.split, purpose=request.purpose, where=f"'{request.name}'")
    where = f"'{request.name}'" + (f" (split {chosen})" if chosen else "")
    return _from_hf(request, parts[chosen], kind="saved", split=chosen, splits=splits, where=where, id_prefix=f"{fingerprint}/{chosen or 'all'}")


def _resolve_hub(request: _Request, repo: str) -> ResolvedDataset:
    from cbtool.data import hub

    hub.probe_hub(repo)
    splits, data_files, features = hub.hub_layout(repo)
    chosen = choose_split(splits, request.split, purpose=request.purpose, where=f"'{repo}'")
    loaded = hub.load_hub_split(repo, chosen, streaming=request.streaming, data_files=data_files, features=features)
    where = f"'{repo}' (split {chosen})"
    read = _from_stream if request.streaming else _from_hf
    return read(request, loaded, kind="hub", split=chosen, splits=splits, where=where, id_prefix=f"{repo}/{chosen}")


def _from_hf(request: _Request, ds, *, kind, split, splits, where, id_prefix) -> ResolvedDataset:
    from cbtool.data.hub import HFSource, pick_columns, read_labels, synset_column_for, undecoded

    if len(ds) == 0:
        raise DatasetError(f"{where} has no rows; pick another split with --split")
    image_column, label_column = pick_columns(ds.features, request.image_column, request.label_column, where)
    raw_labels, classes = read_labels(ds, label_column, where)
    if request.label_column is None and request.num_model_classes == IMAGENET_NUM_CLASSES and not all(map(is_synset, classes)):
        # Readable class names (ImageNet-R's "goldfish") beside a WordNet id column: the ids say which ImageNet classes these are.
        synset_column = synset_column_for(ds.features, image_column)
        if synset_column and synset_column != label_column:
            raw_labels, classes = read_labels(ds, synset_column, where)
    source = HFSource(undecoded(ds.select_columns([image_column]), image_column), image_column, raw_labels, id_prefix)
    return _labelled(request, source, request.label_space(classes), kind=kind, split=split, splits=splits)


def _from_stream(request: _Request, stream, *, kind, split, splits, where, id_prefix) -> ResolvedDataset:
    from cbtool.data.hub import StreamSource, pick_columns, stream_classes, undecoded

    image_column, label_column = pick_columns(stream.features, request.image_column, request.label_column, where)
    classes, lookup = stream_classes(stream.features, label_column, request.num_model_classes, where)
    stream = undecoded(stream.select_columns([image_column, label_column]), image_column)
    source = StreamSource(stream, image_column, label_column, lookup, id_prefix)
    return _labelled(request, source, request.label_space(classes), kind=kind, split=split, splits=splits, streaming=True)


def _labelled(request: _Request, source, space, *, kind, split, splits, streaming=False) -> ResolvedDataset:
    return ResolvedDataset.from_source(
        source, label_map=space.label_map, name=request.name, kind=kind, split=split, num_classes=space.num_classes,
        class_names=space.class_names, class_subset=space.class_subset, available_splits=splits,
        skip_bad_images=request.skip_bad_images, streaming=streaming,
    )  # fmt: skip
