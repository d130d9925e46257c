"""Attention maps and pictures: the model's own probabilities, heatmaps and rollout.

``maps`` (torch) reads the maps; ``views`` and ``rollout`` turn them into per-image heatmaps; ``pictures``
draws them with matplotlib (imported lazily). The report page moved to ``cbtool.report.page``
(``report_page`` stays importable from here). Importing this package imports none of them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "attention_maps": "cbtool.viz.maps",
    "attention_rollout": "cbtool.viz.rollout",
    "attention_figure": "cbtool.viz.figure",
    "overlay": "cbtool.viz.pictures",
    "report_page": "cbtool.report.page",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cbtool.viz' has no attribute {name!r}")
