"""``cbtool report``: one self-contained HTML page whose numbers match the results JSON, checked in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from cbtool.errors import CbtoolError
from cbtool.report import format_value
from cbtool.report.page import generic_tables, report_page, write_report_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs it: .ci/run)")

ROBUSTNESS = {
    "clean_error": 0.25,
    "mce": 0.7321,
    "mean_error": {"gaussian_noise": 0.61, "fog": 0.42},
    "ce": {"gaussian_noise": 0.6876, "fog": 0.5513},
    "errors": {"gaussian_noise": {"1": 0.4, "2": 0.5, "3": 0.6, "4": 0.7, "5": 0.85}},
}


@pytest.fixture(scope="module")
def evaluated(plain_and_cb_files) -> Path:
    """A real ``cbtool eval --json --density`` document for a tiny plain model and its CB twin, on real images."""
    from cbtool.cli.app import main

    folder = plain_and_cb_files
    with pytest.raises(SystemExit) as stop:
        main(["eval", str(folder / "plain.safetensors"), str(folder / "cb.safetensors"), "-d", "sample",
              "--limit", "20", "--density", "-j", "0", "-q", "--json", str(folder / "results.json")])
    assert stop.value.code in (0, None)
    return folder / "results.json"


class Cells(HTMLParser):
    """Every ``<td data-value>`` of each table (by id), as (data-key, data-value, text)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[tuple[str, object, str]]] = {}
        self.table, self.cell, self.text = None, None, ""
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = attrs.get("id")
            self.tables.setdefault(self.table, [])
        elif tag == "td" and "data-value" in attrs:
            self.cell, self.text = (attrs.get("data-key", ""), json.loads(attrs["data-value"])), ""
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_data(self, data):
        if self.cell is not None:
            self.text += data

    def handle_endtag(self, tag):
        if tag == "td" and self.cell is not None:
            self.tables[self.table].append((*self.cell, self.text))
            self.cell = None


def parse(html: str) -> Cells:
    cells = Cells()
    cells.feed(html)
    return cells


_KINDS = {"top1": "accuracy", "top5": "accuracy", "loss": "loss", "num_samples": "count", "model_images_per_s": "throughput",
          "end_to_end_images_per_s": "throughput", "entropy_mean": "entropy", "distance_mean": "distance"}


def check_numbers(cells: Cells, document: dict) -> None:
    """The metrics and density tables hold exactly the JSON's values, formatted as ``cbtool compare`` does."""
    metrics = cells.tables["metrics"]
    assert len(metrics) == 8 * len(document["models"])
    for row, model in enumerate(document["models"]):
        for key, value, text in metrics[8 * row : 8 * row + 8]:
            source = model["density"] if key.endswith("_mean") else (
                model["metrics"]["throughput"] if key.endswith("_per_s") else model["metrics"])
            assert value == source[key] and text == format_value(source[key], _KINDS[key]), key
    density = [(k, v, t) for k, v, t in cells.tables["density"] if k != "layer"]
    expected = [(f"{key}:{m['label']}", value, format_value(value, key.split("_")[0]))
                for layer in range(3) for key in ("entropy_per_layer", "distance_per_layer")
                for m in document["models"] for value in [m["density"][key][layer]]]
    assert sorted(map(str, density)) == sorted(map(str, expected))


def test_page_numbers_match_the_json_and_render_fast(evaluated, tmp_path):
    document = json.loads(evaluated.read_text())
    picture = tmp_path / "attn.png"
    from PIL import Image

    Image.new("RGB", (8, 4), "red").save(picture)
    start = time.perf_counter()
    html = report_page([(str(evaluated), document)], pictures=[picture])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"the page took {elapsed:.2f} s"
    cells = parse(html)
    check_numbers(cells, document)
    assert [src[:22] for src in cells.images] == ["data:image/png;base64,"]
    assert "<script" not in html and "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in html
    assert html.count("<svg") == 2 and "plain.safetensors" in html and "vit_tiny_patch16_224" in html  # provenance


def test_generic_tables_from_a_hand_made_record():
    html = generic_tables(ROBUSTNESS)
    cells = [(k, v) for k, v, _ in parse(f"<table id='r'></table>{html}").tables[None]]
    assert ("mce", 0.7321) in cells and ("ce:fog", 0.5513) in cells and ("mean_error:gaussian_noise", 0.61) in cells
    assert ("gaussian_noise:5", 0.85) in cells
    record = {**ROBUSTNESS, "correct": {"fog": {"1": "01" * 20}}}
    document = {"schema_version": 1, "dataset": {"name": "x", "num_samples": 40},
                "models": [{"label": "m", "metrics": {"top1": 50.0}, "robustness": {"mce": 0.5}},
                           {"label": "n", "metrics": {"top1": 50.0}, "robustness": record}]}
    page = report_page([("robust.json", document)])  # not records cbtool wrote: their averages, said to be partial
    averages = {key: value for key, value, _ in parse(page).tables["robustness-averages"]}
    assert averages["mce"] == 0.7321 and averages["n:fog:ce"] == 0.5513 and averages["n:gaussian_noise:mean_error"] == 0.61
    assert 'data-value="0.5"' in page and "only the averages" in page and "01" * 20 not in page


