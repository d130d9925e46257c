"""DataLoaders for evaluation and training, sharded by rank for torchrun.

Evaluation: rank ``r`` of ``W`` takes positions ``r, r+W, r+2W, ...``, so every sample is
seen exactly once and no rank gets padding (ranks may differ by one sample, so the evaluator
must gather results once at the end, not per batch). Every batch carries the dataset positions
of its samples, so per-sample results can be put back in dataset order.

Training: each epoch is a permutation from ``torch.Generator().manual_seed(seed + epoch)``,
cut to a multiple of the world size (the few samples left over change every epoch), and dealt
out the same way; a run resumes at ``(start_epoch, start_batch)`` with the same order.
"""

from __future__ import annotations

import math
import sys
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from cbtool.data.images import BadImage
from cbtool.errors import DatasetError


class _Bad:
    """Stands in for a sample whose image could not be decoded; the collate drops it."""

    __slots__ = ("index", "sample_id", "reason")

    def __init__(self, index: int, sample_id: str, reason: str):
        self.index, self.sample_id, self.reason = index, sample_id, reason


class TransformedDataset(Dataset):
    """``(tensor, label, index)`` for each sample of a ``ResolvedDataset``."""

    def __init__(self, resolved, transform):  # a cbtool.data.dataset.ResolvedDataset
        self.resolved = resolved
        self.transform = transform

    def __len__(self) -> int:
        return len(self.resolved)

    def __getitem__(self, index: int):
        try:
            image = self.resolved.load_image(index)
        except BadImage as error:
            return _Bad(index, self.resolved.sample_ids[index], str(error))
        return self.transform(image), int(self.resolved.labels[index]), index

    @property
    def bad_images(self) -> int:
        return self.resolved.bad_images


