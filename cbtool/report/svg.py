"""Small inline SVG line charts for the report page: no matplotlib, no network, crisp at any zoom."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

from cbtool.report.plotting import PALETTE, colour  # noqa: F401  (PALETTE kept importable here)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ticks(low: float, high: float, count: int = 5) -> list[tuple[float, str]]:
    """``count`` evenly spaced ticks from ``low`` to ``high``, with enough decimals to tell them apart."""
    step = (high - low) / (count - 1)
    decimals = min(6, max(0, 1 - math.floor(math.log10(step)))) if step > 0 else 0
    return [(low + i * step, f"{low + i * step:.{decimals}f}") for i in range(count)]


def line_chart(title: str, series: Sequence[tuple[str, Sequence[float | None]]], *, x_label: str = "layer",
               y_label: str = "", width: int = 520, height: int = 300, colours: Mapping[str, str] | None = None,
               y_range: tuple[float, float] | None = None) -> str:
    """An ``<svg>`` with one polyline per ``(label, values)`` over x = 0, 1, ...; missing values break the line.

    ``colours`` (label -> colour, ``plotting.model_colours``) keeps a model's colour when some models are not drawn;
    ``y_range`` (low, high) gives charts meant to be compared side by side one y scale (default: this data's)."""
    values = [v for _, ys in series for v in ys if _finite(v)]
    low, high = y_range if y_range is not None else (min(values), max(values)) if values else (0.0, 1.0)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    ticks = _ticks(low, high)
    low, high = low - pad, high + pad
    left = 30 + 7 * max(len(text) for _, text in ticks)  # room for the widest tick label and the axis title
    right, top, bottom = 16, 28, 42 + 16 * len(series)
    count = max((len(ys) for _, ys in series), default=1)
    plot_w, plot_h = width - left - right, height - top - bottom

    def x(i: int) -> float:
        return left + (plot_w * i / max(count - 1, 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - (v - low) / (high - low))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" class="chart"><title>{escape(title)}</title>',
             f'<text x="{width / 2}" y="18" text-anchor="middle" class="chart-title">{escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for tick, text in ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">{text}</text>')
    every = max(1, math.ceil(count / 12))
    for i in range(0, count, every):
        parts.append(f'<text x="{x(i):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 32}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">{escape(y_label)}</text>')
    for index, (label, ys) in enumerate(series):
        fill = colours[label] if colours and label in colours else colour(index)
        runs: list[list[str]] = [[]]
        for i, v in enumerate(ys):
            if _finite(v):
                runs[-1].append(f"{x(i):.1f},{y(v):.1f}")
                parts.append(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="{fill}"/>')
            elif runs[-1]:
                runs.append([])
        parts += [f'<polyline fill="none" stroke="{fill}" stroke-width="2" points="{" ".join(run)}"/>'
                  for run in runs if len(run) > 1]
        legend_y = top + plot_h + 48 + 16 * index
        parts.append(f'<rect x="{left}" y="{legend_y - 9}" width="14" height="4" fill="{fill}"/>'
                     f'<text x="{left + 20}" y="{legend_y - 4}">{escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)
