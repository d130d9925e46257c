"""``cbtool finetune`` and ``cbtool.train.finetune``: recipe pieces, outputs, freezing, resume, torchrun, failures.

Tiny ViTs (patch 7 on the 28 px ``sample`` images: 16 tokens) and small class-balanced subsets keep every run
to seconds; the runs in fresh processes (kill and resume, torchrun, Ctrl-C) are marked slow.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cbtool.models.checkpoint import load, read_metadata, save
from cbtool.cli.app import main
from cbtool.errors import CbtoolError, TrainingError
from cbtool.optim import WarmupCosine, param_groups, parse_train_parts, select_trainable
from cbtool.models.resolve import resolve
from cbtool.spec import CBSpec
from cbtool.surgery import broadcast_parameters, inject
from cbtool.train import FinetuneConfig, finetune, resolve_training_data

TINY = dict(patch_size=7, embed_dim=32, depth=2, num_heads=2)
# A short, deterministic run: small subsets, no augmentation, one thread of data loading in the main process.
QUICK = ["--dataset", "sample", "--limit", "200", "--val-limit", "100", "--batch-size", "20", "--workers", "0",
         "--quiet"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def env(cli_env) -> dict[str, str]:
    """The environment for runs in fresh processes: one thread each, as in this process."""
    return {**cli_env, "OMP_NUM_THREADS": "1"}


def tiny_model(variant: str | None = "cb", num_classes: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    model = resolve("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=28, model_kwargs=TINY)
    if variant is not None:
        inject(model, CBSpec(variant=variant))
    return model


def tiny_file(path: Path, variant: str | None = "cb", num_classes: int = 10) -> Path:
    save(tiny_model(variant, num_classes), path)
    return path


def cli(*args) -> int:
    """``cbtool ARGS`` in this process, through ``main`` (one-line errors, exit codes)."""
    try:
        main([str(a) for a in args])
    except SystemExit as exited:
        return int(exited.code or 0)
    return 0


def python_cbtool(*args) -> list[str]:
    return [sys.executable, "-m", "cbtool", *map(str, args)]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"weights differ by up to {worst}"


# --------------------------------------------------------------------------------------------
# Recipe pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.25), (3, 1.0), (4, 1.0), (7, 0.5), (10, 0.0), (12, 0.0)],
)
def test_warmup_cosine(step, expected):
    schedule = WarmupCosine(peak=1.0, total=10, warmup=4)
    assert schedule(step) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    ("text", "parts", "error"),
    [
        ("all", ("all",), None),
        ("cb,head", ("cb", "head"), None),
        (" Norm , head,norm", ("norm", "head"), None),
        ("cb,bias", None, "unknown part 'bias'"),
        ("", None, "nothing chosen"),
        ("all,head", None, "already trains everything"),
    ],
)
def test_parse_train_parts(text, parts, error):
    if error:
        with pytest.raises(CbtoolError, match=error):
            parse_train_parts(text)
    else:
        assert parse_train_parts(text) == parts


@pytest.mark.parametrize(
    ("variant", "parts", "error"),
    [
        ("cbs", "cb", None),
        ("cbs", "cb,head", None),
        ("cb", "head,norm", None),
        ("cb", "cb", "variant 'cb' has no parameters"),
        (None, "cb", "has no Context Broadcasting"),
    ],
)
def test_select_trainable(variant, parts, error):
    model = tiny_model(variant)
    if error:
        with pytest.raises(CbtoolError, match=error):
            select_trainable(model, parts)
        return
    count = select_trainable(model, parts)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    expected = set()
    if "cb" in parts:
        expected |= {name for name, _ in model.named_parameters() if name.endswith(".cb.scale")}
    if "head" in parts:
        expected |= {"head.weight", "head.bias"}
    if "norm" in parts:
        expected |= {name for name, _ in model.named_parameters() if "norm" in name}
    assert names == expected


def test_weight_decay_groups_spare_norms_biases_cb_scales_and_embeddings():
    model = tiny_model("cbs")
    groups = param_groups(model, 0.05)
    names = {id(p): name for name, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] == 0.05 for p in g["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.mlp.cb.scale", "blocks.0.norm1.weight", "head.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.weight"} <= decay
    assert not decay & no_decay and len(decay | no_decay) == len(names)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(epochs=1, steps=5), "--epochs or --steps, not both"),
        (dict(batch_size=0), "--batch-size must be at least 1"),
        (dict(lr=-1.0), "--lr must be more than 0"),
        (dict(lr=float("nan")), "--lr must be more than 0, not nan"),
        (dict(weight_decay=-1.0), r"--weight-decay must be at least 0"),
        (dict(clip_grad=-1.0), r"--clip-grad must be at least 0"),
        (dict(min_lr=-1.0), r"--min-lr must be at least 0"),
        (dict(lr=1e-3, min_lr=1e-2), r"--min-lr must be in \[0, 0.001\]"),
        (dict(hflip=5.0), r"--hflip must be in \[0, 1\], not 5.0"),
        (dict(color_jitter=float("inf")), "--color-jitter must be at least 0, not inf"),
        (dict(label_smoothing=1.0), r"--label-smoothing must be in \[0, 1\)"),
        (dict(warmup_frac=1.0), "--warmup-frac"),
        (dict(scale=0.0), "--scale"),
        (dict(train="cb,everything"), "unknown part 'everything'"),
    ],
)
def test_config_validation(kwargs, error):
    with pytest.raises(CbtoolError, match=error):
        FinetuneConfig(**kwargs)


def _class_folder(root: Path, classes=("a", "b"), per_class: int = 10) -> Path:
    import numpy as np
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 20 * i + c, dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("kwargs", "val_split", "val_size", "noted"),
    [
        (dict(), "validation", 500, True),  # train and test only: hold out 10% of train, never select on test
        (dict(val_split="test"), "test", 1000, False),  # asked for
        (dict(val_fraction=0.2), "validation", 1000, False),  # held out of 5,000 train images
        (dict(val_split="train"), None, None, False),  # error: the training split
    ],
)
def test_validation_split_choice(kwargs, val_split, val_size, noted):
    if val_split is None:
        with pytest.raises(CbtoolError, match="is the training split"):
            resolve_training_data("sample", **kwargs)
        return
    train, val, note = resolve_training_data("sample", **kwargs)
    assert val.split == val_split and len(val) == val_size and (note is not None) == noted
    assert len(train) + (len(val) if val.split == "validation" else 0) == 5000


def test_a_folder_without_splits_holds_out_a_tenth(tmp_path):
    train, val, note = resolve_training_data(str(_class_folder(tmp_path / "data")))
    assert (len(train), len(val)) == (18, 2) and val.holdout["fraction"] == 0.1
    assert "no validation split: holding out 10%" in note


# --------------------------------------------------------------------------------------------
# The library function
# --------------------------------------------------------------------------------------------


def test_short_run_learns_real_images(tmp_path):
    train, val, _ = resolve_training_data("sample", limit=1000, val_limit=300)
    config = FinetuneConfig(epochs=4, batch_size=20, lr=2e-3, workers=0, quiet=True, run_dir=str(tmp_path / "run"))
    result = finetune(tiny_model(), train, val, config)
    assert result.final["num_samples"] == 300
    assert result.final["top1"] > 35.0, result.history  # chance is 10%; 55-60% seen
    assert [h["step"] for h in result.history] == [50, 100, 150, 200]
    assert result.best["top1"] == max(h["top1"] for h in result.history)
    assert not result.model.training
    assert result.summary["dataset"]["num_samples"] == 1000 and result.summary["steps"] == 200
    assert result.summary["augmentation"] is None  # 28 px inputs train on the eval transform by default
    import cbtool

    assert cbtool.finetune is finetune  # the lazy top-level export


def test_train_cb_head_freezes_everything_else(tmp_path):
    model = tiny_model("cbs")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val, _ = resolve_training_data("sample", limit=100, val_limit=50)
    config = FinetuneConfig(steps=4, batch_size=20, lr=1e-2, train="cb,head", workers=0, quiet=True,
                            run_dir=str(tmp_path / "run"))  # fmt: skip
    result = finetune(model, train, val, config)
    trainable = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.mlp.cb.scale" for i in range(2)} | {"head.weight", "head.bias"}
    after = result.model.state_dict()
    for name, value in after.items():
        if name in trainable:
            assert not torch.equal(value, before[name]), f"{name} did not train"
        else:
            assert torch.equal(value, before[name]), f"{name} changed although frozen"
    assert all(p.requires_grad for p in broadcast_parameters(result.model))


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, nan_loss_at):
    nan_loss_at(3)
    train, val, _ = resolve_training_data("sample", limit=100, val_limit=50)
    run = tmp_path / "run"
    config = FinetuneConfig(steps=5, batch_size=20, save_every=1, workers=0, quiet=True, run_dir=str(run),
                            output=str(tmp_path / "out.safetensors"))  # fmt: skip
    with pytest.raises(TrainingError, match=r"loss became nan at step 3 .*last good checkpoint is .*checkpoint\.pt"):
        finetune(tiny_model(), train, val, config)
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2
    assert read_log(run / "log.jsonl")[-1]["event"] == "error"
    assert not (tmp_path / "out.safetensors").exists()


def test_huge_lr_is_a_one_line_training_error(tmp_path, capsys):
    model = tiny_file(tmp_path / "tiny.safetensors")
    code = cli("finetune", model, *QUICK, "--steps", "6", "--lr", "1e30", "--warmup-steps", "0", "--save-every", "1",
               "--run-dir", tmp_path / "run", "-o", tmp_path / "out.safetensors")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and re.search(r"cbtool: error: the training loss became (nan|inf) at step \d", err[0]), err
    assert "lower --lr" in err[0] and (tmp_path / "run" / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# The command: outputs, metadata, log, heads, early checks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One short CLI run: (folder, output file, run folder, best file)."""
    folder = tmp_path_factory.mktemp("finished")
    model = tiny_file(folder / "tiny.safetensors", variant="cbs")
    output, run, best = folder / "tuned.safetensors", folder / "run", folder / "best.safetensors"
    code = cli("finetune", model, *QUICK, "--epochs", "2", "--lr", "2e-3", "--save-best", best, "--density",
               "--run-dir", run, "-o", output)  # fmt: skip
    assert code == 0
    return folder, output, run, best


