"""Which values a heatmap's colours span, so that equal colours mean equal values across the panels of one view.

``shared`` (the default): every panel of a view (all images, models, layers and heads) is coloured on one scale,
shown by one colour bar. Entropy uses its absolute range, 0 (one key) to 1 (uniform). Attention probabilities
and rollout start at 0 and end at the largest value drawn, never below the uniform level 1/N, which the colour
bar marks: attention that is nearly uniform looks nearly flat. ``per-panel`` stretches each panel between its
own minimum and maximum (the contrast every panel had before) and says so in every panel's title. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cbtool.errors import VizError

SCALES = ("shared", "per-panel")
# The colour bar's name of each view: class, query and rollout are probabilities over N keys (uniform at 1/N);
# entropy is normalised to [0, 1].
VIEW_NAMES = {"class": "class attention", "query": "query attention", "entropy": "attention entropy",
              "rollout": "rollout"}


def check_scale(scale: str) -> str:
    """``shared`` or ``per-panel``, else one line."""
    if scale not in SCALES:
        raise VizError(f"--scale must be {' or '.join(SCALES)}, not {scale!r}")
    return scale


@dataclass(frozen=True)
class ColourScale:
    """The colour bar of one view: ``low`` maps to the colormap's first colour, ``high`` to its last; ``marks``
    are ``(value, label)`` ticks such as the uniform level; ``ends`` name the two ends (entropy: sharp, uniform)."""

    name: str
    low: float
    high: float
    marks: tuple[tuple[float, str], ...] = ()
    ends: tuple[str, str] = ("", "")
    per_panel: bool = False

    def fraction(self, value: float) -> float:
        """Where ``value`` lies along the bar, 0 to 1."""
        return min(1.0, max(0.0, (value - self.low) / (self.high - self.low))) if self.high > self.low else 0.0


def number(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals; 0 and 1 plainly."""
    return "0" if value == 0 else f"{value:.{decimals}f}"


def decimals_for(low: float, high: float) -> int:
    """Decimals that tell ``low`` from ``high`` (one more than the spread's first digit), at least two significant
    digits of the larger value, at most 8: 0.9973 and 0.9998 never both read 1."""
    largest = max(abs(low), abs(high))
    significant = 1 - math.floor(math.log10(largest)) if largest > 0 else 2
    spread = high - low
    by_spread = 1 - math.floor(math.log10(spread)) if spread > 1e-12 * max(largest, 1.0) else significant
    return int(min(8, max(0, significant, by_spread)))


def range_text(low: float, high: float) -> str:
    """``"0.00460..0.00540"``: the values a panel holds, with digits enough to tell them apart."""
    decimals = decimals_for(low, high)
    if number(low, decimals) == number(high, decimals):
        return f"{number(low, decimals)} everywhere"
    return f"{number(low, decimals)}..{number(high, decimals)}"


def view_scale(view: str, heats: Sequence[np.ndarray], keys: Sequence[int], scale: str) -> ColourScale:
    """The colour scale of ``view`` (class, query, entropy or rollout) over all its ``heats``; ``keys`` are the key
    counts N of the layers drawn (the uniform level is 1/N)."""
    name = VIEW_NAMES[view]
    if check_scale(scale) == "per-panel":
        return ColourScale(name, 0.0, 1.0, ends=("each panel's min", "max"), per_panel=True)
    if view == "entropy":
        return ColourScale(name, 0.0, 1.0, ends=("0 sharp", "1 uniform"))
    uniform = sorted({int(n) for n in keys if n > 0})
    high = max([float(np.max(h)) for h in heats] + [1.0 / n for n in uniform])
    marks = tuple((1.0 / n, f"1/{n} uniform") for n in uniform)
    return ColourScale(name, 0.0, high, marks=marks)


def panel_limits(heat: np.ndarray, colour_scale: ColourScale) -> tuple[float, float]:
    """The (low, high) a panel is coloured between: the view's, or the panel's own min and max per panel."""
    if colour_scale.per_panel:
        return float(np.min(heat)), float(np.max(heat))
    return colour_scale.low, colour_scale.high


def scale_line(heat: np.ndarray, colour_scale: ColourScale) -> str:
    """The title line of a panel: the range of its values, and, per panel, that its colours span only that."""
    text = range_text(float(np.min(heat)), float(np.max(heat)))
    return f"{text}\nown scale (per panel)" if colour_scale.per_panel else text
