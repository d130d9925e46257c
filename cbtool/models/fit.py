"""Whether a model fits what it is given: the options that build it, its input size, and a weights file
(readable plain tensors of the right shapes), with messages that name the option that would make it fit.

Input sizes and classifier names come from the model's family adapter; models of other classes are not
size-checked here (the commands refuse them).
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from cbtool.errors import ModelSourceError, first_line


def check_option_conflicts(img_size: int | None, num_classes: int | None, model_kwargs: dict[str, Any]) -> None:
    """An option given twice (``--img-size`` and ``--model-kwargs img_size=``) must not say two things."""
    for flag, value, key in (("--img-size", img_size, "img_size"), ("--num-classes", num_classes, "num_classes")):
        if value is not None and key in model_kwargs and model_kwargs[key] != value:
            raise ModelSourceError(f"{flag} {value} and --model-kwargs {key}={model_kwargs[key]} disagree; give one of them")


def has_trained_weights(model: Any) -> bool:
    """Whether ``model``'s weights were trained (pretrained, a checkpoint, a cbtool fine-tune), as its record says."""
    from cbtool.models import provenance

    record = provenance.source_of(model) or {}
    return bool(record.get("pretrained") or record.get("checkpoint") or provenance.training_of(model))


def is_head_key(model: Any, key: str) -> bool:
    """Whether ``key`` belongs to the classifier, as the model's family adapter names it."""
    return any(key.startswith(prefix + ".") for prefix in _family_answer(model, "head_prefixes", ["head"]))


def input_geometry(model: Any) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """``(fixed input size or None, patch size or None)``, as the family adapter says; (None, None) for others."""
    return _family_answer(model, "input_geometry", (None, None))


def _family_answer(model: Any, question: str, default: Any) -> Any:
    from cbtool.errors import UnsupportedModelError
    from cbtool.families import detect

    try:
        family = detect(model)
    except UnsupportedModelError:  # refused later, where the command needs a family
        return default
    return getattr(family, question)(model)


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _px(size: tuple[int, int]) -> str:
    return str(size[0]) if size[0] == size[1] else f"{size[0]}x{size[1]}"