def test_output_loads_with_training_metadata(finished_run):
    _, output, _, best = finished_run
    model = load(output)
    training = read_metadata(output)["cbtool_training"]
    assert model.cbtool_training == training
    assert training["dataset"]["name"] == "sample" and training["dataset"]["num_samples"] == 200
    # the sample has no validation split: 10% of train held out, never the test split
    assert training["val_dataset"]["split"] == "validation" and training["val_dataset"]["num_samples"] == 100
    assert training["val_dataset"]["holdout"]["fraction"] == 0.1
    assert training["steps"] == 20 and training["epochs"] == 2.0 and training["lr"] == 2e-3
    assert training["seed"] == 0 and training["world_size"] == 1 and training["batch_size"] == 20
    assert 0 <= training["final_top1"] <= 100 and training["best_top1"] >= training["final_top1"]
    assert read_metadata(output)["cbtool_spec"]["variant"] == "cbs"
    best_training = load(best).cbtool_training
    assert best_training["final_top1"] == training["best_top1"]
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_log_records_start_training_evals_and_end(finished_run):
    _, output, run, _ = finished_run
    records = read_log(run / "log.jsonl")
    events = [r["event"] for r in records]
    assert events[0] == "start" and events[-1] == "end"
    evals = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20] and [r["epoch"] for r in evals] == [1.0, 2.0]
    for record in evals:
        assert {"top1", "top5", "loss", "num_samples", "train_loss", "entropy_mean", "entropy_per_layer"} <= record.keys()
        assert record["num_samples"] == 100 and len(record["entropy_per_layer"]) == 2
    start = records[0]
    assert start["total_steps"] == 20 and start["steps_per_epoch"] == 10 and start["config"]["lr"] == 2e-3
    assert records[-1]["output"] == str(output)
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 20


