"""``cbtool report`` as a reader meets it: other samples refused (or flagged) as ``check`` does, ``check``'s p-value
and verdict beside each difference, no per-sample vectors, and a page that fits its window with legible pictures
(measured in headless Chromium)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from test_report import CB, PLAIN, model, results
from test_report_page import CHROMIUM, ROBUSTNESS, needs_chromium, parse

from cbtool.check import check_results, compare_results
from cbtool.errors import CbtoolError
from cbtool.report.page import report_page

SUBSET = results(model("plain", "1" * 28 + "0" * 2), sha="cd" * 32)  # the same model on 30 other images


def test_other_samples_are_refused_as_check_refuses_them(tmp_path, main_cli):
    documents = [("full.json", results(PLAIN)), ("subset.json", SUBSET)]
    with pytest.raises(CbtoolError) as refused:
        report_page(documents)
    with pytest.raises(CbtoolError) as checked:
        check_results(SUBSET, results(PLAIN), results_name="subset.json", baseline_name="full.json")
    assert str(refused.value) == str(checked.value)  # check's words and its flag
    assert "num_samples 30 vs 100" in str(refused.value) and "--allow-mismatch" in str(refused.value)
    full, subset = tmp_path / "full.json", tmp_path / "subset.json"
    full.write_text(json.dumps(results(PLAIN)))
    subset.write_text(json.dumps(SUBSET))
    out = tmp_path / "page.html"
    code, err = main_cli("report", full, subset, "-o", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--allow-mismatch" in err and not out.exists()
    code, err = main_cli("report", full, subset, "--allow-mismatch", "-o", out)
    assert code == 0, err
    html = out.read_text()
    warnings = [m.start() for m in re.finditer('<div class="warning"', html)]
    assert warnings and warnings[0] < html.index('id="metrics"')  # at the top, and again right above the differences
    assert html.rindex('<div class="warning"', 0, html.index('id="differences"')) > html.index('id="metrics"')
    assert "num_samples 100 vs 30" in html[warnings[-1] :]


def test_robustness_comparisons_stand_under_the_warning_too():
    robust = {**model("plain", "1" * 28 + "0" * 2), "robustness": {"mce": 0.5}}
    html = report_page([("full.json", results({**PLAIN, "robustness": {"mce": 0.7}})),
                        ("subset.json", results(robust, sha="cd" * 32))], allow_mismatch=True)
    section = html.index('id="robustness"')
    assert html.rindex('<div class="warning"', 0, section) > html.index('id="differences"')


@pytest.mark.parametrize("current, verdict", [
    (CB, "noise"),  # 90 -> 88: beyond check's 0.5-point bound, but not significant
    (model("worse", "0" * 30 + "1" * 60 + "0" * 10), "regression"),  # 90 -> 60, 30 discordant samples
    (model("same", "1" * 90 + "0" * 10), "ok"),
])
def test_differences_show_the_p_value_and_verdict_of_check_and_compare(current, verdict):
    documents = [("plain.json", results(PLAIN)), ("other.json", results(current))]
    cells = {key: (value, text) for key, value, text in parse(report_page(documents)).tables["differences"]}
    (expected,) = check_results(results(current), results(PLAIN)).checks
    assert expected.verdict == verdict
    assert cells["top1_p_value"][0] == expected.p_value == compare_results([d for _, d in documents]).p_values[0]
    html = report_page(documents)
    row = html[html.index('id="differences"') :].split("</tr>")[1]
    assert f">{verdict}<" in row and f">{expected.test}<" in row


def test_per_sample_vectors_never_appear_in_the_page():
    cells = {"gaussian_noise": {"1": "10" * 50}}
    robust = {**PLAIN, "robustness": {**ROBUSTNESS, "correct": cells}}
    html = report_page([("r.json", {**results(robust, CB), "robustness": {**ROBUSTNESS, "correct": cells}})])
    assert not re.search(r"[01]{20,}", html)  # neither top-1's nor a corruption cell's
    assert "gaussian_noise" in html and 'data-value="0.7321"' in html  # the rest of the robustness record stays


# ----- in a browser -----------------------------------------------------------------------------------------------
MEASURE = """<script>
addEventListener("load", () => {
  const root = document.documentElement;
  const images = [...document.querySelectorAll(".picture img")].map(i => [i.naturalWidth, i.getBoundingClientRect().width]);
  const boxes = [...document.querySelectorAll(".picture")].map(b => [b.clientWidth, b.scrollWidth]);
  const tables = [...document.querySelectorAll("table")].map(t => t.getBoundingClientRect().right);
  document.title = JSON.stringify({scrollWidth: root.scrollWidth, viewport: innerWidth, images, boxes, tables,
                                   caption: parseFloat(getComputedStyle(document.querySelector("figcaption")).fontSize)});
});
</script></body>"""


def browse(page: Path, width: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={page.parent / 'chromium-profile'}", f"--window-size={width},900", *args,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


def measure(page: Path, width: int) -> dict:
    """Layout figures of ``page`` in a ``width``-pixel window, written by a script into the title and dumped."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", MEASURE))
    dumped = browse(probe, width, "--virtual-time-budget=3000", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    title = re.search(r"<title>(.*?)</title>", dumped.stdout, re.S).group(1)
    return json.loads(title.replace("&quot;", '"'))


@pytest.fixture(scope="module")
def wide_page(plain_and_cb_files, tmp_path_factory) -> Path:
    """A page with two models' differences, a robustness record and a 2,000-pixel-wide attention picture."""
    from PIL import Image

    import cbtool
    from cbtool.viz.figure import VizOptions, attention_figure

    folder = tmp_path_factory.mktemp("page")
    models = [cbtool.load(plain_and_cb_files / name) for name in ("plain.safetensors", "cb.safetensors")]
    photos = [Image.new("RGB", (32, 32), (120, 80, 40)), Image.new("RGB", (32, 32), (20, 90, 160))]
    picture = folder / "attn.png"
    attention_figure(models, photos, picture, labels=["plain", "cb"],
                     options=VizOptions(layers="0,1,2", entropy=True, rollout=True))
    with Image.open(picture) as image:
        assert image.width > 2000
    long = {**model("cb-with-a-rather-long-label-to-widen-the-tables", "1" * 88 + "0" * 12), "robustness": ROBUSTNESS}
    page = folder / "report.html"
    page.write_text(report_page([("plain.json", results(PLAIN)), ("cb.json", results(long))], pictures=[picture]))
    return page


@needs_chromium
@pytest.mark.parametrize("width", [1200, 800])
def test_page_fits_its_window_and_pictures_keep_their_natural_size(wide_page, width):
    from cbtool.viz.pictures import TITLE_FONT

    found = measure(wide_page, width)
    assert found["viewport"] == width and found["scrollWidth"] <= width, found  # nothing overflows the page
    assert all(right <= width for right in found["tables"]), found
    ((natural, shown),) = found["images"]
    assert shown == natural  # before: shrunk to the page width, titles about 5 px
    assert TITLE_FONT * shown / natural >= 11  # the picture titles' text, in CSS pixels at 100% zoom
    ((box, content),) = found["boxes"]
    assert box < width and content == natural  # the picture scrolls sideways inside its own box
    assert found["caption"] >= 12


@needs_chromium
def test_page_screenshot_is_the_window_width(wide_page):
    from PIL import Image

    shot = wide_page.with_name("shot.png")
    rendered = browse(wide_page, 1200, f"--screenshot={shot}")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 900)
