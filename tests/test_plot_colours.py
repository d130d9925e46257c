"""One colour per model in every plot: ``compare --plot``'s panels, the sweep plot and the report page's charts
take their colours from ``plotting.model_colours``; legends cover no data."""

from __future__ import annotations

import pytest
from matplotlib.colors import to_hex
from test_report import CB, PLAIN, SCALES, model
from test_sweep_stats import fake_sweep  # noqa: F401  (a fixture)

from cbtool.report.plotting import PALETTE, model_colours
from cbtool.report import density_figure

pytest.importorskip("matplotlib")


def _lines_by_label(figure) -> dict[str, set[str]]:
    colours: dict[str, set[str]] = {}
    for axis in figure.axes:
        for line in axis.get_lines():
            if not line.get_label().startswith("_"):
                colours.setdefault(line.get_label(), set()).add(to_hex(line.get_color()))
    return colours


def test_model_colours_follow_the_order_given():
    assert model_colours(["plain", "cb", "plain", "cbs"]) == {"plain": PALETTE[0], "cb": PALETTE[1], "cbs": PALETTE[2]}
    assert len(set(model_colours(range(10)).values())) == 10


def test_compare_plot_keeps_each_model_in_one_colour_and_the_legend_off_the_axes():
    from cbtool.report.plotting import pyplot

    cbs = {**model("cbs", "1" * 89 + "0" * 11), "cb_scales": SCALES}
    figure = density_figure([PLAIN, CB, cbs])
    try:
        colours = _lines_by_label(figure)
        # before: the scales panel drew cbs in the first colour (blue, which is plain's in the other panels)
        assert colours == {"plain": {PALETTE[0]}, "cb": {PALETTE[1]}, "cbs": {PALETTE[2]}, "cb (0.5)": {"#808080"}}
        band = figure.axes[2].collections[0].get_facecolor()[0]
        assert to_hex(band[:3]) == PALETTE[2]  # cbs's min-max band in cbs's colour
        assert all(axis.get_legend() is None for axis in figure.axes)  # one legend, the figure's
        (legend,) = figure.legends
        assert [t.get_text() for t in legend.get_texts()] == ["plain", "cb", "cbs", "cb (0.5)"]
        figure.canvas.draw()
        box = legend.get_window_extent()
        for axis in figure.axes:  # outside every panel: it hides no point
            assert not box.overlaps(axis.get_window_extent()), axis.get_title()
    finally:
        pyplot().close(figure)


def test_a_model_without_density_keeps_its_colour_in_the_scales_panel():
    from cbtool.report.plotting import pyplot

    scales_only = {**model("cbs", "1", entropy=None), "cb_scales": SCALES}
    figure = density_figure([PLAIN, scales_only])
    try:
        assert _lines_by_label(figure)["cbs"] == {PALETTE[1]}  # the second model, although the only one with scales
    finally:
        pyplot().close(figure)


def test_sweep_plot_colours_cells_in_the_order_of_the_other_plots(fake_sweep):  # noqa: F811
    from cbtool.report.plotting import pyplot
    from cbtool.sweep.render import summary_figure
    from cbtool.sweep.summary import summarize

    plan, root = fake_sweep
    figure = summary_figure(summarize(plan, root))
    try:
        for axis in figure.axes:
            means = [to_hex(line.get_color()) for line in axis.get_lines() if line.get_marker() == "o"]
            # plain (the first cell) in the first colour, as compare draws its first model; before: the reverse
            assert means == [PALETTE[0], PALETTE[1]], axis.get_title()
    finally:
        pyplot().close(figure)


def test_report_page_charts_keep_colours_when_a_model_has_no_density():
    from cbtool.report.page import density_section

    no_density = model("first", "10", entropy=None)
    html = density_section([no_density, PLAIN, CB])
    assert f'stroke="{PALETTE[1]}"' in html and f'stroke="{PALETTE[2]}"' in html  # plain and cb: 2nd and 3rd model
    assert f'stroke="{PALETTE[0]}"' not in html


def test_density_axes_start_at_zero_so_small_differences_look_small():
    import matplotlib.pyplot as plt

    figure = density_figure([PLAIN, CB])
    try:
        entropy, distance = figure.axes[:2]
        assert entropy.get_ylim() == (0.0, 1.02) and distance.get_ylim()[0] == 0.0
    finally:
        plt.close(figure)
