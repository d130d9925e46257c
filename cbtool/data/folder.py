"""Local image folders: ``root/<class>/...`` or ``root/<split>/<class>/...``.

A folder whose subfolders include split names (``train``, ``validation``/``val``/``valid``,
``test``) is read as splits; a split folder is never taken for a class. Classes are the
union of the class folders of every split, in timm's natural order (``class2`` before
``class10``, case ignored), so all splits share one label space and label indices equal those
of timm's ``create_dataset`` (and of a model trained with timm's ``train.py``).
Images are found recursively under each class folder, by file extension.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

from cbtool.data.images import open_rgb
from cbtool.data.splits import canonical_split, choose_split
from cbtool.errors import DatasetError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})


class FolderSource:
    """Image files with labels; ``sample_id`` is the path relative to the dataset root."""

    def __init__(self, root: Path, files: list[str], labels: np.ndarray):
        self.root, self.files, self.labels = root, files, labels

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int):
        return open_rgb(os.path.join(self.root, self.files[i]))

    def sample_id(self, i: int) -> str:
        return self.files[i]


def natural_key(name: str) -> list:
    """timm's class order (``timm.utils.misc.natural_key``): digit runs compare as numbers, case ignored."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _subfolders(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def find_splits(root: Path) -> dict[str, str]:
    """Canonical split name -> folder name, or an empty dict for a plain class folder."""
    folders = _subfolders(root)
    splits = {folder: canonical_split(folder) for folder in folders if canonical_split(folder)}
    if not splits:
        return {}
    others = [folder for folder in folders if folder not in splits]
    if others:
        raise DatasetError(
            f"'{root}' mixes split folders ({', '.join(splits)}) with other folders ({', '.join(others[:5])}); "
            "put every class folder inside a split folder, or remove the split folders"
        )
    by_canonical: dict[str, str] = {}
    for folder, canonical in splits.items():
        if canonical in by_canonical:
            raise DatasetError(f"'{root}' has two folders for the {canonical} split ({by_canonical[canonical]}, {folder}); keep one")
        by_canonical[canonical] = folder
    return by_canonical


class _Walk:
    """The image files of one folder's classes, each real file counted once.

    Symbolic links are followed (datasets are often built from links), but a link is skipped, and named,
    when it leads back into a folder already read (a loop such as ``c0/loop -> ..``), into or above another
    class's folder (its images would get this class's label), or to a file already counted.
    """

    def __init__(self, class_dirs: list[Path]):
        self.class_reals = [os.path.realpath(d) for d in class_dirs]
        self.files: set[str] = set()
        self.skipped: list[str] = []

    def images(self, class_dir: Path) -> list[str]:
        own = os.path.realpath(class_dir)
        others = [real for real in self.class_reals if real != own]
        found, visited, stack = [], {own}, [(str(class_dir), own)]
        while stack:
            folder, real_folder = stack.pop()
            entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
            subfolders = []
            for entry in entries:
                link = entry.is_symlink()
                real = os.path.realpath(entry.path) if link else os.path.join(real_folder, entry.name)
                if entry.is_dir():
                    if real in visited or _within(own, real) or any(_crosses(real, other) for other in others):
                        self.skipped.append(entry.path)
                        continue
                    visited.add(real)
                    subfolders.append((entry.path, real))
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:  # a broken one fails to decode, named
                    if real in self.files or any(_within(real, other) for other in others):
                        self.skipped.append(entry.path)
                        continue
                    self.files.add(real)
                    found.append(entry.path)
            stack.extend(reversed(subfolders))  # depth first, in name order: the order os.walk gave
        return found

    def warn(self, root: Path) -> None:
        """Name the skipped entries on stderr, once per job: under torchrun every rank reads the folder, rank 0 tells."""
        from cbtool.distributed import is_main_process

        if self.skipped and is_main_process():
            shown = ", ".join(os.path.relpath(path, root) for path in self.skipped[:4])
            more = f" and {len(self.skipped) - 4} more" if len(self.skipped) > 4 else ""
            print(f"warning: '{root}': skipped {len(self.skipped)} link(s) or file(s) that loop, repeat a file already "
                  f"counted, or lead into another class: {shown}{more}", file=sys.stderr)  # fmt: skip


def _within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _crosses(real: str, other: str) -> bool:
    """Whether a folder at ``real`` is, lies in, or holds the class folder ``other``."""
    return _within(real, other) or _within(other, real)


def read_folder(root: Path, split: str | None, *, purpose: str):
    """``(source, classes, split, available_splits)`` for an image folder.

    ``classes`` are the class folder names in natural order (the source's labels index them).
    """
    splits = find_splits(root)
    if splits:
        chosen = choose_split(list(splits), split, purpose=purpose, where=f"'{root}'")
        class_root = root / splits[chosen]
        classes = sorted({name for folder in splits.values() for name in _subfolders(root / folder)}, key=natural_key)
    else:
        if split is not None:
            raise DatasetError(f"'{root}' has no split folders (train, validation, test); leave out --split to use all of it")
        chosen, class_root = None, root
        classes = sorted(_subfolders(root), key=natural_key)
    if not classes:
        raise DatasetError(f"'{class_root}' has no class folders; expected one subfolder of images per class")
    files: list[str] = []
    labels: list[int] = []
    walk = _Walk([class_root / name for name in classes if (class_root / name).is_dir()])
    for label, name in enumerate(classes):
        class_dir = class_root / name
        if not class_dir.is_dir():
            continue  # a class that only other splits have
        for path in walk.images(class_dir):
            files.append(Path(os.path.relpath(path, root)).as_posix())
            labels.append(label)
    walk.warn(root)
    if not files:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"no images under '{class_root}' (looked for {extensions}); check the path")
    source = FolderSource(root, files, np.asarray(labels, dtype=np.int64))
    return source, classes, chosen, sorted(splits)
