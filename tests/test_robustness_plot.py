"""``cbtool eval --corruptions --plot`` (``robustness.render.plot_robustness``) draws what the records hold: each model
in its ``plotting.model_colours`` colour, only where it has a figure (no zero, no line bridging a missing cell),
the corruptions a model lacks named in the figure, every panel on one y scale. No torch."""

from __future__ import annotations

import math
import random

import pytest
from matplotlib.colors import to_hex

from cbtool.errors import CbtoolError
from cbtool.report.plotting import PALETTE, model_colours, pyplot
from cbtool.robustness.record import robustness_record
from cbtool.robustness.registry import corruption_order, describe_corruptions, format_severities
from cbtool.robustness.render import plot_robustness, robustness_figure

SAMPLE = {"name": "sample", "kind": "sample", "split": "test", "num_samples": 100, "limit": None, "num_classes": 10,
          "class_subset": None, "bad_images": 0}  # fmt: skip


def record(names: list[str], seed: int, severities=(1, 2, 3, 4, 5)) -> dict:
    rng = random.Random(seed)
    cells = {c: {s: {"top1": 80 - 8 * s - rng.uniform(0, 5), "correct": None} for s in severities} for c in names}
    return robustness_record(cells, 80.0, names, list(severities), dataset=SAMPLE)


def lines(axis) -> dict[str, tuple[list[float], list[float], str]]:
    """label -> (x, y, colour) of each model's line in a panel."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), to_hex(line.get_color()))
            for line in axis.get_lines()}  # fmt: skip


def heading(figure) -> str:
    """The figure's title (Figure.get_suptitle is matplotlib 3.8+; the plot extra allows 3.7)."""
    return figure.get_suptitle() if hasattr(figure, "get_suptitle") else figure._suptitle.get_text()


@pytest.fixture
def figure_of():
    made = []

    def build(models):
        made.append(robustness_figure(models))
        return made[-1]

    yield build
    for figure in made:
        pyplot().close(figure)


def test_models_on_different_corruptions_are_drawn_only_where_they_have_figures(tmp_path, figure_of):
    """Before: a KeyError (every panel looked up every model's figures for the first model's corruptions)."""
    plain = {"label": "plain", "robustness": record(["gaussian_noise", "fog"], 0)}
    cb = {"label": "cb", "robustness": record(["gaussian_noise"], 1)}
    path = plot_robustness([plain, cb], tmp_path / "robust.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    figure = figure_of([plain, cb])
    noise, fog = figure.axes
    assert noise.get_title() == "gaussian_noise" and fog.get_title() == "fog\n(not evaluated: cb)"
    drawn = lines(noise)
    assert set(drawn) == {"plain", "cb"}
    for model in (plain, cb):
        x, y, _ = drawn[model["label"]]
        assert x == [1, 2, 3, 4, 5]
        assert y == [model["robustness"]["error"]["gaussian_noise"][str(s)] for s in x]
    assert set(lines(fog)) == {"plain"}  # no cb line at all: not a zero, not a flat line
    assert "cb: not evaluated on fog" in heading(figure)
    assert "plain:" not in heading(figure)
    assert noise.get_ylim() == fog.get_ylim() and noise.get_ylim()[0] == 0  # one scale, from no error
    top = max(max(r["robustness"]["error"][c].values()) for r in (plain, cb) for c in r["robustness"]["corruptions"])
    assert top < noise.get_ylim()[1] <= 1.06 * top
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["plain", "cb"]


def test_panels_follow_imagenet_c_order_over_every_model():
    models = [{"label": "a", "robustness": record(["fog"], 0)},
              {"label": "b", "robustness": record(["fog", "gaussian_noise", "defocus_blur"], 1)}]
    figure = robustness_figure(models)
    try:
        assert [a.get_title().split("\n")[0] for a in figure.axes if a.get_visible()] == \
            ["gaussian_noise", "defocus_blur", "fog"]  # fmt: skip
        assert "a: not evaluated on gaussian_noise, defocus_blur" in heading(figure)
    finally:
        pyplot().close(figure)


def test_colours_are_model_colours_by_place_among_all_models(figure_of):
    """As compare --plot and the report page: a model keeps the colour of its place, also when a model before it
    has no robustness record (before: matplotlib's cycle over the models drawn, so plain took the first colour)."""
    models = [{"label": "first", "robustness": None},
              {"label": "plain", "robustness": record(["gaussian_noise", "fog"], 0)},
              {"label": "cb", "robustness": record(["fog"], 1)}]
    figure = figure_of(models)
    expected = model_colours(m["label"] for m in models)
    assert expected == {"first": PALETTE[0], "plain": PALETTE[1], "cb": PALETTE[2]}
    for axis in figure.axes:
        for label, (_, _, colour) in lines(axis).items():
            assert colour == expected[label], (axis.get_title(), label)
    assert {label for axis in figure.axes for label in lines(axis)} == {"plain", "cb"}
    assert [to_hex(h.get_color()) for h in figure.legends[0].legend_handles] == [PALETTE[1], PALETTE[2]]


def test_a_missing_severity_breaks_the_line_instead_of_bridging_it(figure_of):
    full = {"label": "full", "robustness": record(["fog"], 0)}
    odd = {"label": "odd", "robustness": record(["fog"], 1, severities=(1, 3, 5))}
    holed = record(["fog"], 2)
    del holed["error"]["fog"]["4"]  # a hand-cut record: one cell gone
    figure = figure_of([full, odd, {"label": "holed", "robustness": holed}])
    drawn = lines(figure.axes[0])
    x, y, _ = drawn["odd"]
    assert x == [1, 2, 3, 4, 5] and math.isnan(y[1]) and math.isnan(y[3])
    assert y[0] == odd["robustness"]["error"]["fog"]["1"] and y[4] == odd["robustness"]["error"]["fog"]["5"]
    assert math.isnan(drawn["holed"][1][3]) and not any(math.isnan(v) for v in drawn["full"][1])
    assert "odd: severities 1, 3, 5 only" in heading(figure)


def test_nothing_to_draw_is_one_clear_error():
    with pytest.raises(CbtoolError, match="evaluate with --corruptions"):
        robustness_figure([{"label": "m", "robustness": None}])
    with pytest.raises(CbtoolError, match=r"has per-severity errors to plot \(only averages\)"):
        robustness_figure([{"label": "m", "robustness": {"mean_corruption_error": 30.0}}])


@pytest.mark.parametrize(
    ("names", "text"),
    [(["fog"], "fog"), (["fog", "gaussian_noise"], "gaussian_noise, fog"),
     (["shot_noise", "impulse_noise", "gaussian_noise"], "the 3 noise corruptions"),
     (["fog", "snow", "frost", "pixelate"], "4 corruptions")],
)  # fmt: skip
def test_corruption_phrases(names, text):
    assert describe_corruptions(names) == text
    assert corruption_order(["mine", "fog", "gaussian_noise", "fog"]) == ["gaussian_noise", "fog", "mine"]


@pytest.mark.parametrize(("severities", "text"), [((1, 2, 3, 4, 5), "1-5"), ((1, 3, 4, 5), "1,3-5"), ((2,), "2"),
                                                   ((5, 1, 3), "1,3,5")])  # fmt: skip
def test_format_severities(severities, text):
    assert format_severities(severities) == text
