"""Where a model came from, as one record: its source, CB spec, data config and training.

The record travels with the model as attributes (``cbtool_source``, ``cbtool_data_config``,
``cbtool_training``; the spec as ``cbtool_spec``, set by ``surgery.inject``) and through a cbtool file as
string metadata. This module is the only one that knows those names; it imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from cbtool._version import __version__

SOURCE = "cbtool_source"
DATA_CONFIG = "cbtool_data_config"
TRAINING = "cbtool_training"
SPEC = "cbtool_spec"
VERSION = "cbtool_version"
FRESH_HEAD = "cbtool_fresh_head"
# Metadata keys of a cbtool file carry the same names; these hold JSON objects.
JSON_KEYS = (SOURCE, SPEC, DATA_CONFIG, TRAINING)


@dataclass(frozen=True)
class Provenance:
    """The record of one model; any part may be None (a plain model has no spec, a fresh one no training)."""

    source: dict | None
    spec: dict | None
    data_config: dict | None
    training: dict | None

    def to_dict(self) -> dict[str, Any]:
        """The record as a run folder's ``checkpoint.json`` keeps it."""
        return {"source": self.source, "spec": self.spec, "data_config": self.data_config, "training": self.training}


def of(model: Any) -> Provenance:
    """The record attached to ``model``."""
    spec = getattr(model, SPEC, None)
    return Provenance(getattr(model, SOURCE, None), spec.to_dict() if spec is not None else None,
                      getattr(model, DATA_CONFIG, None), getattr(model, TRAINING, None))


def attach(model: Any, *, source: dict | None = None, data_config: dict | None = None,
           training: dict | None = None) -> Any:
    """Set the given parts of ``model``'s record (the others stay); returns ``model``."""
    for name, value in ((SOURCE, source), (DATA_CONFIG, data_config), (TRAINING, training)):
        if value is not None:
            setattr(model, name, value)
    return model


def source_of(model: Any) -> dict | None:
    return getattr(model, SOURCE, None)


def data_config_of(model: Any) -> dict | None:
    return getattr(model, DATA_CONFIG, None)


def training_of(model: Any) -> dict | None:
    return getattr(model, TRAINING, None)


def mark_fresh_head(model: Any, fresh: bool) -> None:
    """Record that ``model``'s head was replaced by an untrained one (eval warns about it)."""
    setattr(model, FRESH_HEAD, bool(fresh))


def has_fresh_head(model: Any) -> bool:
    return bool(getattr(model, FRESH_HEAD, False))


def to_metadata(record: Provenance, training: dict | None = None) -> dict[str, str]:
    """String metadata for a cbtool file: ``format``, the cbtool version, the source, spec and data config of
    ``record``, and ``training`` (what produced these weights, when the caller trained them)."""
    metadata = {"format": "pt", VERSION: __version__, SOURCE: json.dumps(record.source, sort_keys=True)}
    for key, value in ((SPEC, record.spec), (DATA_CONFIG, record.data_config), (TRAINING, training)):
        if value is not None:
            metadata[key] = json.dumps(value, sort_keys=True)
    return metadata
