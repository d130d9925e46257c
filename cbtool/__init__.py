"""cbtool: Context Broadcasting (uniform attention) for Vision Transformers.

The public API is imported lazily so that ``import cbtool`` (and ``cbtool --help``) stays fast:
``inject``, ``remove``, ``load``, ``save``, ``evaluate``, ``evaluate_dataset``, ``finetune``, ``attention_maps``,
``compare``, ``CBSpec``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from cbtool._version import __version__

_LAZY = {
    "CBSpec": "cbtool.spec",
    "inject": "cbtool.surgery",
    "remove": "cbtool.surgery",
    "load": "cbtool.models.checkpoint",
    "save": "cbtool.models.checkpoint",
    "evaluate": "cbtool.evaluation",
    "evaluate_dataset": "cbtool.pipeline",
    "finetune": "cbtool.train",
    "attention_maps": "cbtool.viz.maps",
    "compare": "cbtool.check",
    "CbtoolError": "cbtool.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cbtool' has no attribute {name!r}")
