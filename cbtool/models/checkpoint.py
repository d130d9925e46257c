"""cbtool files: one safetensors file holding every weight plus string metadata that rebuilds the model.

Metadata keys (all strings): ``format`` (``pt``), ``cbtool_version``, ``cbtool_source`` (JSON: how to rebuild
the architecture offline), ``cbtool_spec`` (JSON CBSpec; absent for a plain model), ``cbtool_data_config``
(JSON: input size, mean, std, interpolation, crop), and optionally ``cbtool_training`` (JSON summary).
The header is read without torch, so ``cbtool info`` stays fast.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from cbtool.models import provenance
from cbtool.errors import CheckpointError, OutputError, SpecError, first_line
from cbtool.models.metadata import check_data_config, check_source
from cbtool.files import atomic_path, check_writable_output, write_safetensors  # noqa: F401  (atomic_path: public name kept here)
from cbtool.spec import CBSpec, scale_stats

SOURCE_KEY = provenance.SOURCE
SPEC_KEY = provenance.SPEC
DATA_CONFIG_KEY = provenance.DATA_CONFIG
TRAINING_KEY = provenance.TRAINING
VERSION_KEY = provenance.VERSION
_JSON_KEYS = provenance.JSON_KEYS
_MAX_HEADER = 100 * 1024 * 1024


# --- output paths -------------------------------------------------------------------------------


def check_output_path(path: str | Path, *, force: bool = False) -> Path:
    """Validate an output path before any work: its folder exists and it is new (or ``force``)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name such as {path / 'model.safetensors'}")
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")
    if path.suffix != ".safetensors":  # a .pth name would promise a pickle, and readers would treat it as one
        raise OutputError(f"output {path}: cbtool writes safetensors files; name it "
                          f"{path.with_suffix('.safetensors').name if path.suffix else path.name + '.safetensors'}")  # fmt: skip
    if path.exists() and not force:
        raise OutputError(f"{path} already exists; pass --force to overwrite it")
    return check_writable_output(path)


# --- header, without torch ----------------------------------------------------------------------


def read_header(path: str | Path) -> tuple[dict[str, str], dict[str, dict]]:
    """(metadata, tensor entries) of a safetensors file, validated against the file's size."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path} is not a safetensors file, or it is truncated (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file, or it is corrupt (unreadable header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise CheckpointError(f"{path} has a malformed safetensors header (metadata must map strings to strings)")
    data_size = size - 8 - length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise CheckpointError(f"{path} has a malformed safetensors header (entry {name!r})")
        if offsets[1] > data_size:
            raise CheckpointError(f"{path} is truncated or corrupt (tensor {name!r} lies beyond the end of the file)")
    return metadata, header


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, int) and item >= 0 for item in value)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The cbtool metadata of ``path`` with JSON values decoded; a plain safetensors file is an error."""
    raw, _ = read_header(path)
    if SOURCE_KEY not in raw:
        raise CheckpointError(
            f"{path} is a plain safetensors file without cbtool metadata; "
            "load it into a timm model with: --checkpoint " + str(path)
        )
    decoded: dict[str, Any] = {VERSION_KEY: raw.get(VERSION_KEY)}
    for key in _JSON_KEYS:
        if key in raw:
            try:
                decoded[key] = json.loads(raw[key])
            except json.JSONDecodeError:
                raise CheckpointError(f"{path} has garbled cbtool metadata ({key} is not valid JSON)") from None
            if not isinstance(decoded[key], dict):
                raise CheckpointError(f"{path} has garbled cbtool metadata ({key} is not a JSON object)")
    if "library" not in decoded[SOURCE_KEY]:
        raise CheckpointError(f"{path} has garbled cbtool metadata ({SOURCE_KEY} lacks the model library)")
    if SPEC_KEY in decoded:
        try:  # normalised, so that readers can rely on every field
            decoded[SPEC_KEY] = CBSpec.from_dict(decoded[SPEC_KEY]).to_dict()
        except SpecError as error:
            raise CheckpointError(f"{path} has garbled cbtool metadata ({SPEC_KEY}: {error})") from None
    check_source(decoded[SOURCE_KEY], str(path))  # every parsed field, before anything is built from it
    if DATA_CONFIG_KEY in decoded:
        check_data_config(decoded[DATA_CONFIG_KEY], str(path))
    return decoded


def has_cb_scales(path: str | Path) -> bool:
    """Whether the safetensors file at ``path`` holds learned cbs scales (from its header; no torch)."""
    _, tensors = read_header(path)
    return any(key.endswith("cb.scale") for key in tensors)


