"""matplotlib, imported only when a plot is drawn (the ``plot`` extra)."""

from __future__ import annotations

from cbtool.errors import CbtoolError


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise CbtoolError("plots need matplotlib: pip install 'cbtool[plot]'") from error
    matplotlib.use("Agg")  # no display on CI machines; must precede pyplot
    import matplotlib.pyplot as plt

    return plt
