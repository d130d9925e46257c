"""Common corruptions (ImageNet-C) and the robustness metrics computed from them.

Names, parsers and metrics import without torch (``cbtool check``/``compare`` use them);
``corrupt`` and ``corrupt_normalized`` load torch when first used.
"""

from __future__ import annotations

from typing import Any

from cbtool.robustness.mce import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    RobustnessSummary,
    corruption_error,
    mean_error,
    relative_corruption_error,
    summarize,
)
from cbtool.robustness.registry import (
    COMMON,
    CORRUPTIONS,
    GROUPS,
    SEVERITIES,
    CorruptionError,
    check_corruption,
    check_severity,
    parse_corruptions,
    parse_severities,
)

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "COMMON",
    "CORRUPTIONS",
    "GROUPS",
    "SEVERITIES",
    "CorruptionError",
    "RobustnessSummary",
    "check_corruption",
    "check_severity",
    "corrupt",
    "corrupt_normalized",
    "corruption_error",
    "mean_error",
    "parse_corruptions",
    "parse_severities",
    "relative_corruption_error",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name in ("corrupt", "corrupt_normalized"):
        from cbtool.robustness import corruptions

        return getattr(corruptions, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
