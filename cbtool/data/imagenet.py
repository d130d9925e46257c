"""ImageNet label spaces: synset folder names to the standard 1000-class indices.

The synset list ships with timm (``timm.data.ImageNetInfo``), so this works offline.
A dataset whose classes are all ImageNet-1k synsets is mapped into the model's 1000-class
space; when it has exactly 200 classes (ImageNet-A and ImageNet-R) it keeps its own
200-class labels and carries the ImageNet indices of those classes as a ``class_subset``,
so the evaluator restricts the logits to them, as timm's ``validate.py --valid-labels`` does.
Folders named by class index (ImageNet-V2: ``0`` .. ``999``) map to those indices for a 1000-class
model: folder ``10`` is class 10, whatever its place in the sorted folder list.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

IMAGENET_NUM_CLASSES = 1000
SUBSET_NUM_CLASSES = 200  # ImageNet-A and ImageNet-R label spaces
_SYNSET = re.compile(r"n\d{8}")


def is_synset(name: str) -> bool:
    """True for a WordNet id like ``n01440764``."""
    return _SYNSET.fullmatch(name) is not None


def is_index_folders(classes: list[str]) -> bool:
    """True when every class name is a class index 0..999 written plainly (ImageNet-V2's folders)."""
    return bool(classes) and all(c.isdigit() and str(int(c)) == c and int(c) < IMAGENET_NUM_CLASSES for c in classes)


@functools.lru_cache(maxsize=1)
def _imagenet_info():
    from timm.data import ImageNetInfo

    return ImageNetInfo("imagenet-1k")


@functools.lru_cache(maxsize=1)
def synset_to_index() -> dict[str, int]:
    """ImageNet-1k synset -> standard class index (0..999)."""
    return {synset: i for i, synset in enumerate(_imagenet_info().label_names())}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order (``tench, Tinca tinca``, ...)."""
    return list(_imagenet_info().label_descriptions())


@dataclass(frozen=True)
class LabelSpace:
    """How a dataset's own class order maps to the labels cbtool hands out.

    ``label_map[c]`` is the label of the dataset's class ``c``.
    """

    num_classes: int
    class_names: list[str]
    label_map: list[int]
    class_subset: list[int] | None = None


def label_space(classes: list[str], *, num_model_classes: int | None, purpose: str) -> LabelSpace:
    """Label space for a dataset whose classes (in label order) are ``classes``.

    ImageNet mapping applies when every class is an ImageNet-1k synset and the model has
    1000 classes (or, for evaluation, when the model's class count is not given).
    """
    identity = LabelSpace(len(classes), list(classes), list(range(len(classes))))
    if num_model_classes == IMAGENET_NUM_CLASSES and is_index_folders(classes):
        return LabelSpace(IMAGENET_NUM_CLASSES, imagenet_class_names(), [int(c) for c in classes])
    if not classes or not all(is_synset(c) for c in classes):
        return identity
    wants_imagenet = num_model_classes == IMAGENET_NUM_CLASSES or (num_model_classes is None and purpose == "eval")
    if not wants_imagenet:
        return identity
    index = synset_to_index()
    if not all(c in index for c in classes):
        return identity  # synsets from a larger tree (ImageNet-21k): not the 1k label space
    names = imagenet_class_names()
    indices = [index[c] for c in classes]
    if len(classes) == SUBSET_NUM_CLASSES:
        return LabelSpace(len(classes), [names[i] for i in indices], list(range(len(classes))), indices)
    return LabelSpace(IMAGENET_NUM_CLASSES, names, indices)
