"""matplotlib, imported only when a plot is drawn (the ``plot`` extra), and the one colour assignment of every plot."""

from __future__ import annotations

from collections.abc import Iterable

from cbtool.errors import CbtoolError

# matplotlib's tab10 as hex (no matplotlib import needed): the PNG plots and the report page's SVG charts share it.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def colour(index: int) -> str:
    """The colour of the ``index``-th model (or sweep cell) of a plot: tab10 in order, cycling after ten."""
    return PALETTE[index % len(PALETTE)]


def model_colours(labels: Iterable[object]) -> dict[str, str]:
    """One colour per model label, in the order the models are given (first seen wins): every panel of a plot,
    and every plot of a command, draws a model in the same colour."""
    colours: dict[str, str] = {}
    for label in labels:
        colours.setdefault(str(label), colour(len(colours)))
    return colours


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise CbtoolError("plots need matplotlib: pip install 'cbtool[plot]'") from error
    matplotlib.use("Agg")  # no display on CI machines; must precede pyplot
    import matplotlib.pyplot as plt

    return plt
