"""The embedded ``sample`` dataset: 6,000 Fashion-MNIST images (5,000 train, 1,000 test).

Made by ``scripts/make_sample.py``: 500 train and 100 test images per class, picked with a
seeded permutation per class (licence and source: ``cbtool/data/sample/LICENSE``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

SAMPLE_FILE = Path(__file__).with_name("sample") / "fashion_mnist_sample.npz"
SAMPLE_SPLITS = ["train", "test"]
_SOURCE_SPLIT = {"train": "train", "test": "t10k"}  # file names in the Fashion-MNIST release


@functools.lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    with np.load(SAMPLE_FILE, allow_pickle=False) as npz:
        return {key: npz[key] for key in npz.files}


class ArraySource:
    """28x28 grayscale images in a uint8 array, handed out as RGB."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, source_index: np.ndarray, source_split: str):
        self.images, self.labels = images, labels.astype(np.int64)
        self.source_index, self.source_split = source_index, source_split

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int):
        from PIL import Image

        return Image.fromarray(self.images[i]).convert("RGB")

    def sample_id(self, i: int) -> str:
        return f"fashion-mnist/{self.source_split}/{int(self.source_index[i])}"


def read_sample(split: str) -> tuple[ArraySource, list[str]]:
    """The source for ``split`` (``train`` or ``test``) and the ten class names."""
    arrays = _arrays()
    source = ArraySource(arrays[f"{split}_images"], arrays[f"{split}_labels"], arrays[f"{split}_source_index"], _SOURCE_SPLIT[split])
    return source, [str(name) for name in arrays["class_names"]]
