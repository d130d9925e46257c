"""Tables, markdown, plots and atomic writes in ``cbtool.report``, and the ``compare`` command built on them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cbtool import report
from cbtool.cli.app import app
from cbtool.errors import CbtoolError, OutputError
from cbtool.results import SCHEMA_VERSION
from cbtool.report import (
    density_table,
    difference_rows,
    difference_table,
    format_table,
    format_value,
    markdown_table,
    metrics_table,
    plot_density,
    write_json_atomic,
    write_text_atomic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def model(label: str, correct: str, entropy=(0.9, 0.6, 0.3), distance=(20.0, 40.0, 60.0), **metrics) -> dict:
    n = len(correct)
    return {
        "label": label,
        "metrics": {
            "num_samples": n,
            "top1": 100.0 * correct.count("1") / n,
            "top5": None,
            "loss": 0.51234,
            "correct": correct,
            "throughput": {"model_images_per_s": 812.34, "end_to_end_images_per_s": 640.1},
            **metrics,
        },
        "density": None
        if entropy is None
        else {
            "entropy_mean": sum(entropy) / len(entropy),
            "entropy_per_layer": list(entropy),
            "distance_mean": sum(distance) / len(distance),
            "distance_per_layer": list(distance),
        },
    }


def results(*models: dict, sha: str = "ab" * 32) -> dict:
    n = models[0]["metrics"]["num_samples"]
    dataset = {"name": "sample", "kind": "sample", "split": "test", "num_samples": n, "samples_sha256": sha}
    return {"schema_version": 1, "dataset": dataset, "models": list(models)}


PLAIN = model("plain", "1" * 90 + "0" * 10, entropy=(0.80, 0.50, 0.20), distance=(25.0, 45.0, 65.0))
CB = model("cb", "1" * 88 + "0" * 12)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, kind, signed, text",
    [
        (81.234, "accuracy", False, "81.23"),
        (0.612345, "entropy", False, "0.6123"),
        (41.0, "distance", False, "41.00"),
        (812.34, "throughput", False, "812.3"),
        (50000, "count", False, "50,000"),
        (None, "accuracy", False, "-"),
        (float("nan"), "loss", False, "-"),
        (-4.0, "accuracy", True, "-4.00"),
        (0.05, "entropy", True, "+0.0500"),
    ],
)
def test_format_value(value, kind, signed, text):
    assert format_value(value, kind, signed=signed) == text


def test_format_table_aligns_numbers_right():
    table = format_table(["model", "top1", "note"], [["a", "81.20", "x"], ["longer-name", "9.50", None]])
    lines = table.splitlines()
    assert lines[0] == "model         top1  note"
    assert lines[1] == "-----------  -----  ----"
    assert lines[2] == "a            81.20  x"
    assert lines[3] == "longer-name   9.50  -"
    assert format_table(["a", "b"], [["1", "2"]], align=["<", "<"]).splitlines()[2] == "1  2"
    with pytest.raises(ValueError):
        format_table(["a", "b"], [["only one"]])


def test_markdown_table_escapes_and_aligns():
    text = markdown_table(["model", "top1"], [["a|b", "81.20"]])
    assert text.splitlines() == ["| model | top1 |", "|:---|---:|", "| a\\|b | 81.20 |"]


def test_metrics_table_has_every_model_and_column():
    table = metrics_table([PLAIN, CB])
    header, rule, *rows = table.splitlines()
    assert header.split()[:4] == ["model", "top1", "top5", "loss"] and "img/s e2e" in header
    assert rows[0].split() == ["plain", "90.00", "-", "0.5123", "100", "812.3", "640.1", "0.5000", "45.00"]
    assert rows[1].split()[:2] == ["cb", "88.00"]
    assert metrics_table([PLAIN], markdown=True).startswith("| model | top1 |")


def test_density_table_one_row_per_layer():
    table = density_table([PLAIN, CB, model("no-density", "1", entropy=None)])
    header, _, *rows = table.splitlines()
    assert header.split() == ["layer", "entropy", "plain", "entropy", "cb", "distance", "plain", "distance", "cb"]
    assert [row.split() for row in rows] == [
        ["0", "0.8000", "0.9000", "25.00", "20.00"],
        ["1", "0.5000", "0.6000", "45.00", "40.00"],
        ["2", "0.2000", "0.3000", "65.00", "60.00"],
    ]
    assert density_table([model("no-density", "1", entropy=None)]) == ""
    assert density_table([CB]).splitlines()[0].split() == ["layer", "entropy", "distance"]


def test_differences_relative_to_first():
    (row,) = difference_rows([PLAIN, CB])
    assert row["top1"] == pytest.approx(-2.0) and row["entropy_mean"] == pytest.approx(0.1)
    assert row["distance_mean"] == pytest.approx(-5.0) and row["model_images_per_s_ratio"] == pytest.approx(1.0)
    table = difference_table([PLAIN, CB], p_values=[0.5])
    assert table.splitlines()[2].split() == ["cb", "-2.00", "-", "+0.0000", "+0.1000", "-5.00", "1.00x", "1.00x", "0.500"]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def test_write_json_atomic_sorted_and_replaced(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    write_json_atomic(path, {"c": None})
    assert json.loads(path.read_text()) == {"c": None}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = write_text_atomic(tmp_path / "keep.txt", "old\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match=r"cannot write .*keep\.txt: disk full"):  # one line, not an OSError traceback
        write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_check_output_folder(tmp_path):
    assert report.check_output_folder(tmp_path / "new.json") == tmp_path / "new.json"
    with pytest.raises(OutputError, match="is a folder"):
        report.check_output_folder(tmp_path)
    with pytest.raises(OutputError, match="does not exist"):
        report.check_output_folder(tmp_path / "missing" / "x.json")


def test_write_text_append_and_missing_folder(tmp_path):
    path = tmp_path / "summary.md"
    write_text_atomic(path, "one", append=True)
    write_text_atomic(path, "two\n", append=True)
    assert path.read_text() == "one\ntwo\n"
    with pytest.raises(OutputError, match="does not exist"):
        write_text_atomic(tmp_path / "nowhere" / "x.md", "x")


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def test_plot_density_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_density([PLAIN, CB], tmp_path / "density.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["density.png"]


SCALES = [{"module": f"blocks.{i}.mlp.cb", "mean": m, "min": m - 0.1, "max": m + 0.2} for i, m in enumerate((0.1, 0.3, 0.6))]


def _png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk


def test_plot_draws_the_learned_scales_per_layer(tmp_path):
    pytest.importorskip("matplotlib")
    from cbtool.report.plotting import pyplot
    from cbtool.report import _plot_scales

    cbs = {**model("cbs", "1" * 89 + "0" * 11), "cb_scales": SCALES}
    plt = pyplot()
    fig, ax = plt.subplots()
    try:
        _plot_scales(ax, [cbs])
        assert list(ax.lines[0].get_ydata()) == [0.1, 0.3, 0.6]
        band = ax.collections[0].get_paths()[0].vertices[:, 1]
        assert min(band) == pytest.approx(0.0) and max(band) == pytest.approx(0.8)
        # rows that name their block are drawn at it (--layers 1-3 of a deeper model)
        ax.clear()
        _plot_scales(ax, [{**cbs, "cb_scales": [{**row, "layer": row_index + 1} for row_index, row in enumerate(SCALES)]}])
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    finally:
        plt.close(fig)
    # density and scales: three panels; scales alone: one (120 dpi, 5 inches a panel)
    assert _png_width(plot_density([PLAIN, cbs], tmp_path / "all.png")) == 1800
    scales_only = {**model("cbs", "1", entropy=None), "cb_scales": SCALES}
    assert _png_width(plot_density([scales_only], tmp_path / "scales.png")) == 600
    assert _png_width(plot_density([PLAIN, CB], tmp_path / "density.png")) == 1200


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(CbtoolError, match=r"pip install 'cbtool\[plot\]'"):
        plot_density([PLAIN], tmp_path / "x.png")


def test_plot_without_density_is_a_user_error(tmp_path):
    with pytest.raises(CbtoolError, match="--density"):
        plot_density([model("x", "1", entropy=None)], tmp_path / "x.png")


# --------------------------------------------------------------------------------------------
# cbtool compare
# --------------------------------------------------------------------------------------------

runner = CliRunner()


def write(folder: Path, name: str, obj: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(obj))
    return path


def test_compare_tables_json_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    plain = write(tmp_path, "plain.json", results(PLAIN))
    cb = write(tmp_path, "cb.json", results(CB))
    out = tmp_path / "out"
    out.mkdir()
    args = ["compare", str(plain), str(cb), "--plot", str(out / "c.png"), "--json", str(out / "c.json")]
    result = runner.invoke(app, [*args, "--markdown", str(out / "c.md")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Metrics" in text and "Attention density per layer" in text and "Differences from plain" in text
    assert "entropy plain" in text and "distance cb" in text
    density_rows = text.split("Attention density per layer")[1].split("Differences")[0].strip().splitlines()[2:]
    assert [row.split()[0] for row in density_rows] == ["0", "1", "2"]
    assert "p (top1)" in text  # same samples, so McNemar applies
    assert (out / "c.png").read_bytes()[:8] == PNG_MAGIC
    record = json.loads((out / "c.json").read_text())
    assert [m["label"] for m in record["models"]] == ["plain", "cb"] and record["same_samples"] is True
    assert record["differences"][0]["top1"] == pytest.approx(-2.0)
    assert "| plain | 90.00 |" in (out / "c.md").read_text()
    assert runner.invoke(app, args).exit_code == 0  # reports are replaced atomically
    assert sorted(p.name for p in out.iterdir()) == ["c.json", "c.md", "c.png"]


def test_compare_labels_ambiguous_models_by_file(tmp_path):
    a = write(tmp_path, "a.json", results(model("cb.safetensors", "1100")))
    b = write(tmp_path, "b.json", results(model("cb.safetensors", "1000"), model("plain", "1110"), sha="cd" * 32))
    result = runner.invoke(app, ["compare", str(a), str(b)])
    assert result.exit_code == 0, result.output
    assert "a.json:cb.safetensors" in result.output and "b.json:plain" in result.output
    assert "note: b.json:cb.safetensors was evaluated on other data" in result.output
    assert "p (top1)" not in result.output


def test_compare_one_file_with_several_models(tmp_path):
    both = write(tmp_path, "both.json", results(PLAIN, CB))
    result = runner.invoke(app, ["compare", str(both)])
    assert result.exit_code == 0 and "Differences from plain" in result.output
    single = write(tmp_path, "one.json", results(PLAIN))
    result = runner.invoke(app, ["compare", str(single)])
    assert isinstance(result.exception, CbtoolError) and "at least two models" in str(result.exception)


def test_compare_plot_needs_density(tmp_path):
    a = write(tmp_path, "a.json", results(model("a", "10", entropy=None)))
    b = write(tmp_path, "b.json", results(model("b", "11", entropy=None)))
    result = runner.invoke(app, ["compare", str(a), str(b), "--plot", str(tmp_path / "p.png")])
    assert isinstance(result.exception, CbtoolError) and "--density" in str(result.exception)
    assert not (tmp_path / "p.png").exists()


def test_library_compare_is_what_compare_json_writes(tmp_path):
    from cbtool import compare
    from cbtool.check import compare_results

    a = write(tmp_path, "a.json", results(model("cb.safetensors", "1100")))
    b = write(tmp_path, "b.json", results(model("cb.safetensors", "1000"), model("plain", "1110"), sha="cd" * 32))
    both = write(tmp_path, "both.json", results(PLAIN, CB))
    for files in ([a, b], [both], [both, a]):
        assert runner.invoke(app, ["compare", *map(str, files), "--json", str(tmp_path / "c.json")]).exit_code == 0
        documents = [json.loads(path.read_text()) for path in files]
        record = compare(documents, [str(path) for path in files])
        assert json.loads(json.dumps(record, sort_keys=True)) == json.loads((tmp_path / "c.json").read_text())
    assert compare(documents)["files"] == ["results1", "results2"]
    assert compare_results([results(PLAIN, CB)]).p_values is not None  # same samples: McNemar on top1
    with pytest.raises(CbtoolError, match="at least two models"):
        compare([results(PLAIN)])
    with pytest.raises(CbtoolError, match="no schema_version"):
        compare([results(PLAIN), {"models": []}], ["a.json", "b.json"])
    with pytest.raises(CbtoolError, match="2 documents but 1 names"):
        compare([results(PLAIN), results(CB)], ["a.json"])


def with_robustness(entry: dict, fog: dict[int, str], mce: float | None, relative_mce: float | None) -> dict:
    """``entry`` with a hand-made robustness record: fog at the severities in ``fog`` (correct strings)."""
    error = {str(s): 100.0 * v.count("0") / len(v) for s, v in fog.items()}
    record = {
        "corruptions": ["fog"], "severities": sorted(fog), "seed": 0, "clean_error": 100.0 - entry["metrics"]["top1"],
        "error": {"fog": error}, "correct": {"fog": {str(s): v for s, v in fog.items()}},
        "mean_error": {"fog": sum(error.values()) / len(error)},
        "ce": {"fog": mce} if mce is not None else {}, "relative_ce": {"fog": relative_mce} if mce is not None else {},
        "mce": mce, "relative_mce": relative_mce, "complete": False, "relative_to_first": None,
        "mce_over": ["fog"] if mce is not None else [], "jpeg_quality": 85,
        "mean_corruption_error": sum(error.values()) / len(error), "mean_corruption_error_over": ["fog"],
        "incomplete_reason": "mCE over 1 of the 15 ImageNet-C corruptions: not the published mCE",
    }  # fmt: skip
    return {**entry, "robustness": record}


def imagenet(document: dict) -> dict:
    """``document`` as a schema-3 run on ImageNet-1k validation, where AlexNet's figures apply."""
    document["dataset"].update(name="imagenet-1k", split="validation", num_classes=1000, limit=None)
    return {**document, "schema_version": SCHEMA_VERSION}