def robust_document(document: dict) -> dict:
    """``document`` (10-class sample) with robustness records made by cbtool's own ``robustness_record`` for its two
    models: all 19 corruptions, severities 1-5, a ``correct`` string per cell."""
    import copy
    import random

    from cbtool.robustness import CORRUPTIONS
    from cbtool.robustness.record import add_relative_to_first, robustness_record

    document = copy.deepcopy(document)
    records = []
    for index, model in enumerate(document["models"]):
        rng = random.Random(index)
        n = model["metrics"]["num_samples"]
        cells = {}
        for c in CORRUPTIONS:
            cells[c] = {}
            for s in range(1, 6):
                correct = "".join(rng.choice("01") for _ in range(n))
                cells[c][s] = {"top1": 100.0 * correct.count("1") / n, "correct": correct}
        records.append(robustness_record(cells, model["metrics"]["top1"], CORRUPTIONS, [1, 2, 3, 4, 5],
                                         dataset=document["dataset"]))
        model["robustness"] = records[-1]
    add_relative_to_first(records, [m["label"] for m in document["models"]])
    return document


def test_robustness_is_the_cli_table_and_plot(evaluated):
    """The section is the CLI's table (ImageNet-C order, errors per severity, the honest averages and the notes)
    and one chart per corruption; no per-sample vectors, no JSON keys or list indices."""
    from cbtool.robustness import CORRUPTIONS
    from cbtool.robustness.render import robustness_table

    document = robust_document(json.loads(evaluated.read_text()))
    html = report_page([(str(evaluated), document)])
    section = html[html.index('<div id="robustness">'):html.index("<h2>Provenance")]
    cells = parse(html).tables["robustness-table"]
    for model in document["models"]:
        record, label = model["robustness"], model["label"]
        shown = [key.split(":")[1] for key, _, _ in cells if key.startswith(f"{label}:") and key.endswith(":s1")]
        assert shown == list(CORRUPTIONS)  # ImageNet-C order, as the CLI
        for c in CORRUPTIONS:
            for s in range(1, 6):
                assert (f"{label}:{c}:s{s}", record["error"][c][str(s)], format_value(record["error"][c][str(s)])) in cells
            assert record["correct"][c]["1"] not in html  # per-sample vectors stay in the JSON
        assert (f"{label}:mean of 19 corruptions:mean", record["mean_corruption_error"],
                format_value(record["mean_corruption_error"])) in cells
    text = robustness_table(document["models"])
    for note in text.splitlines()[-4:]:
        assert escape(note) in section
    assert "CE and mCE in % of AlexNet" not in section and "has 10 classes, not ImageNet-1k" in section
    assert section.count("<svg") == 19 and "mean_corruption_error_over" not in section and ">18<" not in section
    # the 19 charts are meant to be compared: one y scale, so every chart has the same tick labels
    charts = re.findall(r"<svg.*?</svg>", section, flags=re.S)
    ticks = {tuple(re.findall(r'text-anchor="end">([^<]*)<', chart)) for chart in charts}
    assert len(ticks) == 1 and len(next(iter(ticks))) >= 3, ticks
    assert next(iter(ticks))[0] in ("0", "0.0", "0.00"), ticks  # from 0, as the CLI's plot


def test_write_is_atomic_and_bad_pictures_are_one_line(evaluated, tmp_path):
    document = json.loads(evaluated.read_text())
    out = tmp_path / "page.html"
    with pytest.raises(CbtoolError, match="cannot read picture"):
        write_report_page(out, [("r.json", document)], pictures=[tmp_path / "missing.png"])
    assert not out.exists()
    write_report_page(out, [("r.json", document)])
    assert out.read_text().startswith("<!DOCTYPE html>") and not list(tmp_path.glob(".page.html.*"))


