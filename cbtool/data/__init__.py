"""Datasets for evaluation and fine-tuning: find, label, preprocess and batch images.

``resolve_dataset`` accepts ``sample``, ``imagenet-1k``, a local image folder, a
``save_to_disk`` folder, or a Hub dataset id. Importing this package does not import torch,
timm or datasets; ``build_loader`` (torch) is loaded on first use.
"""

from __future__ import annotations

from cbtool.data.dataset import ResolvedDataset, limit_positions, split_validation
from cbtool.data.resolve import check_num_classes, resolve_dataset
from cbtool.data.transforms import build_transform, resolve_preprocessing

__all__ = [
    "ResolvedDataset",
    "build_loader",
    "build_transform",
    "check_num_classes",
    "limit_positions",
    "resolve_dataset",
    "resolve_preprocessing",
    "split_validation",
]


def __getattr__(name: str):
    # The loader needs torch: import it on first use so that `import cbtool.data` stays light.
    if name in ("build_loader", "loader"):
        import importlib

        loader = importlib.import_module("cbtool.data.loader")
        return loader if name == "loader" else loader.build_loader
    raise AttributeError(f"module 'cbtool.data' has no attribute {name!r}")
