"""Output files: cbtool's own temporary names, atomic replacement, stale temporaries, write errors and appends.

Every file cbtool writes goes to ``.<name>.cbtool-<host>-<pid>-<random>.tmp`` in the target folder and is
renamed into place. Nothing else creates a second file on the way (safetensors files are streamed by
``write_safetensors`` rather than by the safetensors writer, which makes its own temporary file), so a
process killed mid-write leaves at most that one temporary; the next write to the folder removes the
temporaries of processes on this machine that no longer run.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import socket
import sys
import zlib
from collections import deque
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cbtool.errors import OutputError
from cbtool.outputs import check_outputs, check_png_name, same_file  # noqa: F401  (public names kept here)

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
    try:
        os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except OSError as error:
        raise write_error(path, error) from None
    try:
        yield temporary
        os.chmod(temporary, mode)
        os.replace(temporary, path)
        written.append(path)
    except OSError as error:  # a full disk, a read-only or vanished folder: one line, and the old file stays
        raise write_error(path, error) from None
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


def check_writable_folder(folder: str | os.PathLike[str], what: str, hint: str) -> Path:
    """Fail before any work unless files can be created in ``folder`` (or where it will be created)."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{what} {folder} cannot be created: {existing} is a file; {hint}")
    try:
        _probe(temporary_name(existing / "probe"), f"the {what} {folder}", hint)
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
    if append:
        return append_text(path, text)
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
    check_writable_output(path)
    return path


# --- write errors, pre-flight checks and appends ---------------------------------------------------------------

# Causes a user can act on, by errno; anything else is named by the system's own words.
_NO_SPACE, _ELSEWHERE = "no space left on the device", "write elsewhere"
_WRITE_CAUSES = {
    errno.ENOSPC: f"{_NO_SPACE}; free some space or {_ELSEWHERE}",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "permission denied; write to a folder you own",
    errno.EPERM: "permission denied; write to a folder you own",
    errno.ENOENT: "its folder does not exist (or vanished); create it first",
    errno.ENAMETOOLONG: "the file name is too long",
    errno.EISDIR: "it is a folder; give a file name",
}


def write_error(path: str | os.PathLike[str], error: OSError) -> OutputError:
    """One line for an ``OSError`` raised while writing ``path``: the path and what the user can do about it."""
    cause = _WRITE_CAUSES.get(error.errno) or (error.strerror or str(error) or type(error).__name__).lower()
    return OutputError(f"cannot write {path}: {cause}")


@contextmanager
def writing(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an ``OSError`` inside the block (a write to ``path``) into ``write_error``'s one line."""
    try:
        yield
    except OSError as error:
        raise write_error(path, error) from None


def _has_free_space(folder: Path) -> bool:
    if not hasattr(os, "statvfs"):
        return True
    try:
        stats = os.statvfs(folder)
    except OSError:
        return True  # nothing known: the write itself will tell
    free = stats.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else stats.f_bavail  # root may use the reserve
    return free > 0 or stats.f_blocks == 0  # f_blocks 0: a file system that reports no sizes (procfs, some FUSE)


def _appends_through(path: Path) -> bool:
    """A link or a special file (a step summary's symlink, ``/proc/self/fd/N``, ``/dev/stdout``) is written through."""
    return path.is_symlink() or (path.exists() and not path.is_file() and not path.is_dir())


def check_writable_output(path: str | os.PathLike[str]) -> Path:
    """Fail before any work unless ``path`` can be written: a file can be created in its folder (tried, since
    ``os.access`` says yes to root on a read-only file system) and its device is not full. A link or special
    file must be writable itself: it is appended through, never replaced."""
    path = Path(path).expanduser()
    if _appends_through(path):
        if not os.access(path, os.W_OK):
            raise write_error(path, OSError(errno.EROFS if _read_only(path) else errno.EACCES, ""))
        return path
    try:
        _probe(temporary_name(path), str(path), _ELSEWHERE)
    except OSError as error:
        raise write_error(path, error) from None
    return path


def _probe(probe: Path, target: str, hint: str) -> None:
    """Create and remove the file ``probe`` (tried, since ``os.access`` says yes to root on a read-only file
    system), then check that its device has a free block. A full disk is refused in one wording for every check,
    naming ``target`` and ``hint``; any other failure is the ``OSError`` itself, for the caller to word."""
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as error:
        if error.errno != errno.ENOSPC:  # no inode left is a full disk too
            raise
    else:
        if _has_free_space(probe.parent):
            return
    raise OutputError(f"cannot write {target}: {_NO_SPACE}; free some space or {hint}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path.resolve().parent).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def check_text_file(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of the regular file ``path`` ('' when there is none); a binary file is refused in one line."""
    path = Path(path)
    if not path.is_file():
        return ""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
        bad = data.find(b"\0")  # valid UTF-8, but no text file holds a NUL
    except UnicodeDecodeError as error:
        bad = error.start
    if bad < 0:
        return text
    raise OutputError(f"cannot append to {path}: it is not a UTF-8 text file (byte 0x{data[bad]:02x} at offset {bad}); "
                      "name a new file or a text file")


def append_text(path: str | os.PathLike[str], text: str) -> Path:
    """Append ``text`` to ``path`` as GitHub's ``$GITHUB_STEP_SUMMARY`` is appended to: a new file is written
    atomically, an existing text file is replaced atomically by its text plus ``text`` (starting on a new line), and
    a link or special file (``/proc/self/fd/N``) is opened in append mode through it, so the link stays a link."""
    path = Path(path)
    previous = check_text_file(path)  # through a link too: its target must be text
    if previous and not previous.endswith("\n"):
        text = "\n" + text
    if _appends_through(path):
        with writing(path), open(path, "a", encoding="utf-8") as handle:
            handle.write(text)
        written.append(path)
        return path
    with atomic_path(path) as temporary:
        temporary.write_text(previous + text, encoding="utf-8")
    return path


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
