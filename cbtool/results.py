"""The ``cbtool eval --json`` document: every figure plus provenance (layout: docs/results-schema.md).

Writing it (:func:`results_document`) and reading it back (:func:`load_results`, :func:`validate_results`)
live here, with the one :data:`SCHEMA_VERSION` of every JSON document cbtool writes. No torch.
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from cbtool import provenance
from cbtool._version import __version__
from cbtool.errors import CbtoolError

# The layout version of every JSON document cbtool writes: eval results, check verdicts, compare and bench records.
# 2 added the per-model ``robustness`` record (cbtool eval --corruptions); readers accept 1, which is 2 without it.
# 3 changed that record: CE and mCE only where AlexNet's ImageNet-1k errors apply, the mean corruption error in
# points, the corruptions each average is over, ``jpeg_quality``; readers upgrade a version 2 record on reading.
SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (1, 2, 3)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in ("torch", "timm", "transformers", "torchvision"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_record(device: str, *, world_size: int, batch_size: int, amp: bool, channels_last: bool,
                       compile: bool) -> dict[str, Any]:
    return {
        "device": device,
        "world_size": world_size,
        "batch_size": batch_size,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
        **package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def model_record(label: str, model, result) -> dict[str, Any]:
    """One entry of ``models``: provenance of ``model`` and the metrics ``evaluate`` found."""
    from cbtool.surgery import scale_summary, spec_of

    spec = spec_of(model)
    return {
        "label": label,
        "source": provenance.source_of(model),
        "cb_spec": spec.to_dict() if spec is not None else None,
        "cb_scales": scale_summary(model),
        "metrics": result.metrics,
        "density": result.density,
    }


def results_document(*, dataset: dict, preprocessing: dict, environment: dict, models: Sequence[dict],
                     class_names: Sequence[str] | None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "cbtool_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset,
        "preprocessing": preprocessing,
        "environment": environment,
        "models": list(models),
        "class_names": list(class_names) if class_names is not None else None,
    }


def validate_results(results: Any, name: str = "results") -> dict[str, Any]:
    """Check that ``results`` has the shape of docs/results-schema.md; raise :class:`CbtoolError` naming the flaw."""
    if not isinstance(results, dict):
        raise CbtoolError(f"{name} is not a cbtool results file: expected a JSON object, got {type(results).__name__}")
    version = results.get("schema_version")
    if version is None:
        raise CbtoolError(f"{name} is not a cbtool results file: no schema_version (write one with cbtool eval --json)")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise CbtoolError(
            f"{name} has schema_version {version!r}, this cbtool reads {' and '.join(map(str, READABLE_SCHEMA_VERSIONS))}; "
            "use the cbtool version that wrote it, or re-run cbtool eval"
        )
    if not isinstance(results.get("dataset"), dict):
        raise CbtoolError(f"{name} is not a cbtool results file: 'dataset' is missing or not an object")
    models = results.get("models")
    if not isinstance(models, list) or not models:
        raise CbtoolError(f"{name} is not a cbtool results file: 'models' is missing or empty")
    for index, model in enumerate(models):
        if not isinstance(model, dict) or not isinstance(model.get("metrics"), dict) or "label" not in model:
            raise CbtoolError(f"{name}: models[{index}] needs a 'label' and a 'metrics' object")
        correct = model["metrics"].get("correct")
        if correct is not None and (not isinstance(correct, str) or correct.strip("01")):
            raise CbtoolError(f"{name}: models[{index}].metrics.correct must be a string of 0s and 1s")
        # Accuracies are counts over samples: NaN means a broken file. (A NaN loss is a broken model: a regression.)
        for key in ("top1", "top5"):
            value = model["metrics"].get(key)
            if value is not None and not is_number(value):
                raise CbtoolError(f"{name}: models[{index}].metrics.{key} is {value!r}, not a finite number; "
                                  "re-run cbtool eval to get usable results")  # fmt: skip
    if version < 3:
        _upgrade_robustness(results)
    return results


def _upgrade_robustness(results: dict[str, Any]) -> None:
    """Version 2 robustness records in today's layout (``robustness.record.upgrade_record``), in place."""
    from cbtool.robustness.record import upgrade_record

    for model in results["models"]:
        if isinstance(model.get("robustness"), dict):
            model["robustness"] = upgrade_record(model["robustness"], results.get("dataset"))


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a results file written by ``cbtool eval --json``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CbtoolError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CbtoolError(f"{path} is a folder, not a results file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CbtoolError(f"cannot read {path}: {error}") from None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno}, column {error.colno}"
        raise CbtoolError(f"{path} is not valid JSON ({where}: {error.msg})") from None
    return validate_results(results, str(path))


def dataset_mismatches(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Reasons why two results' ``dataset`` records may not describe the same samples (empty when they do)."""
    reasons = []
    same_samples = a.get("samples_sha256") is not None and a.get("samples_sha256") == b.get("samples_sha256")
    # The same samples spelled by another path (./val vs /ci/val) are still the same dataset.
    keys = ("split", "num_samples") if same_samples else ("name", "split", "num_samples", "samples_sha256")
    for key in keys:
        x, y = a.get(key), b.get(key)
        if x != y:
            if key == "samples_sha256":
                x, y = (v[:12] + "…" if isinstance(v, str) and len(v) > 12 else v for v in (x, y))
            reasons.append(f"{key} {x!r} vs {y!r}" if key != "num_samples" else f"{key} {x} vs {y}")
    return reasons


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a usable metric value is."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
