"""Output files: cbtool's own temporary names, atomic replacement, stale temporaries, and outputs vs. inputs.

Every file cbtool writes goes to ``.<name>.cbtool-<host>-<pid>-<random>.tmp`` in the target folder and is
renamed into place. Nothing else creates a second file on the way (safetensors files are streamed by
``write_safetensors`` rather than by the safetensors writer, which makes its own temporary file), so a
process killed mid-write leaves at most that one temporary; the next write to the folder removes the
temporaries of processes on this machine that no longer run.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import sys
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cbtool.errors import OutputError

_SUFFIX = ".tmp"
# The files this process renamed into place, newest last (the CLI clears it per command and names them on Ctrl-C).
written: deque[Path] = deque(maxlen=64)
_TEMPORARY = re.compile(r"^\..+\.cbtool-([0-9a-f]{8})-(\d+)-[0-9a-z]{8}\.tmp$")
# safetensors dtype names of torch dtypes (by their str()).
_SAFETENSORS_DTYPES = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.bool": "BOOL", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
    "torch.uint16": "U16", "torch.uint32": "U32", "torch.uint64": "U64",
}  # fmt: skip


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def temporary_name(path: Path) -> Path:
    """A fresh cbtool temporary name beside ``path``, naming this machine and process."""
    token = "".join(secrets.choice("0123456789abcdefghijklmnopqrstuvwxyz") for _ in range(8))
    return path.parent / f".{path.name}.cbtool-{_host_tag()}-{os.getpid()}-{token}{_SUFFIX}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike[str], *, quiet: bool = False) -> list[Path]:
    """Delete the cbtool temporaries in ``folder`` whose process (on this machine) has ended; returns them."""
    folder, host, removed = Path(folder), _host_tag(), []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match is None or match.group(1) != host or _alive(int(match.group(2))):
            continue
        try:
            os.unlink(folder / name)
            removed.append(folder / name)
        except OSError:
            continue
    if removed and not quiet:
        print(f"note: removed {len(removed)} temporary file(s) in {folder} left by an interrupted cbtool run",
              file=sys.stderr)  # fmt: skip
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a cbtool temporary path beside ``path``; rename it into place only if the block succeeds.

    The result keeps an existing file's permissions, else gets what the umask allows. Stale temporaries
    of earlier, killed runs in the same folder are removed first.
    """
    path = Path(path)
    remove_stale_temporaries(path.parent)
    mode = _file_mode(path)
    temporary = temporary_name(path)
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        written.append(path)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(state: Mapping[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Stream contiguous CPU tensors to ``path`` in the safetensors format (what ``safetensors.torch.load_file`` reads)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(state)
    for name in names:
        tensor = state[name]
        dtype = _SAFETENSORS_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise OutputError(f"cannot save tensor {name!r} of dtype {tensor.dtype} as safetensors")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as the safetensors writer does
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name in names:
            tensor = state[name]
            if tensor.numel():
                handle.write(memoryview(tensor.reshape(-1).view(_byte_dtype()).numpy()))


def _byte_dtype():
    import torch

    return torch.uint8


# --- outputs vs. inputs -------------------------------------------------------------------------


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


def check_writable_folder(folder: str | os.PathLike[str], what: str, hint: str) -> Path:
    """Fail before any work unless files can be created in ``folder`` (or where it will be created)."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {folder} cannot be created: {existing} is a file; {hint}")
    probe = temporary_name(existing / "probe")
    try:  # os.access says yes to root on a read-only file system: try it
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise OutputError(f"cannot write the {what} {folder}: {existing} is not writable ({error.strerror}); {hint}") from None
    return folder


def check_parent_folder(path: Path) -> None:
    """Fail when the folder ``path`` would be written in does not exist (cbtool creates no report folders)."""
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")


def write_text_atomic(path: str | os.PathLike[str], text: str, *, append: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; with ``append``, after the file's current content."""
    path = Path(path)
    check_parent_folder(path)
    if append and path.is_file():
        previous = path.read_text(encoding="utf-8")
        if previous and not previous.endswith("\n"):
            previous += "\n"
        text = previous + text
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically."""
    text = json_text(obj) + "\n"
    return write_text_atomic(path, text)


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """Fail before any work when a report's folder is missing (reports are overwritten; models are not)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    check_parent_folder(path)
    return path


def check_png_name(flag: str, path: str | os.PathLike[str] | None) -> None:
    """cbtool draws PNG only: a picture named .jpg or .svg would hold PNG bytes under a name that says otherwise."""
    if path is not None and Path(path).suffix.lower() != ".png":
        raise OutputError(f"{flag} {path}: cbtool writes PNG pictures; give a name ending in .png")


# --- JSON without NaN ---------------------------------------------------------------------------


def json_text(obj: Any, *, indent: int | None = 2, sort_keys: bool = True, default: Any = None) -> str:
    """``obj`` as strict JSON: a NaN or infinity (which ``json.loads`` elsewhere rejects) is refused, naming where."""
    try:
        return json.dumps(obj, sort_keys=sort_keys, indent=indent, allow_nan=False, default=default)
    except ValueError:
        where = non_finite_paths(obj)
        raise OutputError(f"refusing to write a non-finite number as JSON at {', '.join(where[:5]) or 'a value'}; "
                          "cbtool writes null with a reason where a value does not exist") from None


def non_finite_paths(obj: Any, where: str = "") -> list[str]:
    """The dotted paths of the NaN and infinite floats in ``obj``."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [where or "(top)"]
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [path for key, item in items for path in non_finite_paths(item, f"{where}.{key}" if where else str(key))]


def finite_or_null(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with each non-finite float replaced by null, and ``non_finite`` naming them and their values."""
    bad = {key: repr(value) for key, value in fields.items() if isinstance(value, float) and not math.isfinite(value)}
    if not bad:
        return dict(fields)
    return {**{k: (None if k in bad else v) for k, v in fields.items()}, "non_finite": bad}