def test_report_command(evaluated, tmp_path, main_cli):
    out = tmp_path / "report.html"
    code, err = main_cli("report", evaluated, "-o", out)
    assert code == 0 and out.is_file(), err
    for args in (["report", tmp_path / "missing.json", "-o", out.with_name("x.html")],
                 ["report", evaluated, "--pictures", tmp_path / "no.png", "-o", out.with_name("x.html")],
                 ["report", evaluated, "-o", tmp_path / "no-folder" / "x.html"]):
        code, err = main_cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert not out.with_name("x.html").exists()


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           *args], capture_output=True, text=True, timeout=120)


def console_problems(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


@needs_chromium
def test_console_check_sees_errors(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>throw new Error('boom')</script></body></html>")
    assert console_problems(chromium("--dump-dom", page.as_uri()).stderr)


@needs_chromium
def test_page_in_headless_chromium(evaluated, tmp_path):
    """The page renders in a real browser, without console errors, and the rendered DOM holds the JSON's numbers."""
    from PIL import Image

    import cbtool
    from cbtool.viz.figure import attention_figure

    document = json.loads(evaluated.read_text())
    picture = tmp_path / "attn.png"
    photo = Image.new("RGB", (32, 32), (120, 80, 40))
    attention_figure([cbtool.load(evaluated.with_name("plain.safetensors"))], [photo], picture)
    page = tmp_path / "report.html"
    document = robust_document(document)
    write_report_page(page, [(str(evaluated), document)], pictures=[picture])

    dumped = chromium("--dump-dom", page.as_uri())
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert not console_problems(dumped.stderr)
    cells = parse(dumped.stdout)
    check_numbers(cells, document)
    assert len(cells.images) == 1 and cells.images[0].startswith("data:image/png;base64,")

    shot = tmp_path / "shot.png"
    rendered = chromium("--window-size=1200,1800", f"--screenshot={shot}", page.as_uri())
    assert rendered.returncode == 0 and not console_problems(rendered.stderr)
    with Image.open(shot) as image:
        size, pixels = image.size, np.asarray(image.convert("RGB").resize((120, 180))).reshape(-1, 3)
    assert size == (1200, 1800) and len(np.unique(pixels, axis=0)) > 50  # tables, charts and the picture were drawn


def test_report_command_imports_no_torch(evaluated, tmp_path, cli_env):
    import sys

    code = ("import sys\nfrom cbtool.cli.app import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n"
            "    assert not stop.code, stop.code\n"
            "heavy = sorted(m for m in ('torch', 'timm', 'transformers', 'torchvision') if m in sys.modules)\n"
            "assert not heavy, heavy\nprint('clean')\n")
    out = tmp_path / "r.html"
    proc = subprocess.run([sys.executable, "-c", code, "report", str(evaluated), "-o", str(out)], env=cli_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "clean" in proc.stdout and out.is_file(), proc.stderr


@needs_chromium
def test_robustness_section_fits_the_page_in_chromium(evaluated, tmp_path):
    """Laid out by a real browser at 1200 px: nothing overflows to the right, the table text is readable, and the
    section of two models with 19 corruptions is a table and charts, not a 5,000 px dump."""
    document = robust_document(json.loads(evaluated.read_text()))
    probe = ("<script>const section = document.getElementById('robustness');"
             "const rights = [...section.querySelectorAll('*')].map(e => e.getBoundingClientRect().right);"
             "const td = section.querySelector('#robustness-table td');"
             "document.body.dataset.layout = JSON.stringify({view: document.documentElement.clientWidth,"
             " right: Math.max(...rights), height: section.getBoundingClientRect().height,"
             " font: parseFloat(getComputedStyle(td).fontSize)});</script></body>")
    page = tmp_path / "report.html"
    page.write_text(report_page([(str(evaluated), document)]).replace("</body>", probe))
    dumped = chromium("--window-size=1200,900", "--dump-dom", page.as_uri())
    assert dumped.returncode == 0 and not console_problems(dumped.stderr), dumped.stderr[-2000:]
    layout = json.loads(__import__("html").unescape(dumped.stdout.split('data-layout="')[1].split('"')[0]))
    assert layout["right"] <= layout["view"], layout  # every table cell, note and chart inside the viewport
    assert layout["font"] >= 12 and layout["height"] < 3500, layout


def test_robustness_charts_keep_each_models_page_colour(evaluated):
    """A model keeps its page colour in the robustness charts when the models before it have no record."""
    from cbtool.report.plotting import colour

    document = robust_document(json.loads(evaluated.read_text()))
    del document["models"][0]["robustness"]
    html = report_page([(str(evaluated), document)])
    section = html[html.index('<div id="robustness">'):html.index("<h2>Provenance")]
    strokes = set(re.findall(r'<polyline fill="none" stroke="([^"]+)"', section))
    assert strokes == {colour(1)}, strokes
