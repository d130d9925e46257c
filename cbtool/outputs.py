"""Outputs against inputs: no output may be one of a command's inputs (by real path or inode), a file an input
folder is read from, a path inside a dataset folder, or another output; pictures are named for what they hold.
Every command asks before any work. No torch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cbtool.errors import OutputError


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name one file: the same real path, or the same inode (hard links, bind mounts)."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): only the real paths could have matched
        return False


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` (real) lies under ``folder`` (real), or is the folder itself."""
    return path == folder or folder in path.parents


def _folders(dataset: str | os.PathLike[str] | Iterable[Any] | None) -> list[tuple[str, Path]]:
    """The dataset arguments that are folders on disk, with their real paths (``sample`` and Hub ids are not)."""
    items = [dataset] if isinstance(dataset, (str, os.PathLike)) else list(dataset or [])
    return [(str(item), Path(str(item)).expanduser().resolve()) for item in items
            if item is not None and Path(str(item)).expanduser().is_dir()]  # fmt: skip


# Files cbtool reads from a model folder (Hugging Face) or a run folder (--resume): an output may not replace one.
_FOLDER_INPUTS = {"config.json", "preprocessor_config.json", "checkpoint.pt", "checkpoint.json", "log.jsonl"}
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}


def _input_of(target: Path, raw: Path, inputs: list[tuple[str, Path]]) -> str | None:
    """The input an output would overwrite: the same file, a model or run folder itself, or a file it reads."""
    for shown, source in inputs:
        if source.is_dir():
            weights = target.suffix in _WEIGHT_SUFFIXES and (source / "config.json").is_file()  # a model folder's
            read = target.parent == source and (target.name in _FOLDER_INPUTS or weights)
            if target == source or (read and target.exists()):
                return f"read from {shown}" if read else shown
        elif target == source or same_file(raw, source):
            return shown
    return None


def check_outputs(outputs: Mapping[str, Any], inputs: Iterable[Any],
                  dataset: str | os.PathLike[str] | Iterable[Any] | None = None) -> None:
    """Refuse, before any work, an output that is an input, lies in a dataset's folder, or is another output.

    ``outputs`` maps an option name (``--json``) to a path or None; ``inputs`` are the paths (or model
    names) the command reads: only those that exist on disk count. Paths are compared by their real path
    and by inode, so a symbolic link, a hard link or ``./`` does not hide an input. The weights, config and
    run files of an input folder (a Hugging Face model folder, a run folder) count as inputs. ``dataset`` is one
    dataset argument or several; those that are folders take no output at all, since any file written there
    would become a sample of it.
    """
    existing = [(str(item), Path(str(item)).expanduser().resolve()) for item in inputs
                if item is not None and Path(str(item)).expanduser().exists()]  # fmt: skip
    folders = _folders(dataset)
    seen: list[tuple[Path, str]] = []
    for flag, path in outputs.items():
        if path is None:
            continue
        raw = Path(path).expanduser()
        target = raw.resolve()
        for name, folder in folders:
            if _inside(target, folder):
                raise OutputError(f"{flag} {path} lies inside the dataset folder {name}; write it somewhere else")
        shown = _input_of(target, raw, existing)
        if shown is not None:
            same = "" if shown == str(path) else f" ({shown})"
            raise OutputError(f"{flag} {path} is an input of this command{same}; write to another file")
        for other, other_flag in seen:
            if target == other or same_file(raw, other):
                raise OutputError(f"{flag} and {other_flag} name the same file {path}; give each its own name")
        seen.append((target, flag))


def check_png_name(flag: str, path: str | os.PathLike[str] | None) -> None:
    """cbtool draws PNG only: a picture named .jpg or .svg would hold PNG bytes under a name that says otherwise."""
    if path is not None and Path(path).suffix.lower() != ".png":
        raise OutputError(f"{flag} {path}: cbtool writes PNG pictures; give a name ending in .png")
