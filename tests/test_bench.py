"""``cbtool bench`` and ``cbtool.benchmark``: the record's structure and arithmetic, never wall-clock bounds."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cbtool.cli.app import app, main
from cbtool.results import SCHEMA_VERSION

TINY = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", "32",
        "--model-kwargs", "patch_size=8", "--model-kwargs", "depth=2"]
FAST = ["--repeats", "3", "--warmup", "1", "--batch-size", "2"]
TIMING_KEYS = {"median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms", "images_per_s", "times_ms"}


def check_record(record: dict, *, repeats: int = 3, batch_size: int = 2, input_size=(3, 32, 32), variant="cb") -> None:
    assert record["kind"] == "cbtool-bench" and record["schema_version"] == SCHEMA_VERSION  # one version for every cbtool JSON document
    assert record["cb_spec"]["variant"] == variant
    assert record["device"] == "cpu" and record["device_name"]
    assert record["torch_version"] and record["threads"] >= 1
    assert record["batch_size"] == batch_size and record["input_size"] == list(input_size)
    assert record["repeats"] == repeats and record["number"] >= 1 and record["clock"] in ("wall", "cpu")
    for name in ("plain", "cb"):
        timing = record[name]
        assert set(timing) == TIMING_KEYS
        assert len(timing["times_ms"]) == repeats and all(t > 0 for t in timing["times_ms"])
        assert 0 < timing["min_ms"] <= timing["q1_ms"] <= timing["median_ms"] <= timing["q3_ms"] <= timing["max_ms"]
        assert math.isclose(timing["images_per_s"], batch_size * 1000 / timing["median_ms"])
    assert record["ratio"] > 0
    assert math.isclose(record["ratio"], record["cb"]["median_ms"] / record["plain"]["median_ms"])
    assert 0 < record["paired_ratio_q1"] <= record["paired_ratio_q3"]


def test_cli_in_process_and_report_replaced(tmp_path):
    out = tmp_path / "out.json"
    args = ["bench", *TINY, *FAST, "--json", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    check_record(json.loads(out.read_text()))
    assert "ratio cb/plain" in result.stdout and "median ms" in result.stdout
    assert "repeat 3/3" in result.stderr and "wrote" in result.stderr

    out.write_text("old")  # reports are replaced (atomically), like eval's and check's
    assert CliRunner().invoke(app, [*args, "--quiet", "--number", "1"]).exit_code == 0
    check_record(json.loads(out.read_text()))
    missing = CliRunner().invoke(app, ["bench", *TINY, *FAST, "--json", str(tmp_path / "nope" / "out.json")])
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception)


def test_cli_subprocess_quiet(run_cli, tmp_path):
    completed = run_cli("bench", *TINY, *FAST, "--number", "2", "--variant", "cbs", "--layers", "-1",
                        "--clock", "cpu", "--threads", "1", "--json", "out.json", "--quiet")
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "ratio cbs/plain" in completed.stdout
    record = json.loads((tmp_path / "out.json").read_text())
    check_record(record, variant="cbs")
    assert record["cb_spec"]["layers"] == "-1" and record["number"] == 2
    assert record["clock"] == "cpu" and record["threads"] == 1


def test_library_on_tiny_model(timm_model):
    from cbtool.benchmark import measure_overhead
    from cbtool.spec import CBSpec
    from cbtool.surgery import find_broadcasts

    model = timm_model(depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    messages = []
    result = measure_overhead(model, CBSpec(position="attn"), batch_size=2, repeats=4, warmup=1, number=2,
                              progress=messages.append)
    check_record(result.to_dict(), repeats=4)
    assert json.loads(result.to_json()) == result.to_dict()
    assert result.number == 2 and result.model == "vit_tiny_patch16_224"
    assert result.cb_spec["position"] == "attn"
    # The caller's model stays plain and keeps its weights; CB went into a copy.
    assert find_broadcasts(model) == []
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
    assert any("repeat 4/4" in m for m in messages)
    assert "ratio cb/plain" in result.table() and "batch 2 x 3x32x32" in result.describe()


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"amp": True}, {"amp": True, "amp_dtype": "bfloat16"}),
        ({"amp": True, "amp_dtype": "float16"}, {"amp": True, "amp_dtype": "float16"}),
        ({"channels_last": True}, {"channels_last": True, "amp_dtype": None}),
        ({"input_size": (3, 48, 48)}, {"input_size": [3, 48, 48]}),
        ({"clock": "cpu", "threads": 1}, {"clock": "cpu", "threads": 1}),
    ],
)
def test_library_options(timm_model, options, expected):
    import torch

    from cbtool.benchmark import measure_overhead

    model = timm_model(depth=1, dynamic_img_size=True)
    threads = torch.get_num_threads()
    record = measure_overhead(model, batch_size=2, repeats=2, warmup=0, number=1, **options).to_dict()
    assert torch.get_num_threads() == threads  # a threads option is undone
    assert {key: record[key] for key in expected} == expected
    assert math.isclose(record["ratio"], record["cb"]["median_ms"] / record["plain"]["median_ms"])


def test_max_seconds_stops_early_but_not_below_the_minimum(timm_model):
    from cbtool.benchmark import MIN_REPEATS, measure_overhead

    result = measure_overhead(timm_model(depth=1), batch_size=1, repeats=50, warmup=0, number=1, max_seconds=1e-9)
    assert result.repeats == MIN_REPEATS == len(result.plain.times_ms) == len(result.cb.times_ms)


@pytest.mark.parametrize(
    "values, expected",
    [([5.0], (5.0, 5.0, 5.0)), ([1.0, 3.0], (1.5, 2.0, 2.5)), ([4.0, 1.0, 3.0, 2.0, 5.0], (2.0, 3.0, 4.0))],
)
def test_quartiles(values, expected):
    from cbtool.benchmark import quartiles

    assert quartiles(values) == pytest.approx(expected)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"repeats": 0}, "repeats must be at least 1"),
        ({"number": 0}, "number must be at least 1"),
        ({"max_seconds": 0}, "max_seconds must be positive"),
        ({"threads": 0}, "threads must be at least 1"),
        ({"clock": "gpu"}, "unknown clock 'gpu'"),
        ({"input_size": (32, 32)}, "(channels, height, width)"),
        ({"amp_dtype": "bfloat16"}, "amp_dtype needs amp=True"),
        ({"amp": True, "amp_dtype": "int8"}, "unknown amp dtype"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_library_rejects_bad_options(timm_model, options, message):
    from cbtool.benchmark import measure_overhead
    from cbtool.errors import CbtoolError

    with pytest.raises(CbtoolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        measure_overhead(timm_model(depth=1), batch_size=1, **options)


def test_library_refuses_models_it_cannot_measure(timm_model):
    import timm

    from cbtool.benchmark import measure_overhead
    from cbtool.errors import CbtoolError, UnsupportedModelError
    from cbtool.surgery import inject

    with pytest.raises(UnsupportedModelError, match="already has Context Broadcasting"):
        measure_overhead(inject(timm_model(depth=1)), batch_size=1)
    bare = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    with pytest.raises(CbtoolError, match="cannot tell the input size"):
        measure_overhead(bare, batch_size=1)


@pytest.fixture
def cb_file(tmp_path, timm_model):
    from cbtool.models.checkpoint import save
    from cbtool.surgery import inject

    path = tmp_path / "cb.safetensors"
    save(inject(timm_model(depth=1)), path)
    return path


def test_cli_accepts_a_plain_cbtool_file(tmp_path, timm_model):
    from cbtool.models.checkpoint import save

    path = tmp_path / "plain.safetensors"
    save(timm_model(depth=1), path)
    out = tmp_path / "out.json"
    args = ["bench", str(path), "--repeats", "2", "--warmup", "0", "--number", "1", "--batch-size", "1",
            "--json", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    check_record(json.loads(out.read_text()), repeats=2, batch_size=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["vit_tinny_patch16_224", "--no-pretrained"], "unknown model 'vit_tinny_patch16_224'"),
        (["{cb_file}"], "already has Context Broadcasting (cb at mlp, layers all); bench injects CB itself"),
        ([*TINY, "--layers", "5"], "layer 5 is out of range for a model with 2 blocks"),
        ([*TINY, "--variant", "cbx"], "unknown variant 'cbx'"),
        ([*TINY, "--json", "{missing}/out.json"], "does not exist"),
        ([*TINY, "--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, cb_file, tmp_path, capsys):
    args = [a.format(cb_file=cb_file, missing=tmp_path / "missing") for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", *args, *FAST, "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cbtool: error: ") and message in err


def test_bench_does_not_import_torch_until_run():
    code = "import sys, cbtool.cli.bench; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