def check_input_size(model: Any, size: int | Sequence[int], name: str, *, option: str = "--img-size") -> None:
    """Raise ``ModelSourceError`` unless ``model`` (called ``name``) takes ``size`` px inputs."""
    size = _pair(size[-2:] if not isinstance(size, int) else size)
    fixed, patch = input_geometry(model)
    if fixed is not None and size != fixed:
        fix = (f"leave {option} out, or build a model of that size from its timm name with --img-size {_px(size)} "
               "(then finetune it)") if option.startswith("--") else f"pass --img-size {_px(fixed)}"  # fmt: skip
        raise ModelSourceError(f"{name} takes {_px(fixed)} px inputs, not {_px(size)} ({option}); {fix}")
    if patch is not None and (size[0] % patch[0] or size[1] % patch[1] or min(size) < min(patch)):
        lower = max(size[0] // patch[0], 1) * patch[0]
        raise ModelSourceError(
            f"{option} {_px(size)} is not a multiple of {name}'s patch size {_px(patch)}; "
            f"use {lower} or {lower + patch[0]}"
        )


def mismatch_message(model: Any, file: str, mismatched: Sequence[tuple[str, tuple, tuple]],
                     missing: Sequence[str], unexpected: Sequence[str]) -> str:
    """Say which tensors differ (shape in the file against shape in the model) and which option would match."""
    parts = [f"{key} is {_shape(theirs)} in the file but {_shape(ours)} in the model" for key, theirs, ours in mismatched[:3]]
    if len(mismatched) > 3:
        parts.append(f"{len(mismatched) - 3} more tensors differ in shape")
    for label, keys in (("missing from the file", missing), ("not in the model", unexpected)):
        if keys:
            parts.append(f"{len(keys)} tensors {label} (e.g. {keys[0]})")
    hints = _hints(model, {key: theirs for key, theirs, _ in mismatched})
    advice = f"build the model to match with {' '.join(hints)}" if hints else (
        "check the model name and --model-kwargs (or --num-classes for another head)")
    return f"{file} does not fit {type(model).__name__}: {'; '.join(parts)}; {advice}"


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _hints(model: Any, theirs: dict[str, Sequence[int]]) -> list[str]:
    """The options that would build the file's shapes, where the patch embedding and position embedding say them."""
    _, patch = input_geometry(model)
    kwargs, size = [], None
    proj = next((shape for key, shape in theirs.items() if key.endswith("patch_embed.proj.weight") and len(shape) == 4), None)
    pos = next((shape for key, shape in theirs.items() if key.endswith("pos_embed") and len(shape) == 3), None)
    dim = (proj[0] if proj else pos[-1] if pos else None)
    if dim is not None and dim != _dim(model):
        kwargs.append(f"embed_dim={dim}")
    if proj is not None:
        patch = (int(proj[-2]), int(proj[-1]))
        kwargs.append(f"patch_size={proj[-1]}")
    if pos is not None and patch is not None:
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
        grid = math.isqrt(max(pos[1] - prefix, 0))
        if grid and grid * grid == pos[1] - prefix:
            size = grid * patch[0]
    return ([f"--model-kwargs {' '.join(kwargs)}"] if kwargs else []) + ([f"--img-size {size}"] if size else [])


def _dim(model: Any) -> int | None:
    return getattr(model, "embed_dim", None)


def unreadable_message(path: Path, error: BaseException) -> str:
    """Why a weights file cannot be read; a pickle of Python objects is refused without advice to unpickle it."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused or "Weights only load failed" in str(error):
        needs = f" (it needs {refused.group(1)})" if refused else ""
        return (f"{path} holds Python objects besides tensors{needs}; cbtool reads plain tensors only and never "
                "runs pickled code; if you trust the file, save its state_dict with "
                "safetensors.torch.save_file(state_dict, 'weights.safetensors') where it was made, and pass that file")
    if path.stat().st_size == 0:
        return f"cannot read checkpoint {path}: the file is empty"
    return f"cannot read checkpoint {path} (truncated, or not a safetensors or PyTorch weights file): {first_line(error)}"


def wrong_kwarg_types(name: str, kwargs: dict[str, Any]) -> str | None:
    """Which ``--model-kwargs`` value has a type the timm architecture does not take (text or a fraction where its
    classes' defaults are whole numbers), said in one clause; None when none is clearly wrong. Only asked after
    the build failed, so that the message names the argument rather than the line of timm it broke."""
    import inspect

    import timm
    from torch import nn

    try:
        module = inspect.getmodule(timm.models.model_entrypoint(name.split(".", 1)[0]))
    except Exception:  # an hf-hub: name or an unknown one: nothing to compare with
        return None
    defaults: dict[str, set[type]] = {}
    for cls in vars(module).values():
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == module.__name__:
            for parameter in inspect.signature(cls.__init__).parameters.values():
                if parameter.default is not inspect.Parameter.empty and parameter.default is not None:
                    defaults.setdefault(parameter.name, set()).add(type(parameter.default))
    for key, value in kwargs.items():
        kinds = defaults.get(key, set())
        if not kinds or type(value) in kinds or (isinstance(value, int) and float in kinds) or isinstance(value, bool):
            continue
        if kinds <= {int, float} or (isinstance(value, str) and kinds <= {int, float, tuple, list}):
            wanted = " or ".join(sorted({_KINDS.get(kind, kind.__name__) for kind in kinds}))
            return f"--model-kwargs {key}={value}: {key} takes {wanted}, not {value!r}"
    return None


_KINDS = {int: "a whole number", float: "a number", tuple: "a tuple", list: "a list"}


def name_list(names: Sequence[str], limit: int = 4) -> str:
    """``a, b, c and 7 more``: a list of tensor names short enough for one line."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite_weights(state: Any, where: str) -> None:
    """Refuse weights holding NaN or infinity (a damaged file): every result computed from them would be noise."""
    import torch

    bad = [name for name, tensor in state.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]  # fmt: skip
    if bad:
        raise ModelSourceError(f"{where} has non-finite weights (NaN or infinity) in {len(bad)} tensor(s): "
                               f"{name_list(bad)}; the file is damaged")  # fmt: skip


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a Hugging Face config); anything else is one line naming the
    file and, for malformed JSON, the line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ModelSourceError(f"{path} is not a text file (byte {error.start} is not UTF-8); expected a JSON config") from None
    except OSError as error:
        raise ModelSourceError(f"cannot read {path}: {error.strerror}") from None
    if not text.strip():
        raise ModelSourceError(f"{path} is empty; expected a JSON config")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ModelSourceError(f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"{path} holds a JSON {type(value).__name__}, not an object; expected a JSON config")
    return value


def check_strict_load(model: Any, loading: dict, name: str, *, new_head: bool) -> None:
    """The folder's weights fill the model exactly, as ``load_state_dict(strict=True)`` would; only ``--num-classes``
    may leave the classifier new (transformers itself only logs what it skipped or left random)."""
    missing = [k for k in loading.get("missing_keys") or [] if not (new_head and is_head_key(model, k))]
    unexpected = list(loading.get("unexpected_keys") or [])
    mismatched = [k for k, *_ in loading.get("mismatched_keys") or [] if not (new_head and is_head_key(model, k))]
    for keys, what in ((missing, "missing from the weights (they would stay random)"),
                       (unexpected, "in the weights but not in the model its config.json describes"),
                       (mismatched, "of another shape in the weights")):  # fmt: skip
        if keys:
            head = " (give --num-classes N for a new head)" if all(is_head_key(model, k) for k in keys) else ""
            raise ModelSourceError(f"{name}: {len(keys)} tensor(s) {what}: {name_list(sorted(keys))}{head}")


@contextmanager
def quiet_loading_report(*, bars: bool) -> Iterator[None]:
    """Hold back transformers' multi-line MISSING/UNEXPECTED report while a model loads (and, unless ``bars``, its
    progress bars: a local folder loads in a moment, and a refusal stays one line)."""
    import logging

    from transformers.utils import logging as hf_logging

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    # A filter, not a level: transformers reads this logger's level to decide whether to run other checks.
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(errors_only)
    shown = hf_logging.is_progress_bar_enabled()
    if shown and not bars:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(errors_only)
        if shown and not bars:
            hf_logging.enable_progress_bar()
