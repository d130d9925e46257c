"""What cbtool renders: tables, markdown, plots and the ``cbtool report`` HTML page.

``tables`` formats numbers and tables; ``summaries`` turns results (and ``cbtool.check``'s verdicts) into text,
markdown and density plots for ``eval``, ``compare`` and ``check``; ``plotting`` is the one door to matplotlib;
``svg`` draws the page's inline charts; ``page`` writes the report page (it asks ``cbtool.viz`` for pictures).

``cbtool.report`` was one module before 0.2.0; every name it had stays importable from here, loaded lazily so
that importing this package imports none of its modules (and no matplotlib).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Names of the former ``cbtool/report.py`` module, now in ``summaries`` (which re-exports the table and file helpers).
_SUMMARIES = (
    "CbtoolError", "DIFFERENCE_HEADERS", "METRIC_HEADERS", "atomic_path", "check_markdown", "check_output_folder",
    "check_parent_folder", "check_summary", "check_text", "comparison_markdown", "comparison_text", "delta",
    "density_figure", "density_table", "difference_rows", "difference_table", "format_p", "format_table",
    "format_value", "label_models", "markdown_table", "metrics_row", "metrics_table", "model_colours",
    "plot_density", "pyplot", "robustness_section", "write_json_atomic", "write_text_atomic",
    "_plot_scales", "_table",
)

__all__ = [name for name in _SUMMARIES if not name.startswith("_")]


def __getattr__(name: str) -> Any:
    # Any other name summaries defines is found too, so a name added there later needs no line here.
    if not name.startswith("__"):
        summaries = import_module("cbtool.report.summaries")
        if hasattr(summaries, name):
            return getattr(summaries, name)
    raise AttributeError(f"module 'cbtool.report' has no attribute {name!r}")
