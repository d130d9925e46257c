"""Formatting numbers and tables as text and markdown: how every cbtool figure reads. No torch, no numpy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

# Decimals per kind of number: accuracies in percent, entropies normalised to [0, 1], distances in pixels.
_DECIMALS = {"accuracy": 2, "error": 2, "loss": 4, "entropy": 4, "distance": 2, "throughput": 1, "count": 0}


def format_value(value: Any, kind: str = "accuracy", *, signed: bool = False) -> str:
    """``value`` with the decimals its kind deserves; ``None`` (and NaN) as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "nan" if signed else "-"
    decimals = _DECIMALS.get(kind, 4)
    sign = "+" if signed else ""
    if kind == "count":
        return f"{int(value):{sign},d}"
    return f"{value:{sign}.{decimals}f}"


def format_p(p: float | None) -> str:
    """A p-value with three decimals, or in scientific notation when below 0.001."""
    if p is None:
        return "-"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def _looks_numeric(cell: str) -> bool:
    # "-" (missing), "81.20", "1,000", "+0.0500 (+1.2%)", "[-5.74, -2.25]", "1.3e-05", "0.98x"
    if cell.strip() in {"", "-"}:
        return True
    first = cell.strip().strip("[(").split()[0].rstrip(",").replace(",", "").rstrip("%x")
    try:
        float(first)
    except ValueError:
        return False
    return True


def _cells(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    return [["-" if cell is None else str(cell) for cell in row] for row in rows]


def _default_align(headers: Sequence[str], rows: list[list[str]]) -> list[str]:
    # The first column names the row; the others are right-aligned when every cell is a number.
    align = ["<"]
    for column in range(1, len(headers)):
        numeric = all(_looks_numeric(row[column]) for row in rows if column < len(row))
        align.append(">" if numeric and rows else "<")
    return align


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A plain-text table with a header rule; ``align`` holds ``<`` or ``>`` per column (default: numbers right)."""
    cells = _cells(rows)
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row}")
    align = list(align) if align is not None else _default_align(headers, cells)
    widths = [max([len(str(h))] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    out = [line([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped."""
    cells = _cells(rows)
    align = list(align) if align is not None else _default_align(headers, cells)

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(escape(str(h)) for h in headers) + " |"]
    out.append("|" + "|".join("---:" if a == ">" else ":---" for a in align) + "|")
    out.extend("| " + " | ".join(escape(c) for c in row) + " |" for row in cells)
    return "\n".join(out)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool) -> str:
    return markdown_table(headers, rows) if markdown else format_table(headers, rows)


def delta(current: Any, reference: Any) -> float | None:
    if current is None or reference is None:
        return None
    return current - reference
