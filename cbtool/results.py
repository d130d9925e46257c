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

from cbtool.models import provenance
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

    from cbtool.files import non_finite_paths

    bad = non_finite_paths({"metrics": result.metrics, "density": result.density})
    if bad:  # a '-' or a bare NaN would read as "not measured"; the model's outputs overflowed
        raise CbtoolError(f"model {label} gave non-finite values ({', '.join(bad[:5])}): its outputs overflow or are "
                          "NaN; check its weights, or evaluate without --amp")  # fmt: skip
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
    num_samples = results["dataset"].get("num_samples")
    if not _is_count(num_samples):
        raise CbtoolError(f"{name}: dataset.num_samples is {num_samples!r}, not a count of samples above 0")
    for index, model in enumerate(models):
        if not isinstance(model, dict) or not isinstance(model.get("metrics"), dict) or "label" not in model:
            raise CbtoolError(f"{name}: models[{index}] needs a 'label' and a 'metrics' object")
        _check_finite(model, f"{name}: models[{index}]")
        _check_metrics(model["metrics"], f"{name}: models[{index}].metrics", num_samples)
        _check_robustness(model.get("robustness"), f"{name}: models[{index}].robustness", num_samples)
    if version < 3:
        _upgrade_robustness(results)
    return results


def _check_finite(value: Any, where: str) -> None:
    """No NaN or infinity anywhere in a model's record: cbtool never writes one, so it is a broken file."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CbtoolError(f"{where} is {value!r}, not a finite number; re-run cbtool eval to get usable results")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_finite(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")


def _check_metrics(metrics: dict[str, Any], where: str, num_samples: int) -> None:
    """The metrics of one model agree with themselves: counts, ranges, and top-1 against ``correct``."""
    if metrics.get("num_samples", num_samples) != num_samples:
        raise CbtoolError(f"{where}.num_samples is {metrics['num_samples']!r} but dataset.num_samples is {num_samples}")
    if "top1" not in metrics:
        raise CbtoolError(f"{where} has no top1, which every results file has; re-run cbtool eval")
    for key in ("top1", "top5"):
        value = metrics.get(key)
        if (key == "top1" or value is not None) and not (is_number(value) and 0 <= value <= 100):
            raise CbtoolError(f"{where}.{key} is {value!r}, not a percentage from 0 to 100")
    if metrics.get("top5") is not None and metrics["top5"] < metrics["top1"] - _SLACK:
        raise CbtoolError(f"{where}: top5 {metrics['top5']} is below top1 {metrics['top1']}, which it includes")
    loss = metrics.get("loss")
    if loss is not None and not (is_number(loss) and loss >= 0):
        raise CbtoolError(f"{where}.loss is {loss!r}, not a cross-entropy (0 or more)")
    for key, value in (metrics.get("per_class_top1") or {}).items():
        if not (is_number(value) and 0 <= value <= 100):
            raise CbtoolError(f"{where}.per_class_top1.{key} is {value!r}, not a percentage from 0 to 100")
    correct = metrics.get("correct")
    if correct is None or correct == "":
        return
    if not isinstance(correct, str) or correct.strip("01"):
        raise CbtoolError(f"{where}.correct must be a string of 0s and 1s")
    if len(correct) != num_samples:
        raise CbtoolError(f"{where}.correct has {len(correct)} samples but num_samples is {num_samples}")
    share = 100.0 * correct.count("1") / num_samples
    if abs(share - metrics["top1"]) > _SLACK:
        raise CbtoolError(f"{where}: top1 is {metrics['top1']} but correct says {share:.4g} "
                          f"({correct.count('1')} of {num_samples}); the file was edited or is broken")  # fmt: skip


def _check_robustness(record: Any, where: str, num_samples: int) -> None:
    """Corruption errors are percentages, and each cell's correctness covers every sample."""
    if not isinstance(record, dict):
        return
    for corruption, cells in (record.get("error") or {}).items():
        for severity, value in (cells or {}).items():
            if not (is_number(value) and 0 <= value <= 100):
                raise CbtoolError(f"{where}.error.{corruption}.{severity} is {value!r}, not a percentage from 0 to 100")
    for corruption, cells in (record.get("correct") or {}).items():
        for severity, correct in (cells or {}).items():
            if isinstance(correct, str) and len(correct) != num_samples:
                raise CbtoolError(f"{where}.correct.{corruption}.{severity} has {len(correct)} samples but "
                                  f"num_samples is {num_samples}")  # fmt: skip


# Rounding room when two percentages of the same counts are compared (JSON keeps floats exactly; sums may not).
_SLACK = 1e-6


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