def describe(path: str | Path) -> dict[str, Any]:
    """What ``cbtool info`` shows: source, spec, parameters and data config, from the header alone."""
    raw, tensors = read_header(path)
    parameters = 0
    for entry in tensors.values():
        count = 1
        for dim in entry.get("shape", []):
            count *= int(dim)
        parameters += count
    info: dict[str, Any] = {"file": str(path), "tensors": len(tensors), "parameters": parameters}
    if SOURCE_KEY not in raw:
        info["cbtool"] = False
        info["metadata"] = raw
        return info
    metadata = read_metadata(path)
    info.update(
        cbtool=True,
        cbtool_version=metadata.get(VERSION_KEY),
        source=metadata[SOURCE_KEY],
        cb_spec=metadata.get(SPEC_KEY),
        cb_parameters=sum(
            int(entry["shape"][0]) for name, entry in tensors.items() if name.endswith(".cb.scale")
        ),
        data_config=metadata.get(DATA_CONFIG_KEY),
        training=metadata.get(TRAINING_KEY),
        cb_scales=_scale_stats(path, tensors),
    )
    return info


def _scale_stats(path: str | Path, tensors: dict[str, dict]) -> list[dict] | None:
    """Mean, min and max of each ``.cb.scale`` vector, read from the file without torch."""
    from safetensors import safe_open

    names = [name for name in tensors if name.endswith(".cb.scale")]
    if not names:
        return None
    rows = []
    with safe_open(str(path), framework="numpy") as handle:
        for name in names:
            try:
                values = handle.get_tensor(name).astype("float64").tolist()
            except (TypeError, ValueError):  # bfloat16 has no numpy dtype
                values = _bf16_values(path, tensors[name])
            rows.append(scale_stats(name[: -len(".scale")], values))
    return rows


def _bf16_values(path: str | Path, entry: dict) -> list[float]:
    import numpy as np

    with open(path, "rb") as handle:
        header_size = struct.unpack("<Q", handle.read(8))[0]
        start, end = entry["data_offsets"]
        handle.seek(8 + header_size + start)
        raw = np.frombuffer(handle.read(end - start), dtype="<u2").astype("<u4") << 16
    return raw.view("<f4").astype("float64").tolist()


# --- save and load ------------------------------------------------------------------------------


def save(model, path: str | Path, *, force: bool = False, training: dict | None = None) -> Path:
    """Write ``model`` (built by cbtool, with or without CB) to ``path`` atomically, with its metadata."""
    model = unwrap(model)
    record = provenance.of(model)
    if record.source is None:
        raise CheckpointError(
            "this model has no cbtool source record; build it with cbtool.models.resolve.resolve() or cbtool.load()"
        )
    path = check_output_path(path, force=force)
    metadata = provenance.to_metadata(record, training)
    with atomic_path(path) as temporary:
        write_safetensors(_plain_state_dict(model), temporary, metadata=metadata)
    return path


def load(path: str | Path, device: str = "cpu"):
    """Rebuild architecture, CB and weights from a cbtool file alone (offline); returns the model in eval mode."""
    from safetensors.torch import load_file

    from cbtool.models.architectures import rebuild
    from cbtool.models.fit import check_finite_weights
    from cbtool.surgery import inject, legacy_scale_keys

    metadata = read_metadata(path)
    model = rebuild(metadata[SOURCE_KEY])
    if metadata.get(SPEC_KEY) is not None:
        inject(model, CBSpec.from_dict(metadata[SPEC_KEY]))
    try:
        state = load_file(str(path), device=device)
    except Exception as error:
        raise CheckpointError(f"cannot read the weights in {path}: {first_line(error)}") from None
    check_finite_weights(state, str(path))
    if metadata.get(SPEC_KEY) is not None:
        for old, new in legacy_scale_keys(model).items():  # files written by cbtool 0.1.0
            if old in state and new not in state:
                state[new] = state.pop(old)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not match the recorded architecture ({str(error).splitlines()[-1].strip()[:200]})") from None
    if result.missing_keys or result.unexpected_keys:
        keys = result.missing_keys or result.unexpected_keys
        kind = "missing" if result.missing_keys else "unexpected"
        raise CheckpointError(f"{path}: weights do not match the recorded architecture ({len(keys)} {kind}, e.g. {keys[0]})")
    provenance.attach(model, data_config=metadata.get(DATA_CONFIG_KEY))
    setattr(model, provenance.TRAINING, metadata.get(TRAINING_KEY))  # None for a file never fine-tuned
    return model.to(device).eval()


def unwrap(model):
    """The plain module inside DDP and ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def _plain_state_dict(model) -> dict:
    """A contiguous CPU state dict; tensors that share storage are copied so safetensors accepts them."""
    seen: set[int] = set()
    state = {}
    for key, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        identity = tensor.untyped_storage().data_ptr()
        if identity in seen:
            tensor = tensor.clone()
        seen.add(identity)
        state[key] = tensor
    return state
