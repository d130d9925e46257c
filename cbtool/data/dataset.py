"""The resolved dataset: one class that every source (folder, Hub, saved, sample) becomes.

A *source* is a small object that knows how to read one kind of storage:

- ``len(source)``, ``source.labels`` (its own class index per sample, a numpy array),
- ``source.load(i)`` -> a decoded RGB ``PIL.Image`` (raises ``BadImage``),
- ``source.sample_id(i)`` -> a stable identifier (a relative path, ``repo/split/row``, ...).

Streaming sources instead have ``iter_encoded()``, yielding ``(encoded, label)`` pairs in stream
order, and ``decode(encoded)``.

``ResolvedDataset`` is a view of a source: a list of positions into it (after ``limit`` or
``split_validation``) and a label map into the label space the model sees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cbtool.errors import DatasetError

from cbtool.data.images import BAD_IMAGE_HINT, BadImage, open_rgb  # noqa: F401  (public names kept here)


@dataclass
class ResolvedDataset:
    """A dataset ready for a model: RGB images, integer labels, and the facts to record about it.

    ``labels`` index ``class_names``. When ``class_subset`` is set (ImageNet-A/R style), the
    labels index into it and it lists the model's class indices to keep, in label order.
    """

    name: str
    kind: str  # hub | folder | saved | sample
    split: str | None
    num_classes: int
    class_names: list[str]
    sample_ids: list[str] | None
    class_subset: list[int] | None = None
    available_splits: list[str] = field(default_factory=list)
    limit: int | None = None
    streaming: bool = False
    skip_bad_images: bool = False
    holdout: dict | None = None  # set by split_validation: {"part", "fraction", "seed"}
    _source: Any = field(default=None, repr=False, compare=False)
    _positions: np.ndarray | None = field(default=None, repr=False, compare=False)
    _labels: np.ndarray | None = field(default=None, repr=False, compare=False)
    _label_map: np.ndarray | None = field(default=None, repr=False, compare=False)
    _bad: list = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_source(cls, source, *, label_map: list[int], **fields) -> "ResolvedDataset":
        """A view of all of ``source``, with its labels mapped through ``label_map``."""
        label_map_arr = np.asarray(label_map, dtype=np.int64)
        if fields.get("streaming"):
            return cls(sample_ids=None, _source=source, _label_map=label_map_arr, **fields)
        positions = np.arange(len(source), dtype=np.int64)
        labels = label_map_arr[np.asarray(source.labels, dtype=np.int64)] if len(source) else np.zeros(0, np.int64)
        ids = [source.sample_id(i) for i in range(len(source))]
        return cls(sample_ids=ids, _source=source, _positions=positions, _labels=labels, _label_map=label_map_arr, **fields)

    # ----- map-style access -------------------------------------------------------------
    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming dataset has no length; iterate it, or resolve it without streaming")
        return len(self._positions)

    def __getitem__(self, index: int):
        """``(PIL.Image RGB, label)``; an undecodable image raises ``DatasetError``."""
        try:
            return self.load_image(index), int(self._labels[index])
        except BadImage as error:
            raise DatasetError(f"cannot decode image '{self.sample_ids[index]}' ({error}); {BAD_IMAGE_HINT}") from None

    def load_image(self, index: int):
        """The RGB image at ``index``; raises ``BadImage`` when it cannot be decoded."""
        if self.streaming:
            raise TypeError("a streaming dataset cannot be indexed; iterate it through with_transform()")
        return self._source.load(int(self._positions[index]))

    @property
    def labels(self) -> np.ndarray:
        """Every sample's label, in dataset order (not for streaming datasets)."""
        if self.streaming:
            raise TypeError("a streaming dataset's labels are only known while iterating it")
        return self._labels

    # ----- bad images -----------------------------------------------------------------
    @property
    def bad_images(self) -> int:
        """How many images could not be decoded so far (counted by the loader, in the main process)."""
        return len(self._bad)

    @property
    def bad_image_ids(self) -> list[str]:
        return [sample_id for _, sample_id, _ in self._bad]

    def report_bad(self, index: int, sample_id: str, reason: str) -> None:
        """Record an undecodable image; raise ``DatasetError`` unless ``skip_bad_images``."""
        self._bad.append((index, sample_id, reason))
        if not self.skip_bad_images:
            raise DatasetError(f"cannot decode image '{sample_id}' ({reason}); {BAD_IMAGE_HINT}")

    # ----- torch -------------------------------------------------------------------------
    def with_transform(self, transform):
        """A torch dataset yielding ``(tensor, label, index)``; feed it to ``build_loader``.

        Undecodable images become sentinels that the loader's collate drops and reports back
        here (``bad_images``), so the count is right even with worker processes.
        """
        from cbtool.data.loader import TransformedDataset, TransformedStream

        if self.streaming:
            return TransformedStream(self, transform)
        return TransformedDataset(self, transform)

    # ----- provenance ---------------------------------------------------------------------
    def samples_sha256(self) -> str | None:
        """SHA-256 of the ordered sample identifiers: the same value means the same samples.

        None only for a streaming dataset without ``limit`` (its samples are not known up front).
        """
        ids = self.sample_ids
        if ids is None:
            if self.limit is None:
                return None
            ids = [self._source.sample_id(k) for k in range(self.limit)]  # streaming + limit: the first N
        digest = hashlib.sha256()
        for sample_id in ids:
            digest.update(sample_id.encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()

    def describe(self) -> dict:
        """The ``dataset`` object of cbtool's JSON results (docs/results-schema.md)."""
        record = {
            "name": self.name,
            "kind": self.kind,
            "split": self.split,
            "num_samples": self._num_evaluated(),
            "limit": self.limit,
            "num_classes": self.num_classes,
            "samples_sha256": self.samples_sha256(),
            "bad_images": self.bad_images,
            "class_subset": self.class_subset,
        }
        if self.holdout is not None:
            record["holdout"] = dict(self.holdout)
        return record

    def source_size(self) -> int | None:
        """Samples in the whole source, before ``limit`` and held-out splits (``None`` for a stream)."""
        return None if self.streaming or self._source is None else len(self._source)

    def _num_evaluated(self) -> int | None:
        """Samples minus the bad images skipped so far (a stream counts its ``limit``, or None)."""
        total = self.limit if self.streaming else len(self)
        return None if total is None else total - self.bad_images

    # ----- views ------------------------------------------------------------------------------
    def _view(self, keep: np.ndarray, **changes) -> "ResolvedDataset":
        keep = np.asarray(keep, dtype=np.int64)
        return replace(
            self,
            sample_ids=[self.sample_ids[i] for i in keep],
            _positions=self._positions[keep],
            _labels=self._labels[keep],
            _bad=[],
            **changes,
        )


def limit_positions(labels: np.ndarray, limit: int) -> np.ndarray:
    """Positions of ``limit`` samples spread over the classes, in dataset order.

    Round-robin over classes in label order: the first sample of every class, then the second
    of every class, and so on, each class's samples taken in dataset order. Deterministic with
    no seed, and a smaller limit picks a subset of a larger one.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if limit >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    order = np.argsort(labels, kind="stable")  # grouped by class, dataset order inside a class
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class = np.empty_like(order)
    rank_in_class[order] = np.arange(len(order)) - starts
    picked = np.lexsort((labels, rank_in_class))[:limit]
    return np.sort(picked)


def apply_limit(ds: ResolvedDataset, limit: int | None) -> ResolvedDataset:
    """``ds`` cut to ``limit`` samples (see ``limit_positions``; a stream keeps its first ``limit``)."""
    if limit is None:
        return ds
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise DatasetError(f"--limit must be a positive number of images, not {limit!r}")
    if ds.streaming:
        return replace(ds, limit=limit)
    return ds._view(limit_positions(ds.labels, limit), limit=limit)


def split_validation(ds: ResolvedDataset, fraction: float, seed: int = 0) -> tuple[ResolvedDataset, ResolvedDataset]:
    """Hold out ``fraction`` of ``ds`` as a validation set, stratified by class: ``(train, val)``.

    Each class's samples are shuffled with ``numpy.random.default_rng(seed)`` and the first
    ``round(fraction * count)`` go to validation; both parts keep dataset order.
    """
    if ds.streaming:
        raise DatasetError("--val-fraction needs a dataset with a length; drop --streaming")
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1 (exclusive), not {fraction}")
    rng = np.random.default_rng(seed)
    labels = ds.labels
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[: int(round(fraction * len(members)))])
    val_positions = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    if len(val_positions) == 0 or len(val_positions) == len(ds):
        raise DatasetError(
            f"--val-fraction {fraction} of {len(ds)} images leaves an empty training or validation part; "
            "use a larger dataset or another fraction"
        )
    train_mask = np.ones(len(ds), dtype=bool)
    train_mask[val_positions] = False
    base = {"fraction": fraction, "seed": seed, "from_split": ds.split}
    train = ds._view(np.flatnonzero(train_mask), split="train", holdout={"part": "train", **base})
    val = ds._view(val_positions, split="validation", holdout={"part": "validation", **base})
    return train, val
