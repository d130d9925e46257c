"""The data config of a transformers model, timm-style: from its image processor's ``preprocessor_config.json``
(a local folder's or a Hub repo's), or from the model config's defaults where there is none; no torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cbtool.errors import ModelSourceError
from cbtool.models.fit import read_json_object


def image_processor_config(name: str) -> dict | None:
    """The raw ``preprocessor_config.json`` of a local folder or Hub repo, or None when it has none."""
    path = Path(name) / "preprocessor_config.json"
    if path.is_file():
        return read_json_object(path)
    if Path(name).is_dir():
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name, "preprocessor_config.json")).read_text())
    except EntryNotFoundError:
        return None


_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
_HALF = ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
_OPENAI_CLIP = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
_DEFAULT_NORMALIZATION = {"vit": _HALF, "siglip": _HALF, "siglip_vision_model": _HALF, "siglip2": _HALF,
                          "siglip2_vision_model": _HALF, "clip": _OPENAI_CLIP, "clip_vision_model": _OPENAI_CLIP}
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def hf_data_config(config, processor: dict | None, source: str = "the image processor config") -> dict[str, Any]:
    """A timm-style data config from a transformers image-processor config (or the model config's defaults).

    ``source`` names the processor's file in the one-line refusal of a value that cannot be a size."""
    vision = getattr(config, "vision_config", None) or config  # CLIP / SigLIP: the vision tower's settings
    processor = processor or {}
    image_size = int(getattr(vision, "image_size", 224))
    if getattr(vision, "num_patches", None) is not None and not hasattr(vision, "image_size"):
        # SigLIP2 (NaFlex) has no image size: its processor fits each image into max_num_patches patches,
        # so a square image is sqrt(max_num_patches) patches on a side.
        patches = _positive(processor.get("max_num_patches", vision.num_patches), "max_num_patches", source)
        patch = _positive(processor.get("patch_size", vision.patch_size), "patch_size", source)
        if patch != int(vision.patch_size):
            raise ModelSourceError(f"{source} cuts {patch} px patches, and the model takes {vision.patch_size} px "
                                   "patches; fix patch_size there")
        image_size = patch * math.isqrt(patches)
    # The processors' own defaults where a folder has no preprocessor_config.json; ImageNet's otherwise.
    default_mean, default_std = _DEFAULT_NORMALIZATION.get(config.model_type, _IMAGENET)
    mean = processor.get("image_mean", default_mean)
    std = processor.get("image_std", default_std)
    size = processor.get("size") or {"height": image_size, "width": image_size}
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    interpolation = _PIL_RESAMPLE.get(processor.get("resample", 2), "bilinear")
    if crop:
        crop_h, crop_w = _hw(crop)
        resize = size.get("shortest_edge") or _hw(size)[0]
        return {"input_size": [3, crop_h, crop_w], "interpolation": interpolation, "mean": list(mean),
                "std": list(std), "crop_pct": crop_h / resize, "crop_mode": "center"}
    height, width = _hw(size) if ("height" in size or isinstance(size, int)) else (image_size, image_size)
    # Resizing straight to (height, width) is timm's "squash" crop mode with crop_pct 1.
    return {"input_size": [3, height, width], "interpolation": interpolation, "mean": list(mean),
            "std": list(std), "crop_pct": 1.0, "crop_mode": "squash"}


def _positive(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSourceError(f"{source}: {key} must be a positive integer, not {value!r}")
    return value


def _hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    edge = int(size.get("shortest_edge", 224))
    return edge, edge
