"""The ``cbtool eval --json`` document: every figure plus provenance (layout: docs/results-schema.md)."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Sequence

from cbtool import provenance
from cbtool._version import __version__

SCHEMA_VERSION = 2  # 2 added the per-model ``robustness`` record (cbtool eval --corruptions)
READABLE_SCHEMA_VERSIONS = (1, 2)  # what readers (check, compare, report) accept: 1 is 2 without robustness


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
    from cbtool.surgery import spec_of

    spec = spec_of(model)
    return {
        "label": label,
        "source": provenance.source_of(model),
        "cb_spec": spec.to_dict() if spec is not None else None,
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