class TransformedStream(IterableDataset):
    """The streaming counterpart of ``TransformedDataset``; the index is the stream position.

    Stream position ``k`` belongs to rank ``k % W`` and, inside that rank, to worker
    ``(k // W) % num_workers``; every worker reads the stream but decodes only its own images.
    """

    def __init__(self, resolved, transform):  # a cbtool.data.dataset.ResolvedDataset
        self.resolved = resolved
        self.transform = transform
        self.rank, self.world_size = 0, 1

    def shard(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        source, limit = self.resolved._source, self.resolved.limit
        label_map = self.resolved._label_map
        for k, (encoded, raw_label) in enumerate(source.iter_encoded()):
            if limit is not None and k >= limit:
                return
            if k % self.world_size != self.rank or (k // self.world_size) % workers != worker:
                continue
            try:
                image = source.decode(encoded)
            except BadImage as error:
                yield _Bad(k, source.sample_id(k), str(error))
                continue
            yield self.transform(image), int(label_map[raw_label]), k

    @property
    def bad_images(self) -> int:
        return self.resolved.bad_images


def collate(batch):
    """Stack the good samples; hand the bad ones on as ``(index, sample_id, reason)`` tuples."""
    good = [item for item in batch if not isinstance(item, _Bad)]
    bad = [(item.index, item.sample_id, item.reason) for item in batch if isinstance(item, _Bad)]
    if not good:
        return None, None, None, bad
    images = torch.stack([item[0] for item in good])
    labels = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return images, labels, indices, bad


class EvalShardSampler(Sampler[int]):
    """Positions ``rank, rank + W, ...``: disjoint shards that together cover every sample once."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class TrainShardSampler(Sampler[int]):
    """A seeded shuffle per epoch, sharded by rank, that can start part-way through an epoch.

    ``set_epoch(e)`` picks the epoch (as with ``DistributedSampler``). The first pass over
    ``start_epoch`` skips ``start_skip`` samples of this rank's shard; later passes start at 0.
    """

    def __init__(self, size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, start_epoch: int = 0, start_skip: int = 0):
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.per_rank = size // world_size
        self.epoch = start_epoch
        self._skip_epoch, self._skip = start_epoch, start_skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's full shard for ``epoch``, before any resume skip."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.size, generator=generator)[: self.per_rank * self.world_size]
        return order[self.rank :: self.world_size].tolist()

    def _skip_now(self) -> int:
        return self._skip if self.epoch == self._skip_epoch else 0

    def __iter__(self) -> Iterator[int]:
        skip = self._skip_now()
        self._skip = 0  # resuming happens once
        return iter(self.epoch_order(self.epoch)[skip:])

    def __len__(self) -> int:
        return max(self.per_rank - self._skip_now(), 0)


class Loader:
    """A DataLoader whose batches are ``(images, labels, indices)``.

    Undecodable images are dropped from their batch and reported to the dataset, which counts
    them (``bad_images``) or raises ``DatasetError`` when it was not asked to skip them.
    """

    def __init__(self, loader: DataLoader, dataset, sampler, generator: torch.Generator | None, seed: int, rank: int):
        self.loader, self.dataset, self.sampler = loader, dataset, sampler
        self._generator, self._seed, self._rank = generator, seed, rank

    @property
    def batch_size(self) -> int | None:
        """Images per batch (per process), as the DataLoader was built."""
        return self.loader.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Pick the training epoch: its shuffle order and its augmentation seeds."""
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self._generator is not None:
            # Worker seeds come from this generator: the same (seed, epoch, rank) gives the same augmentations.
            epoch = getattr(self.sampler, "epoch", 0)
            self._generator.manual_seed(self._seed * 1_000_003 + epoch * 1_009 + self._rank)
        resolved = self.dataset.resolved
        for images, labels, indices, bad in self.loader:
            for index, sample_id, reason in bad:
                resolved.report_bad(index, sample_id, reason)
            if images is not None:
                yield images, labels, indices


def _quiet_when_main_stops(_worker_id: int) -> None:
    """Workers hand batches over through multiprocessing's file-descriptor server; when the main process stops
    (Ctrl-C, an error), a hand-over in flight fails with a connection error that is noise, not news."""
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not issubclass(kind, (ConnectionError, EOFError)):
            previous(kind, value, traceback)

    sys.excepthook = hook


def build_loader(
    dataset,
    *,
    batch_size: int,
    workers: int,
    shuffle: bool = False,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool | None = None,
    drop_last: bool = False,
    start_epoch: int = 0,
    start_batch: int = 0,
) -> Loader:
    """Batches of ``(images [B,3,H,W], labels [B], indices [B])`` for this rank's shard.

    ``shuffle=False`` (evaluation): positions ``rank, rank+W, ...`` in order, nothing padded.
    ``shuffle=True`` (training): a per-epoch seeded permutation; call ``set_epoch`` each epoch.
    ``start_epoch``/``start_batch`` resume training where a run stopped. ``pin_memory=None``
    pins when CUDA is available.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size < 1 or workers < 0 or start_batch < 0:
        raise ValueError("batch_size must be >= 1, workers and start_batch >= 0")
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    common = dict(batch_size=batch_size, num_workers=workers, collate_fn=collate, pin_memory=pin_memory, drop_last=drop_last)
    if workers > 0:
        common.update(prefetch_factor=2, worker_init_fn=_quiet_when_main_stops)

    if isinstance(dataset, TransformedStream):
        if shuffle or start_batch:
            raise ValueError("a streaming dataset cannot be shuffled or resumed; resolve it without streaming")
        dataset.shard(rank, world_size)
        return Loader(DataLoader(dataset, **common), dataset, None, None, seed, rank)

    if shuffle:
        if len(dataset) < world_size:
            raise DatasetError(f"{len(dataset)} training images cannot be shared among {world_size} processes; use fewer processes or more data")
        sampler = TrainShardSampler(
            len(dataset), seed=seed, rank=rank, world_size=world_size, start_epoch=start_epoch, start_skip=start_batch * batch_size
        )
        generator = torch.Generator()
    else:
        if start_batch:
            raise ValueError("start_batch only applies to shuffled (training) loaders")
        sampler = EvalShardSampler(len(dataset), rank, world_size)
        generator = None
    loader = DataLoader(dataset, sampler=sampler, generator=generator, **common)
    return Loader(loader, dataset, sampler, generator, seed, rank)


def num_batches(size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, drop_last: bool = False) -> int:
    """How many evaluation batches rank ``rank`` gets for a dataset of ``size`` samples."""
    shard = len(range(rank, size, world_size))
    return shard // batch_size if drop_last else math.ceil(shard / batch_size)