def test_resume_refuses_other_settings(finished_run, capsys):
    _, _, run, _ = finished_run
    code = cli("finetune", "--resume", run, "--lr", "0.5")
    err = capsys.readouterr().err
    assert code == 2 and "this run started with --lr 0.002" in err


def test_default_run_folder_and_resuming_runs_last(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model = tiny_file(tmp_path / "tiny.safetensors")
    assert cli("finetune", model, *QUICK, "--steps", "2", "-o", "a.safetensors") == 0
    last = tmp_path / "runs" / "last"
    assert last.is_symlink() and re.fullmatch(r"\d{8}-\d{6}(-\d+)?", str(last.readlink()))
    assert (last / "checkpoint.pt").is_file() and (last / "log.jsonl").is_file()
    # Resuming a finished run trains no more; -o may change (a runtime option), the recipe may not.
    assert cli("finetune", "--resume", "runs/last", "-o", "b.safetensors") == 0
    assert_same_weights(load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors"))
    events = [r["event"] for r in read_log(last / "log.jsonl")]
    assert events == ["start", "eval", "end", "resume", "end"]  # no second eval record (with a train_loss of 0.0)
    # Its model exists: nothing to resume, said in one line (also with --force), and nothing written or logged.
    capsys.readouterr()
    before = (tmp_path / "b.safetensors").read_bytes(), (last / "log.jsonl").read_bytes()
    for force in ([], ["--force"]):
        assert cli("finetune", "--resume", "runs/last", "-o", "b.safetensors", *force) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is already finished (step 2 of 2) and its model b.safetensors exists" in err[0], err
    assert ((tmp_path / "b.safetensors").read_bytes(), (last / "log.jsonl").read_bytes()) == before


def test_head_replacement_is_announced_and_recorded(tmp_path, capsys):
    model = tiny_file(tmp_path / "five.safetensors", num_classes=5)
    output = tmp_path / "ten.safetensors"
    assert cli("finetune", model, *QUICK[:-1], "--steps", "2", "--run-dir", tmp_path / "run", "-o", output) == 0
    err = capsys.readouterr().err
    assert "the model's head has 5 classes and 'sample' has 10: replaced it with a new 10-class head" in err
    assert load(output).num_classes == 10
    assert read_metadata(output)["cbtool_source"]["model_kwargs"]["num_classes"] == 10


def test_inject_then_train_cb_and_head_from_a_timm_name(tmp_path, capsys):
    """--inject applies CB before training; with --train cb,head every other weight leaves as it was built."""
    output = tmp_path / "s.safetensors"
    kwargs = [f"{k}={v}" for k, v in TINY.items()]
    code = cli("finetune", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "28", "--model-kwargs", *kwargs,
               "--inject", "--variant", "cbs", "--layers", "1", "--train", "cb,head", *QUICK[:-1], "--steps", "3",
               "--lr", "1e-2", "--run-dir", tmp_path / "run", "-o", output)  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "replaced it with a new 10-class head" in err  # timm's default head has 1000 classes
    torch.manual_seed(0)  # the command seeds with --seed before building the model
    built = resolve("vit_tiny_patch16_224", pretrained=False, img_size=28, model_kwargs=TINY).state_dict()
    tuned = load_file(output)
    assert read_metadata(output)["cbtool_spec"] == {"variant": "cbs", "position": "mlp", "layers": "1", "scale_init": 0.5}
    assert set(tuned) - set(built) == {"blocks.1.mlp.cb.scale"}
    assert not torch.equal(tuned["blocks.1.mlp.cb.scale"], torch.full((32,), 0.5))
    for name, value in built.items():
        if not name.startswith("head."):
            assert torch.equal(tuned[name], value), name


def test_new_head_must_be_trained(tmp_path, capsys):
    model = tiny_file(tmp_path / "five.safetensors", variant="cbs", num_classes=5)
    code = cli("finetune", model, *QUICK, "--steps", "2", "--train", "cb", "--run-dir", tmp_path / "run",
               "-o", tmp_path / "out.safetensors")  # fmt: skip
    assert code == 2 and "new, untrained head; add it to --train (e.g. --train cb,head)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("exists", "already exists; pass --force"),
        ("no-folder", "does not exist; create it first"),
        ("best-is-output", "--save-best and --output name the same file"),
        ("train-cb-on-cb", "--train cb selects no parameters: its CB variant 'cb' has no parameters"),
        ("no-output", "give the output file with -o/--output"),
        ("both-lengths", "give --epochs or --steps, not both"),
    ],
)
def test_user_errors_come_before_training(tmp_path, capsys, case, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_file(tmp_path / "tiny.safetensors")
    output = tmp_path / "out.safetensors"
    extra = ["-o", output, "--steps", "2"]
    if case == "exists":
        output.write_text("keep me")
    elif case == "no-folder":
        extra = ["-o", tmp_path / "missing" / "out.safetensors", "--steps", "2"]
    elif case == "best-is-output":
        extra += ["--save-best", output]
    elif case == "train-cb-on-cb":
        extra += ["--train", "cb"]
    elif case == "no-output":
        extra = ["--steps", "2"]
    elif case == "both-lengths":
        extra += ["--epochs", "1"]
    code = cli("finetune", model, *QUICK, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder
    if case == "exists":
        assert output.read_text() == "keep me"


# --------------------------------------------------------------------------------------------
# Fresh processes: kill and resume, Ctrl-C, torchrun
# --------------------------------------------------------------------------------------------


def _wait_for_checkpoint(process: subprocess.Popen, info: Path, step: int, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if info.exists():
            try:
                seen = json.loads(info.read_text())["step"]
            except (json.JSONDecodeError, KeyError):
                seen = -1
            if seen >= step:
                return seen
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before a checkpoint at step {step}: "
                                 f"{process.stderr.read() if process.stderr else ''}")  # fmt: skip
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, env):
    """kill -9 after a checkpoint, --resume, and end with the weights of an uninterrupted run (augmentation on)."""
    model = tiny_file(tmp_path / "tiny.safetensors", variant="cbs")
    # 10 steps per epoch, so the kill, the resume and a validation fall in different epochs.
    common = [model, "--dataset", "sample", "--limit", "200", "--val-limit", "40", "--batch-size", "20",
              "--workers", "0", "--steps", "24", "--lr", "3e-3", "--augment", "--quiet"]  # fmt: skip
    straight = subprocess.run(python_cbtool("finetune", *common, "--run-dir", tmp_path / "a", "-o", tmp_path / "a.safetensors"),
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert straight.returncode == 0, straight.stderr

    run = tmp_path / "b"
    process = subprocess.Popen(
        python_cbtool("finetune", *common, "--save-every", "2", "--run-dir", run, "-o", tmp_path / "b.safetensors"),
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_checkpoint(process, run / "checkpoint.json", 2)
        process.kill()  # SIGKILL: no chance to clean up
    finally:
        process.wait(timeout=60)
    killed_at = json.loads((run / "checkpoint.json").read_text())["step"]
    assert 2 <= killed_at < 24 and not (tmp_path / "b.safetensors").exists()

    resumed = subprocess.run(python_cbtool("finetune", "--resume", run), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors"), atol=1e-6)
    events = [r["event"] for r in read_log(run / "log.jsonl")]
    assert events.count("start") == 1 and events.count("resume") == 1 and events[-1] == "end"


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, env):
    model = tiny_file(tmp_path / "tiny.safetensors")
    run = tmp_path / "run"
    process = subprocess.Popen(
        python_cbtool("finetune", model, *QUICK, "--limit", "1000", "--steps", "100000", "--save-every", "1",
                      "--run-dir", run, "-o", tmp_path / "out.safetensors"),
        env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_checkpoint(process, run / "checkpoint.json", 1)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, err
    lines = err.strip().splitlines()
    assert re.fullmatch(rf"cbtool: interrupted at step (\d+); saved .*checkpoint\.pt; resume with: "
                        rf"cbtool finetune --resume {re.escape(str(run))}", lines[-1]), lines  # fmt: skip
    step = int(re.search(r"step (\d+)", lines[-1]).group(1))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["state"]["step"] == step
    assert read_log(run / "log.jsonl")[-1]["event"] == "interrupted"


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, env):
    """2 ranks x batch 10 (gloo, CPU) against 1 process x batch 20: the same global batches, the same result."""
    model = tiny_file(tmp_path / "tiny.safetensors", variant="cbs")
    common = [model, "--dataset", "sample", "--limit", "200", "--val-limit", "60", "--workers", "0", "--steps", "8",
              "--lr", "2e-3", "--no-augment", "--quiet"]  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cbtool", "finetune", *map(str, common),
         "--batch-size", "10", "--run-dir", str(tmp_path / "two"), "-o", str(tmp_path / "two.safetensors")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(python_cbtool("finetune", *common, "--batch-size", "20", "--run-dir", tmp_path / "one",
                                       "-o", tmp_path / "one.safetensors"),
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr

    assert_same_weights(load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors"), atol=1e-5)
    t1, t2 = (read_metadata(tmp_path / f"{n}.safetensors")["cbtool_training"] for n in ("one", "two"))
    assert (t1["world_size"], t2["world_size"]) == (1, 2) and t1["batch_size"] == t2["batch_size"] == 20
    assert t2["final_loss"] == pytest.approx(t1["final_loss"], abs=1e-4)
    assert t2["val_dataset"]["num_samples"] == 60  # every validation image counted once over both ranks
    # only rank 0 writes: one log, one line per event
    events = [r["event"] for r in read_log(tmp_path / "two" / "log.jsonl")]
    assert events.count("start") == 1 and events.count("end") == 1


@pytest.mark.parametrize(("extra", "said"), [
    ([], "validation on 20 images held out of train (--val-fraction 0.1)"),
    (["--val-split", "test"], "validation on split test (20 images)"),
])  # fmt: skip
def test_the_banner_says_what_the_run_validates_on(tmp_path, capsys, extra, said):
    model = tiny_file(tmp_path / "tiny.safetensors")
    code = cli("finetune", model, "--dataset", "sample", "--limit", "40", "--val-limit", "20", "--batch-size", "20",
               "--workers", "0", "--steps", "1", *extra, "--run-dir", tmp_path / "run", "-o", tmp_path / "out.safetensors")
    err = capsys.readouterr().err
    assert code == 0, err
    banner = next(line for line in err.splitlines() if line.startswith("training for"))
    assert said in banner, banner
    assert ("note: 'sample' has no validation split: holding out 10%" in err) == (not extra)