def test_compare_shows_robustness_section(tmp_path):
    five = range(1, 6)
    plain = with_robustness(PLAIN, {s: "1" * (80 - 5 * s) + "0" * (20 + 5 * s) for s in five}, 50.0, 70.0)
    cb = with_robustness(CB, {s: "1" * (78 - 5 * s) + "0" * (22 + 5 * s) for s in five}, 52.5, 71.0)
    a, b = write(tmp_path, "plain.json", imagenet(results(plain))), write(tmp_path, "cb.json", imagenet(results(cb)))
    result = runner.invoke(app, ["compare", str(a), str(b), "--json", str(tmp_path / "c.json"),
                                 "--markdown", str(tmp_path / "c.md")])  # fmt: skip
    assert result.exit_code == 0, result.output
    section = result.output.split("Robustness")[1]
    assert "corruption" in section and "s5" in section and "fog" in section and "vs first" in section
    assert "rel CE" in section and "in % of AlexNet's ImageNet-1k validation error" in section
    assert "mCE cb vs plain: +2.50 (relative mCE +1.00)" in section
    assert "105.71" in section  # CE vs first: the first model compared, 100 * 185 / 175
    assert "- mCE cb vs plain: +2.50" in (tmp_path / "c.md").read_text()
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["models"][1]["robustness"]["mce"] == 52.5 and "correct" not in record["models"][1]["robustness"]
    (diff,) = record["robustness_differences"]
    assert diff["mce"] == pytest.approx(2.5) and diff["mean_error"]["fog"] == pytest.approx(2.0)
    # Paired samples: McNemar per cell; cb lost 2 images at each severity and gained none.
    assert diff["cell_p_values"]["fog"]["3"] == pytest.approx(0.5)
    assert record == json.loads(json.dumps(report_compare([imagenet(results(plain)), imagenet(results(cb))],
                                                          [str(a), str(b)])))
    plain_only = runner.invoke(app, ["compare", str(write(tmp_path, "p.json", results(PLAIN))), str(a)])
    assert plain_only.exit_code == 0 and " vs plain:" not in plain_only.output  # one record: table, no difference line
    assert "Robustness" in plain_only.output
    neither = runner.invoke(app, ["compare", str(write(tmp_path, "q.json", results(CB))), str(tmp_path / "p.json")])
    assert neither.exit_code == 0 and "Robustness" not in neither.output


