"""The statistics of ``cbtool sweep``: Student's t against published values, the paired t-test and McNemar against
hand-computed ones, and a summary built from hand-written run folders (no training, no torch)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from cbtool.check.stats import (
    binomial_two_sided_p, mcnemar_test, paired_t_test, regularized_beta, student_t_two_sided_p,
)  # fmt: skip
from cbtool.errors import CbtoolError
from cbtool.results import SCHEMA_VERSION
from cbtool.sweep.plan import Cell, SweepPlan, first_difference, grid, parse_layers
from cbtool.sweep.render import summary_text
from cbtool.sweep.summary import summarize, verdict


@pytest.mark.parametrize(
    ("t", "df", "p"),
    [  # two-sided critical values from a t table
        (2.776, 4, 0.05), (12.706, 1, 0.05), (4.303, 2, 0.05), (2.228, 10, 0.05), (3.169, 10, 0.01),
        (1.960, 1e7, 0.05), (0.0, 3, 1.0), (-2.776, 4, 0.05), (math.inf, 2, 0.0),
    ],
)  # fmt: skip
def test_student_t_two_sided_p(t, df, p):
    assert student_t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


@pytest.mark.parametrize(
    ("x", "a", "b", "expected"),
    [(0.5, 2, 3, 0.6875), (0.3, 0.5, 0.5, 2 / math.pi * math.asin(math.sqrt(0.3))), (0.0, 2, 2, 0.0),
     (1.0, 2, 2, 1.0), (0.9, 1, 1, 0.9), (0.2, 5, 1, 0.2**5)],
)  # fmt: skip
def test_regularized_beta(x, a, b, expected):
    assert regularized_beta(x, a, b) == pytest.approx(expected, abs=1e-12)


def test_paired_t_test_by_hand():
    # differences 1, 2, 2: mean 5/3, sd sqrt(1/3), t = (5/3) / (sqrt(1/3) / sqrt(3)) = 5, df 2
    result = paired_t_test([1.0, 2.0, 3.0], [2.0, 4.0, 5.0])
    assert result.statistic == pytest.approx(5.0)
    assert result.p_value == pytest.approx(0.03775, abs=1e-5)  # 2 * (1 - F_t2(5))
    assert math.isnan(paired_t_test([1.0, 2.0], [1.5, 2.5]).p_value)  # the same difference every time: undefined
    assert paired_t_test([1.0, 2.0], [1.0, 2.0]).p_value == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        paired_t_test([1.0], [2.0])


def test_layers_grid_and_names():
    assert parse_layers(["all,0-5,6-11"]) == ["all", "0-5", "6-11"]
    assert parse_layers(["all", "0+2+5-7"]) == ["all", "0,2,5-7"]
    cells = grid(["plain", "cb", "cbs"], ["mlp", "attn"], ["all", "0,2,5-7"])
    assert [c.name for c in cells] == ["plain", "cb-mlp", "cb-mlp-L0+2+5-7", "cb-attn", "cb-attn-L0+2+5-7",
                                       "cbs-mlp", "cbs-mlp-L0+2+5-7", "cbs-attn", "cbs-attn-L0+2+5-7"]  # fmt: skip
    with pytest.raises(CbtoolError, match="twice"):
        parse_layers(["0-5", "0-5"])
    assert first_difference({"options": {"lr": 0.1}}, {"options": {"lr": 0.2}}) == "--lr 0.1 there, 0.2 here"


def _document(top1, loss, entropy, correct, sha="abc"):
    return {"schema_version": SCHEMA_VERSION, "dataset": {"name": "sample", "split": "test", "num_samples": len(correct),
                                                          "samples_sha256": sha},
            "models": [{"label": "model.safetensors", "metrics": {"top1": top1, "loss": loss, "correct": correct},
                        "density": {"entropy_mean": entropy}}]}  # fmt: skip


# per run: top-1, loss, entropy, per-sample correctness (4 samples)
RUNS = {
    ("plain", 0): (50.0, 1.00, 0.90, "1100"), ("plain", 1): (25.0, 1.10, 0.92, "1000"),
    ("plain", 2): (75.0, 0.95, 0.91, "1110"),
    ("cb", 0): (75.0, 0.90, 0.85, "1101"), ("cb", 1): (50.0, 1.00, 0.88, "0110"),
    ("cb", 2): (100.0, 0.80, 0.86, "1111"),
}  # fmt: skip


@pytest.fixture
def fake_sweep(tmp_path):
    cells = [Cell("plain"), Cell("cb", "mlp", "all")]
    plan = SweepPlan(cells, [0, 1, 2], {"model": "m", "dataset": "sample"}, {"dataset": "sample", "split": None,
                     "limit": None, "corruptions": None, "severities": None, "density": True})  # fmt: skip
    for run in plan.runs:
        folder = run.folder(tmp_path)
        folder.mkdir(parents=True)
        (folder / "eval.json").write_text(json.dumps(_document(*RUNS[(run.cell.variant, run.seed)])))
    (tmp_path / "sweep.json").write_text(json.dumps(plan.to_dict()))
    return plan, tmp_path


def test_summary_equals_the_run_files_by_hand(fake_sweep):
    plan, root = fake_sweep
    summary = summarize(plan, root)
    plain, cb = summary["cells"]
    assert plain["metrics"]["top1"]["mean"] == pytest.approx(50.0)
    assert plain["metrics"]["top1"]["std"] == pytest.approx(25.0)  # sample std of 50, 25, 75
    assert cb["metrics"]["loss"]["mean"] == pytest.approx(0.9)
    assert cb["metrics"]["loss"]["std"] == pytest.approx(statistics.stdev([0.9, 1.0, 0.8]))
    assert cb["metrics"]["entropy_mean"]["values"] == [0.85, 0.88, 0.86]
    (comparison,) = summary["comparisons"]
    top1 = comparison["metrics"]["top1"]
    # +25 points on every seed: no spread, so no t-test and no verdict (McNemar is shown, it does not decide)
    assert top1["difference"] == pytest.approx(25.0) and top1["p_value"] is None and top1["tied"]
    assert comparison["verdicts"]["top1"] == "untested"
    entropy = comparison["metrics"]["entropy_mean"]  # differences -0.05, -0.04, -0.05
    d = [-0.05, -0.04, -0.05]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    assert entropy["t"] == pytest.approx(t) and entropy["df"] == 2
    assert entropy["p_value"] == pytest.approx(student_t_two_sided_p(t, 2))
    # pooled: plain 1100 1000 1110, cb 1101 0110 1111 -> only plain right: 1 (seed 1, sample 0); only cb: 4
    mcnemar = comparison["mcnemar"]
    assert (mcnemar["baseline_only"], mcnemar["current_only"], mcnemar["predictions"]) == (1, 4, 12)
    assert mcnemar["p_value"] == pytest.approx(binomial_two_sided_p(1, 5)) == mcnemar_test(1, 4).p_value
    text = summary_text(summary)
    assert ("cb-mlp vs plain over 3 seeds: top-1 +25.00 points, no test (the same difference on every seed: "
            "no spread for a t-test; McNemar on 12 pooled predictions p = 0.375)") in text
    assert "50.00 ± 25.00" in text


def test_within_noise_one_seed_no_baseline_and_unfinished_runs(fake_sweep):
    plan, root = fake_sweep
    assert verdict("top1", {"difference": 1.0, "p_value": 0.3}, None) == "within noise"
    one_seed = SweepPlan(plan.cells, [0], plan.options, plan.evaluation)
    text = summary_text(summarize(one_seed, root))
    assert "over 1 seed: top-1 +25.00 points" in text
    assert "A test over seeds needs 2 or more seeds" in text
    no_plain = SweepPlan(plan.cells[1:], [0, 1], plan.options, plan.evaluation)
    summary = summarize(no_plain, root)
    assert summary["baseline"] is None and summary["comparisons"] == []
    assert "no baseline" in summary_text(summary)
    (root / "runs" / "cb-mlp-seed2" / "eval.json").unlink()
    summary = summarize(plan, root)
    assert summary["missing"] == ["cb-mlp-seed2"]
    assert summary["comparisons"][0]["seeds"] == [0, 1]
    assert "unfinished runs (1, left out above): cb-mlp-seed2" in summary_text(summary)


def test_runs_evaluated_on_other_data_are_not_paired(fake_sweep):
    plan, root = fake_sweep
    odd = root / "runs" / "cb-mlp-seed1" / "eval.json"
    odd.write_text(json.dumps(_document(50.0, 1.0, 0.9, "0110", sha="other")))
    with pytest.raises(CbtoolError, match="evaluated on different data"):
        summarize(plan, root)


# per run: the top-1 (%) of each corruption at every severity 1-5 (the mean corruption error is 100 minus the mean)
CORRUPTED = {("plain", 0): 40.0, ("plain", 1): 36.0, ("plain", 2): 44.0, ("cb", 0): 50.0, ("cb", 1): 46.0,
             ("cb", 2): 48.0}  # fmt: skip
IMAGENET_VAL = {"name": "imagenet-1k", "kind": "hub", "split": "validation", "num_samples": 50_000, "limit": None,
                "num_classes": 1000, "class_subset": None, "bad_images": 0}  # fmt: skip


def _with_corruptions(plan: SweepPlan, root, dataset: dict) -> SweepPlan:
    """``plan`` evaluated with --corruptions gaussian_noise,fog: each run's eval-corruptions.json as cbtool eval
    writes it for ``dataset`` (mCE only on ImageNet-1k validation)."""
    from cbtool.robustness.record import robustness_record

    names, severities = ["gaussian_noise", "fog"], [1, 2, 3, 4, 5]
    corrupted = SweepPlan(plan.cells, plan.seeds, plan.options, {**plan.evaluation, "corruptions": names,
                                                                 "severities": severities})  # fmt: skip
    for run in corrupted.runs:
        top1, document = CORRUPTED[(run.cell.variant, run.seed)], _document(*RUNS[(run.cell.variant, run.seed)])
        cells = {c: {s: {"top1": top1 + (2.0 if c == "fog" else 0.0), "correct": None} for s in severities}
                 for c in names}  # fmt: skip
        document["models"][0]["robustness"] = robustness_record(cells, document["models"][0]["metrics"]["top1"],
                                                                names, severities, dataset=dataset)  # fmt: skip
        (run.folder(root) / "eval-corruptions.json").write_text(json.dumps(document))
    return corrupted


def _panels(figure) -> dict[str, list[float]]:
    """Panel title -> the mean drawn per cell (the coloured dots; the grey ones are the seeds)."""
    return {axis.get_title(): [float(y) for line in axis.get_lines() if line.get_marker() == "o"
                               for y in line.get_ydata()] for axis in figure.axes}  # fmt: skip


def test_sweep_plot_draws_the_mean_corruption_error_where_there_is_no_mce(fake_sweep, tmp_path):
    """Outside ImageNet-1k validation there is no mCE; before, the plot then had no robustness panel at all."""
    from matplotlib.collections import LineCollection, PathCollection

    from cbtool.report.plotting import pyplot
    from cbtool.sweep.render import plot_summary, summary_figure

    plan, root = fake_sweep
    summary = summarize(_with_corruptions(plan, root, {"name": "sample", "num_classes": 10}), root)
    assert "mce" not in summary["metrics"] and "corruption_error" in summary["metrics"]
    figure = summary_figure(summary)
    try:
        panels = _panels(figure)
        title = "mean corruption error (points; not mCE)\ntop-1 error over gaussian_noise, fog\nseverities 1-5"
        assert list(panels) == ["top-1 (%)", "entropy", title]
        # per run: 100 - (top1 + (top1 + 2)) / 2 = 99 - top1; the means over seeds of plain and cb
        assert panels[title] == pytest.approx([99 - 40.0, 99 - 48.0])
        axis = figure.axes[2]
        seeds = sorted(float(y) for c in axis.collections if isinstance(c, PathCollection) for _, y in c.get_offsets())
        assert seeds == pytest.approx(sorted(99 - v for v in CORRUPTED.values()))
        bars = [end[1] for c in axis.collections if isinstance(c, LineCollection) for segment in c.get_segments()
                for end in segment]  # ±1 sample std over seeds (plain: 40, 36, 44; cb: 50, 46, 48), as elsewhere
        assert bars == pytest.approx([59 - 4.0, 59 + 4.0, 51 - 2.0, 51 + 2.0])
    finally:
        pyplot().close(figure)
    assert plot_summary(summary, tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_plot_keeps_the_mce_panel_on_imagenet_validation(fake_sweep):
    from cbtool.report.plotting import pyplot
    from cbtool.sweep.render import summary_figure

    plan, root = fake_sweep
    summary = summarize(_with_corruptions(plan, root, IMAGENET_VAL), root)
    assert {"mce", "corruption_error"} <= set(summary["metrics"])
    figure = summary_figure(summary)
    try:
        panels = _panels(figure)
        mce = "mCE\n(% of AlexNet's errors)"
        assert list(panels) == ["top-1 (%)", "entropy", mce]  # the mean corruption error is in the table only
        assert panels[mce] == pytest.approx([summary["cells"][0]["metrics"]["mce"]["mean"],
                                               summary["cells"][1]["metrics"]["mce"]["mean"]])  # fmt: skip
    finally:
        pyplot().close(figure)


def test_sweep_plot_draws_entropy_on_its_whole_range_and_the_rest_from_zero(fake_sweep):
    """Differences of 1e-5 in entropy must not fill the axis (the cells' entropies here are all but equal)."""
    from cbtool.report.plotting import pyplot
    from cbtool.sweep.render import summary_figure

    plan, root = fake_sweep
    summary = summarize(_with_corruptions(plan, root, IMAGENET_VAL), root)
    figure = summary_figure(summary)
    try:
        limits = {axis.get_title(): axis.get_ylim() for axis in figure.axes}
        assert limits["entropy"] == (0.0, 1.0)
        assert limits["top-1 (%)"] == (0.0, 100.0)
        assert limits["mCE\n(% of AlexNet's errors)"][0] == 0.0
    finally:
        pyplot().close(figure)
