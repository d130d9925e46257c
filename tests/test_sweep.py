"""``cbtool sweep``: runs of a grid with the same recipe and data order per seed, resumed after Ctrl-C, a summary
equal to its run files and rebuilt by --summarize, subprocess and torchrun launching, and bad input.

Tiny ViTs (patch 7 on the 28 px ``sample`` images) and 3-step runs keep each sweep to seconds.
"""

from __future__ import annotations

import json
import signal
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbtool.sweep.plan import Cell, RunSpec, SweepPlan

MODEL = ["vit_tiny_patch16_224", "--no-pretrained", "--num-classes", "10", "--img-size", "28",
         "--model-kwargs", "patch_size=7", "embed_dim=32", "depth=2", "num_heads=2"]  # fmt: skip
QUICK = ["--dataset", "sample", "--limit", "200", "--val-limit", "60", "--steps", "3", "--batch-size", "32",
         "--workers", "0", "--eval-limit", "100", "--quiet"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cli(capsys):
    """``cli(*args)``: ``cbtool ARGS`` in this process -> (exit code, stdout, stderr)."""
    from cbtool.cli.app import main

    def run(*args) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def start_events(run: Path) -> list[dict]:
    return [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e["event"] in ("start", "resume")]


def test_sweep_pairs_runs_and_summarizes_them(tmp_path, cli, monkeypatch):
    """plain and cb of one seed start from the same weights and see the same batches; the summary is the eval files'
    mean and std, and --summarize rebuilds it."""
    import cbtool.train.loop as loop

    runners, batches = [], []  # per run (the runners are kept, so no two runs share an id)
    original = loop._train_step

    def spy(runner, family, iterator, *args):
        def recording():
            images, labels, index = next(iterator)
            if runner not in runners:
                runners.append(runner)
                batches.append([])
            batches[runners.index(runner)].append(index.tolist())
            yield images, labels, index

        return original(runner, family, recording(), *args)

    monkeypatch.setattr(loop, "_train_step", spy)
    out = tmp_path / "sweep"
    code, out_text, err = cli("sweep", *MODEL, *QUICK, "--variants", "plain,cb", "--seeds", "0,1", "-o", out, "--json")
    assert code == 0, err
    printed = json.loads(out_text)
    runs = out / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["cb-mlp-seed0", "cb-mlp-seed1", "plain-seed0", "plain-seed1"]
    order = batches  # runs in the plan's order: plain-seed0, cb-mlp-seed0, plain-seed1, cb-mlp-seed1
    assert order[0] == order[1] and order[2] == order[3] and order[0] != order[2]
    for seed in (0, 1):
        plain, cb = start_events(runs / f"plain-seed{seed}")[0], start_events(runs / f"cb-mlp-seed{seed}")[0]
        assert plain["data"] == cb["data"] and plain["config"]["seed"] == cb["config"]["seed"] == seed
        recipe = ("output", "run_dir", "run_info")  # run_info holds the CB options, which differ
        assert {k: v for k, v in plain["config"].items() if k not in recipe} == \
            {k: v for k, v in cb["config"].items() if k not in recipe}  # fmt: skip
    # the same initial weights: cb adds no parameters, and the seed draws the model before CB goes in
    a, b = (load_file(runs / name / "model.safetensors") for name in ("plain-seed0", "cb-mlp-seed0"))
    assert a.keys() == b.keys()

    summary = read_json(out / "summary.json")
    assert printed == summary
    top1 = {name: read_json(runs / name / "eval.json")["models"][0]["metrics"]["top1"] for name in
            ("plain-seed0", "plain-seed1", "cb-mlp-seed0", "cb-mlp-seed1")}  # fmt: skip
    cb_cell = summary["cells"][1]
    assert cb_cell["name"] == "cb-mlp" and cb_cell["seeds"] == [0, 1]
    assert cb_cell["metrics"]["top1"]["mean"] == pytest.approx((top1["cb-mlp-seed0"] + top1["cb-mlp-seed1"]) / 2)
    assert cb_cell["metrics"]["top1"]["std"] == pytest.approx(statistics.stdev([top1["cb-mlp-seed0"], top1["cb-mlp-seed1"]]))
    assert summary["cells"][0]["metrics"]["entropy_mean"]["mean"] is not None  # --density is on by default
    (comparison,) = summary["comparisons"]
    assert comparison["metrics"]["top1"]["difference"] == pytest.approx(
        (top1["cb-mlp-seed0"] - top1["plain-seed0"] + top1["cb-mlp-seed1"] - top1["plain-seed1"]) / 2)
    assert comparison["mcnemar"]["predictions"] == 200

    (out / "summary.json").unlink()
    code, out_text, err = cli("sweep", "--summarize", out, "--plot", tmp_path / "sweep.png")
    assert code == 0, err
    assert read_json(out / "summary.json") == summary
    assert "cb-mlp vs plain over 2 seeds: top-1" in out_text
    assert (tmp_path / "sweep.png").stat().st_size > 0


def test_interrupted_sweep_resumes_and_keeps_finished_runs(tmp_path, main_cli, monkeypatch):
    import cbtool.train.loop as loop

    original, steps = loop._train_step, []

    def ctrl_c_in_the_second_run(*args):
        steps.append(1)
        if len(steps) == 5:  # the second step of cb-mlp-seed0
            signal.raise_signal(signal.SIGINT)
        return original(*args)

    monkeypatch.setattr(loop, "_train_step", ctrl_c_in_the_second_run)
    out = tmp_path / "sweep"
    args = ["sweep", *MODEL, *QUICK[:-1], "--variants", "plain,cb", "--seeds", "0", "-o", out]
    code, err = main_cli(*args)
    assert code == 130, err
    assert "interrupted in run cb-mlp-seed0 at step 1; saved" in err and "run the same sweep command again" in err
    finished = out / "runs" / "plain-seed0" / "model.safetensors"
    stamp = finished.stat().st_mtime_ns
    assert not (out / "runs" / "cb-mlp-seed0" / "model.safetensors").exists()

    monkeypatch.setattr(loop, "_train_step", original)
    code, err = main_cli(*args)
    assert code == 0, err
    assert "run 1/2 plain-seed0: finished earlier, kept" in err
    assert "run 2/2 cb-mlp-seed0: resuming from its checkpoint" in err and "resuming at step 1 of 3 steps" in err
    assert finished.stat().st_mtime_ns == stamp
    assert [e["event"] for e in start_events(out / "runs" / "cb-mlp-seed0")] == ["start", "resume"]
    assert read_json(out / "summary.json")["missing"] == []

    # a run whose eval file is gone is evaluated again, without training
    (out / "runs" / "plain-seed0" / "eval.json").unlink()
    code, err = main_cli(*args)
    assert code == 0, err
    assert "run 1/2 plain-seed0: evaluating its model" in err and finished.stat().st_mtime_ns == stamp


def test_no_finetune_evaluates_models_as_built(tmp_path, cli):
    out = tmp_path / "sweep"
    code, out_text, err = cli("sweep", *MODEL, "--dataset", "sample", "--eval-limit", "50", "--workers", "0", "--quiet",
                         "--variants", "plain,cb", "--seeds", "0", "--no-finetune", "-o", out)  # fmt: skip
    assert code == 0, err
    runs = out / "runs"
    assert not (runs / "plain-seed0" / "checkpoint.pt").exists()
    a, b = (load_file(runs / name / "model.safetensors") for name in ("plain-seed0", "cb-mlp-seed0"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one seed, one model; only CB differs
    assert "A test over seeds needs 2 or more seeds" in out_text


BAD = [
    (["--variants", "plain,cbx"], "unknown variant 'cbx' in --variants: choose from plain, cb, cbs"),
    (["--seeds", "0,0"], "--seeds '0,0' names an item twice"),
    (["--seeds", ""], "--seeds '' has an empty item"),
    (["--positions", "head"], "unknown position 'head'"),
    (["--layers", "all,5"], "layer 5 is out of range for a model with 2 blocks"),
    (["--no-finetune", "--lr", "0.1"], "--lr needs training, and --no-finetune runs none"),
    (["--devices", "0", "--device", "cpu"], "give --device (one device for every run) or --devices"),
    (["--lr", "-1"], "--lr"),
    (["--epochs", "2"], "give --epochs or --steps, not both"),
    (["--scale-init", "0.1"], "--scale-init is for the learned scales of cbs; --variants has no cbs"),
    (["--cb-lr", "0.1"], "--cb-lr is for the learned scales of cbs; --variants has no cbs"),
    (["--variants", "plain", "--cb-ramp", "2"], "--cb-ramp raises the CB weight of the CB runs; --variants has only plain"),
    (["--cb-ramp", "3"], "--cb-ramp 3 leaves no step of the runs (3 steps) at the full CB weight"),
    (["--no-finetune", "--cb-ramp", "2"], "--cb-ramp needs training, and --no-finetune runs none"),
    (["--corruptions", "fog"], "corruptions need inputs of at least 32 x 32 px"),
    (["--train", "cb,head"], "--train cb,head trains the cbs scales, and the plain and cb runs have none"),
    (["--devices", "gpu1"], "--devices item 'gpu1' is not a GPU index or cpu"),
    (["--eval-split", "train"], "the runs would be evaluated on split 'train' of sample, which they train on"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[" ".join(e) or "empty" for e, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, main_cli, extra, message):
    out = tmp_path / "sweep"
    base = ["--dataset", "sample"] if "--no-finetune" in extra else QUICK  # QUICK trains
    code, err = main_cli("sweep", *MODEL, *base, "-o", out, *extra)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_folders_that_hold_something_else_are_refused(tmp_path, main_cli):
    plan = SweepPlan([Cell("plain")], [0], {"model": "m", "lr": 0.5}, {"dataset": "sample"})
    other = tmp_path / "other"
    (other / "runs" / "plain-seed0").mkdir(parents=True)
    (other / "runs" / "plain-seed0" / "checkpoint.pt").write_bytes(b"a run has started")
    (other / "sweep.json").write_text(json.dumps(plan.to_dict()))
    before = (other / "sweep.json").read_text()
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", other)
    assert code == 2 and "holds a different sweep (" in err and len(err.strip().splitlines()) == 1, err
    assert (other / "sweep.json").read_text() == before and sorted(p.name for p in other.iterdir()) == ["runs", "sweep.json"]
    # a sweep whose runs produced nothing yet (it failed at once) may be started again with other settings
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "sweep.json").write_text(json.dumps(plan.to_dict()))
    from cbtool.sweep.plan import claim_folder, read_plan
    from cbtool.sweep.start import make_plan

    new = make_plan("vit_tiny_patch16_224", "sample", variants="plain", seeds="0", steps=2)
    assert claim_folder(fresh, new) and read_plan(fresh).identity() == new.identity()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    code, err = main_cli("sweep", *MODEL, *QUICK, "-o", busy)
    assert code == 2 and "is not empty and holds no sweep" in err
    code, err = main_cli("sweep", "--summarize", busy)
    assert code == 2 and "holds no sweep (sweep.json is missing)" in err
    code, err = main_cli("sweep", "--summarize", other, "--epochs", "3")
    assert code == 2 and "--epochs does nothing with --summarize" in err
    code, err = main_cli("sweep", *MODEL, "--dataset", "sample")
    assert code == 2 and "give the sweep's folder with -o/--output" in err


def test_runs_are_never_evaluated_on_their_training_images(tmp_path, main_cli):
    """A folder without splits trains on 90% of itself: evaluating the whole folder would score training images."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    for label in ("a", "b"):
        (folder / label).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(np.full((28, 28, 3), 10 * i + (label == "b") * 100, dtype=np.uint8)).save(folder / label / f"{i}.png")
    model = [MODEL[0], "--no-pretrained", "--num-classes", "2", *MODEL[4:]]
    quick = ["--steps", "2", "--batch-size", "8", "--workers", "0", "--quiet"]
    out = tmp_path / "sweep"
    code, err = main_cli("sweep", *model, "--dataset", folder, *quick, "-o", out)
    assert code == 2 and f"the runs would be evaluated on {folder}, which they train on" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    # the same folder written another way is the same data
    code, err = main_cli("sweep", *model, "--dataset", folder, "--eval-dataset", f"{folder}/../images",
                         *quick, "-o", out)  # fmt: skip
    assert code == 2 and "which they train on" in err and not out.exists()


def test_a_ramp_longer_than_the_epochs_is_refused_before_any_run(tmp_path, main_cli):
    out = tmp_path / "sweep"
    # --limit 200 training images (after the hold-out), batch 32: 6 steps per epoch
    code, err = main_cli("sweep", *MODEL, "--dataset", "sample", "--limit", "200", "--batch-size", "32", "--epochs", "1",
                         "--cb-ramp", "6", "--quiet", "-o", out)  # fmt: skip
    assert code == 2 and "--cb-ramp 6 leaves no step of the runs (6 steps)" in err and not out.exists(), err


def test_a_second_start_of_a_running_sweep_is_refused(tmp_path, main_cli):
    from cbtool.sweep.start import folder_lock

    out = tmp_path / "sweep"
    code, err = main_cli("sweep", *MODEL, *QUICK, "--variants", "plain", "--seeds", "0", "-o", out)
    assert code == 0, err
    before = (out / "summary.json").read_text()
    with folder_lock(out):  # as if the first start were still running
        code, err = main_cli("sweep", *MODEL, *QUICK, "--variants", "plain", "--seeds", "0", "-o", out)
    assert code == 2 and f"another cbtool sweep is running in {out}" in err and len(err.strip().splitlines()) == 1
    assert (out / "summary.json").read_text() == before


def test_a_second_start_with_other_settings_leaves_the_plan_of_a_starting_sweep(tmp_path, main_cli):
    """The first start has recorded its plan and holds the lock, no run has produced anything yet: a second start
    with other settings is refused by the lock before it touches sweep.json (a sweep whose runs are all at their
    start may otherwise be started again with other settings)."""
    from cbtool.sweep.plan import claim_folder
    from cbtool.sweep.start import folder_lock, make_plan

    out = tmp_path / "sweep"
    first = make_plan("vit_tiny_patch16_224", "sample", variants="plain", seeds="0", steps=2)
    claim_folder(out, first)
    before = (out / "sweep.json").read_bytes()
    with folder_lock(out):  # the first start, still at its start
        code, err = main_cli("sweep", *MODEL, *QUICK, "--variants", "plain", "--seeds", "1", "-o", out)
    refusal = f"cbtool: error: another cbtool sweep is running in {out}; wait for it to end, or use another -o folder"
    assert code == 2 and err.strip() == refusal, err
    assert (out / "sweep.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "runs", "sweep.json"] and not any((out / "runs").iterdir())


def test_torchrun_processes_are_part_of_the_recipe():
    from cbtool.sweep.plan import first_difference
    from cbtool.sweep.start import make_plan

    one = make_plan("vit_tiny_patch16_224", "sample", seeds="0", steps=2)
    two = make_plan("vit_tiny_patch16_224", "sample", seeds="0", steps=2, processes=2)
    assert first_difference(one.identity(), two.identity()) == "processes 1 there, 2 here"


def test_cb_training_options_go_to_the_runs_with_cb(tmp_path):
    """--cb-ramp reaches the cb and cbs runs, --cb-lr and --scale-init only the cbs ones; plain trains as plain."""
    from cbtool.sweep import make_plan
    from cbtool.sweep.runner import finetune_options

    plan = make_plan("vit_tiny_patch16_224", "sample", variants="plain,cb,cbs", seeds="0", steps=10, cb_ramp=4,
                     cb_lr=0.05, scale_init=0.0)  # fmt: skip
    got = {run.name: finetune_options(plan, run, tmp_path, resume=False) for run in plan.runs}
    assert {name: (o["inject_cb"], o["cb_ramp"], o["cb_lr"], o["scale_init"]) for name, o in got.items()} == {
        "plain-seed0": (False, None, None, None),
        "cb-mlp-seed0": (True, 4, None, None),
        "cbs-mlp-seed0": (True, 4, 0.05, 0.0),
    }


def test_options_follow_finetune():
    """Every finetune option reaches a sweep, less the ones it sets per run; the --no-finetune check is generic."""
    import inspect

    from cbtool.cli.finetune import finetune_command
    from cbtool.cli.sweep import sweep_command
    from cbtool.sweep.start import OWNED, training_only

    from cbtool.train.options import option_defaults

    declared = inspect.signature(finetune_command, eval_str=True).parameters
    assert option_defaults() == {name: p.default for name, p in declared.items() if name != "ctx"}
    finetune = set(inspect.signature(finetune_command).parameters)
    sweep = set(inspect.signature(sweep_command).parameters)
    assert finetune - sweep == set(OWNED) - {"ctx", "output", "layers"}
    assert {"variants", "positions", "layers", "seeds", "devices", "torchrun", "summarize"} <= sweep
    assert {"lr", "epochs", "steps", "warmup_steps", "augment", "limit"} <= set(training_only())
    assert not {"model", "dataset", "batch_size", "device"} & set(training_only())


def test_devices_and_torchrun_launch_one_subprocess_per_slot(tmp_path):
    """--devices runs each run in a child with its slot's CUDA_VISIBLE_DEVICES; --torchrun wraps it in torchrun."""
    import sys

    from cbtool.sweep.runner import child_command, device_slots, run_in_subprocesses

    assert device_slots(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert device_slots(["cpu", "cpu"], None) == ["", ""]
    assert device_slots(None, 4) == [None]
    run = RunSpec(Cell("cb", "mlp", "all"), 1)
    assert child_command(tmp_path, run, 2) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "cbtool", "sweep", "-o", str(tmp_path), "--only", "cb-mlp-seed1"]  # fmt: skip

    plan = SweepPlan([Cell("plain"), Cell("cb", "mlp", "all")], [0, 1], {}, {"dataset": "sample", "corruptions": None})
    launched = []

    class Child:
        def __init__(self, command, env, **_):
            launched.append((command[command.index("--only") + 1], env.get("CUDA_VISIBLE_DEVICES"), command[:3]))
            folder = tmp_path / "runs" / command[command.index("--only") + 1]
            document = {"schema_version": 2, "dataset": {"num_samples": 10},
                        "models": [{"label": "m", "metrics": {"top1": 50.0, "loss": 1.0}}]}  # fmt: skip
            (folder / "eval.json").write_text(json.dumps(document))

        def wait(self):
            return 0

    notes = []
    run_in_subprocesses(plan, tmp_path, slots=device_slots(["0", "1", "2", "3"], 2), torchrun=2, note=notes.append,
                        launch=Child)  # fmt: skip
    assert sorted(name for name, *_ in launched) == ["cb-mlp-seed0", "cb-mlp-seed1", "plain-seed0", "plain-seed1"]
    assert {slot for _, slot, _ in launched} <= {"0,1", "2,3"}
    assert all(head[1:] == ["-m", "torch.distributed.run"] for *_, head in launched)
    assert sum("top-1 50.00%" in line for line in notes) == 4


@pytest.mark.slow
def test_devices_cpu_cpu_runs_in_subprocesses(tmp_path, main_cli, monkeypatch, cli_env):
    for key, value in {**cli_env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "sweep"
    code, err = main_cli("sweep", *MODEL, *QUICK[:-1], "--variants", "plain,cb", "--seeds", "0", "--devices", "cpu,cpu",
                         "-o", out)  # fmt: skip
    assert code == 0, err
    assert "run 1/2 plain-seed0: training on cpu" in err and "run 2/2 cb-mlp-seed0: top-1" in err
    assert (out / "runs" / "cb-mlp-seed0" / "sweep-run.log").exists()
    assert read_json(out / "summary.json")["missing"] == []


@pytest.mark.slow
def test_torchrun_runs_each_run_in_two_processes(tmp_path, main_cli, monkeypatch, cli_env):
    for key, value in {**cli_env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "sweep"
    code, err = main_cli("sweep", *MODEL, *QUICK, "--batch-size", "16", "--variants", "plain", "--seeds", "0",
                         "--torchrun", "2", "--device", "cpu", "-o", out)  # fmt: skip
    assert code == 0, err
    assert read_json(out / "runs" / "plain-seed0" / "checkpoint.json")["world_size"] == 2
    assert read_json(out / "summary.json")["cells"][0]["metrics"]["top1"]["n"] == 1


def test_the_data_note_is_said_once_and_the_outputs_are_announced(tmp_path, cli):
    """Every run holds out the same validation split: the note says so once, not once per run; the summary and
    the plot are announced as written."""
    out = tmp_path / "sweep"
    quick = [arg for arg in QUICK if arg != "--quiet"]
    code, _, err = cli("sweep", *MODEL, *quick, "--variants", "plain", "--seeds", "0,1", "--no-density", "-o", out,
                       "--plot", out / "sweep.png")
    assert code == 0, err
    assert err.count("has no validation split: holding out 10%") == 1, err
    assert f"wrote {out / 'summary.json'}" in err.splitlines() and f"wrote {out / 'sweep.png'}" in err.splitlines()