def test_old_files_outside_imagenet_lose_their_mce(tmp_path):
    """Schema 2 wrote mCE "in % of AlexNet's" for any dataset: read back on the 10-class sample, it is dropped, the
    reason shown, and the mean corruption error (in points, over the corruptions named) takes its place."""
    five = range(1, 6)
    plain = with_robustness(PLAIN, {s: "1" * (80 - 5 * s) + "0" * (20 + 5 * s) for s in five}, 50.0, 70.0)
    cb = with_robustness(CB, {s: "1" * (78 - 5 * s) + "0" * (22 + 5 * s) for s in five}, 52.5, 71.0)
    old = []
    for entry in (plain, cb):
        document = {**results(entry), "schema_version": 2}
        document["dataset"]["num_classes"] = 10
        for key in ("mce_over", "jpeg_quality", "mean_corruption_error", "mean_corruption_error_over",
                    "incomplete_reason"):
            del document["models"][0]["robustness"][key]
        old.append(document)
    a, b = write(tmp_path, "plain.json", old[0]), write(tmp_path, "cb.json", old[1])
    result = runner.invoke(app, ["compare", str(a), str(b), "--json", str(tmp_path / "c.json")])
    assert result.exit_code == 0, result.output
    section = result.output.split("Robustness")[1]
    assert "rel CE" not in section and "in % of AlexNet's" not in section and "mCE cb" not in section
    assert "complete: false: 'sample' has 10 classes, not ImageNet-1k's 1,000" in section
    assert "mean corruption error cb vs plain: +2.00 points over 1 corruptions" in section
    assert "not re-encoded as JPEG" in section
    record = json.loads((tmp_path / "c.json").read_text())
    robust = record["models"][1]["robustness"]
    assert robust["mce"] is None and robust["ce"] == {} and robust["complete"] is False
    assert robust["mean_corruption_error"] == pytest.approx(37.0) and robust["mean_corruption_error_over"] == ["fog"]
    (diff,) = record["robustness_differences"]
    assert diff["mce"] is None and diff["mean_corruption_error"] == pytest.approx(2.0)


def report_compare(documents, names):
    from cbtool import compare

    return compare(documents, names)
