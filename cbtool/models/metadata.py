"""Validation of a cbtool file's metadata when it is read: each parsed field of ``cbtool_source`` and
``cbtool_data_config``, with one line naming the file, the key and the bad value. Metadata is input: a file
whose data config says ``std`` 0 or a crop of 0 would otherwise fail deep inside the preprocessing. No torch.
"""

from __future__ import annotations

import math
from typing import Any

from cbtool.errors import CheckpointError

# timm's interpolation names and crop modes (what timm.data.create_transform takes for evaluation).
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
LIBRARIES = ("timm", "transformers")
_MAX_SIDE = 65536  # pixels: beyond any image a ViT is built for, and beyond what a resize can allocate


def _bad(where: str, key: str, value: Any, wanted: str) -> CheckpointError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:79] + "…"
    return CheckpointError(f"{where}: {key} is {shown}, but {wanted}; the file's metadata is damaged or was edited")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_data_config(config: dict, where: str, key: str = "cbtool_data_config") -> dict:
    """``config`` (a timm-style data config) unchanged, or a ``CheckpointError`` naming the first bad field."""
    if not isinstance(config, dict):
        raise _bad(where, key, config, "it must be a JSON object")
    if "input_size" in config:
        size = config["input_size"]
        if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in size)
                and 1 <= size[0] <= 4 and all(1 <= v <= _MAX_SIDE for v in size[1:])):  # fmt: skip
            raise _bad(where, f"{key}.input_size", size, f"it must be [channels, height, width] of positive whole numbers "
                                                         f"(1 to 4 channels, sides up to {_MAX_SIDE})")
    for name in ("mean", "std"):
        if name in config:
            values = config[name]
            if not (isinstance(values, list) and len(values) == 3 and all(_number(v) for v in values)):
                raise _bad(where, f"{key}.{name}", values, "it must be 3 finite numbers, one per RGB channel")
    if "std" in config and not all(v > 0 for v in config["std"]):
        raise _bad(where, f"{key}.std", config["std"], "every std must be more than 0 (the images are divided by it)")
    crop = config.get("crop_pct")
    if crop is not None and not (_number(crop) and 0 < crop <= 1):
        raise _bad(where, f"{key}.crop_pct", crop, "it must be in (0, 1]")
    interpolation = config.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise _bad(where, f"{key}.interpolation", interpolation, f"it must be one of {', '.join(INTERPOLATIONS)}")
    mode = config.get("crop_mode")
    if mode is not None and mode not in CROP_MODES:
        raise _bad(where, f"{key}.crop_mode", mode, f"it must be one of {', '.join(CROP_MODES)}")
    return config


def check_source(source: dict, where: str, key: str = "cbtool_source") -> dict:
    """``source`` (how to rebuild the architecture) unchanged, or a ``CheckpointError`` naming the first bad field."""
    if not isinstance(source, dict):
        raise _bad(where, key, source, "it must be a JSON object")
    library = source.get("library")
    if library not in LIBRARIES:
        raise _bad(where, f"{key}.library", library, f"it must be one of {', '.join(LIBRARIES)}")
    if library == "timm":
        if not (isinstance(source.get("model_name"), str) and source["model_name"]):
            raise _bad(where, f"{key}.model_name", source.get("model_name"), "it must name a timm model")
        kwargs = source.get("model_kwargs", {})
        if not (isinstance(kwargs, dict) and all(isinstance(name, str) and name.isidentifier() for name in kwargs)):
            raise _bad(where, f"{key}.model_kwargs", kwargs, "it must map argument names to values")
    else:
        if not (isinstance(source.get("architecture"), str) and source["architecture"]):
            raise _bad(where, f"{key}.architecture", source.get("architecture"), "it must name a transformers class")
        config = source.get("config")
        if not (isinstance(config, dict) and isinstance(config.get("model_type"), str)):
            raise _bad(where, f"{key}.config", config, "it must be a transformers config with a model_type")
    for name, kinds, wanted in (("pretrained", (bool,), "true or false"), ("checkpoint", (str, type(None)), "a path or null"),
                                ("origin", (str, type(None)), "a model name or null")):  # fmt: skip
        if name in source and not isinstance(source[name], kinds):
            raise _bad(where, f"{key}.{name}", source[name], f"it must be {wanted}")
    return source
