"""Healing after surgery: the cbs scales' own learning rate (--cb-lr) and the CB weight ramp (--cb-ramp)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from cbtool.models.checkpoint import load
from cbtool.optim import param_groups, ramp_factor
from cbtool.models.resolve import resolve
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, set_ramp
from cbtool.train import FinetuneConfig, finetune, resolve_training_data
from cbtool.train.config import CB_LR

TINY = dict(patch_size=7, embed_dim=32, depth=2, num_heads=2)
TINY_ARGS = ["vit_tiny_patch16_224", "--no-pretrained", "--img-size", "28", "--model-kwargs", "patch_size=7",
             "embed_dim=32", "depth=2", "num_heads=2", "--dataset", "sample", "--limit", "100", "--batch-size", "20",
             "--workers", "0", "-q"]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def data():
    return resolve_training_data("sample", limit=100, val_limit=40)[:2]


def tiny(spec: CBSpec | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = resolve("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=28, model_kwargs=TINY)
    with torch.no_grad():  # no zero-initialised weights, so CB and its ramp change the output
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return inject(model, spec) if spec is not None else model


def config(tmp_path, name: str, **kwargs) -> FinetuneConfig:
    defaults = dict(batch_size=20, workers=0, quiet=True, run_dir=str(tmp_path / name), warmup_steps=0)
    return FinetuneConfig(**{**defaults, **kwargs})


# --------------------------------------------------------------------------------------------
# The ramp itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("step", "expected"), [(0, 0.0), (1, 0.25), (3, 0.75), (4, None), (9, None)])
def test_ramp_factor(step, expected):
    assert ramp_factor(step, 4) == expected
    assert ramp_factor(step, None) is None


@pytest.mark.parametrize("variant", ["cb", "cbs"])
def test_a_ramped_operation_mixes_by_the_factor(variant):
    model = tiny(CBSpec(variant, scale_init=0.3) if variant == "cbs" else CBSpec("cb"))
    (_, op), *_ = find_broadcasts(model)
    x = torch.randn(2, 17, 32)
    mean = x.mean(dim=1, keepdim=True)
    weight = 0.5 if variant == "cb" else 0.3
    for factor in (0.0, 0.4, 1.0):
        op.set_ramp(factor)
        expected = x + factor * weight * (mean - x)  # written out by hand
        assert torch.allclose(op(x), expected, atol=1e-6)
    op.set_ramp(None)
    assert not op.ramping and torch.allclose(op(x), x + weight * (mean - x), atol=1e-6)


def test_ramp_zero_is_the_plain_model_and_one_is_full_cb(images):
    plain, model = tiny(), tiny(CBSpec("cb"))
    x = images(28)
    with torch.no_grad():
        full = model(x)
        set_ramp(model, 0.0)
        assert torch.equal(model(x), plain(x))
        set_ramp(model, 1.0)
        assert torch.allclose(model(x), full, atol=1e-6)
        set_ramp(model, None)
        assert torch.equal(model(x), full) and not (full - plain(x)).abs().max() < 1e-3
    assert not any("ramp" in key for key in model.state_dict())  # files keep their keys
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        set_ramp(model, 1.5)


# --------------------------------------------------------------------------------------------
# --cb-lr: the cbs scales learn at their own rate
# --------------------------------------------------------------------------------------------


def test_scales_get_a_group_of_their_own():
    model = tiny(CBSpec("cbs"))
    groups = param_groups(model, 0.05, cb_lr_scale=100.0)
    own = [g for g in groups if "lr_scale" in g]
    assert len(own) == 1 and own[0]["lr_scale"] == 100.0 and own[0]["weight_decay"] == 0.0
    assert {id(p) for p in own[0]["params"]} == {id(op.scale) for _, op in find_broadcasts(model)}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert not any("lr_scale" in g for g in param_groups(model, 0.05))  # without it: as before


def test_one_step_moves_scales_by_cb_lr_and_weights_by_lr(tmp_path, data):
    """Adam's first step moves every parameter with a gradient by its group's learning rate (times its sign)."""
    model = tiny(CBSpec("cbs"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, *data, config(tmp_path, "run", steps=1, lr=1e-5, cb_lr=3e-2, weight_decay=0.0,
                                           clip_grad=None))  # fmt: skip
    after = result.model.state_dict()
    scale_steps = torch.cat([(after[k] - before[k]).abs().flatten() for k in after if k.endswith("cb.scale")])
    assert scale_steps.max().item() == pytest.approx(3e-2, rel=1e-3)
    head_step = (after["head.bias"] - before["head.bias"]).abs().max().item()
    assert head_step == pytest.approx(1e-5, rel=1e-2)
    assert result.summary["cb_lr"] == 3e-2


def test_default_cb_lr_lets_the_scales_leave_zero(tmp_path, data):
    """A trained model healed at lr 1e-5: at that rate the scales stay at 0; at their own default they move."""
    moved = {}
    for name, cb_lr in (("shared", 1e-5), ("default", None)):
        model = tiny(CBSpec("cbs", scale_init=0.0))
        result = finetune(model, *data, config(tmp_path, name, steps=10, lr=1e-5, cb_lr=cb_lr))
        moved[name] = max(op.scale.abs().max().item() for _, op in find_broadcasts(result.model))
        assert result.summary["cb_lr"] == (cb_lr or CB_LR)
    assert moved["shared"] < 2e-4 < 1e-2 < moved["default"]


def test_cb_lr_needs_trainable_scales(tmp_path, data):
    from cbtool.errors import CbtoolError

    with pytest.raises(CbtoolError, match="no cbs scale trains here"):
        finetune(tiny(CBSpec("cb")), *data, config(tmp_path, "a", steps=1, cb_lr=1e-2))
    with pytest.raises(CbtoolError, match="no cbs scale trains here"):
        finetune(tiny(CBSpec("cbs")), *data, config(tmp_path, "b", steps=1, cb_lr=1e-2, train="head"))
    result = finetune(tiny(CBSpec("cb")), *data, config(tmp_path, "c", steps=1))
    assert result.summary["cb_lr"] is None


# --------------------------------------------------------------------------------------------
# --cb-ramp in training
# --------------------------------------------------------------------------------------------


def test_ramped_healing_starts_from_the_plain_model(tmp_path, data, monkeypatch):
    """The first step of a ramped cb model is the plain model's step: same weights after it; without the ramp not."""
    import cbtool.train.loop as loop

    real = loop._train_step

    def first_step(model, name, **options):
        after = []

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            after.append({k: v.clone() for k, v in model.state_dict().items()})
            return out

        monkeypatch.setattr(loop, "_train_step", spy)
        finetune(model, *data, config(tmp_path, name, steps=2, lr=1e-3, **options))
        return after[0]

    plain = first_step(tiny(), "plain")
    ramped = first_step(tiny(CBSpec("cb")), "ramped", cb_ramp=1)
    assert all(torch.equal(plain[k], v) for k, v in ramped.items())
    unramped = first_step(tiny(CBSpec("cb")), "full")
    assert not all(torch.equal(plain[k], v) for k, v in unramped.items())


def test_ramp_rises_per_step_and_the_saved_model_has_full_cb(tmp_path, data, images):
    out = tmp_path / "out.safetensors"
    result = finetune(tiny(CBSpec("cb")), *data, config(tmp_path, "run", steps=6, lr=1e-3, cb_ramp=4, log_every=1,
                                                         eval_every=2, output=str(out)))  # fmt: skip
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["cb_ramp"] for r in log if r["event"] == "train"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert result.summary["cb_ramp"] == 4
    # Mid-ramp validations are logged but are not "best": a saved model always has the full weight.
    evals = [r["step"] for r in log if r["event"] == "eval"]
    assert evals[:2] == [2, 4] and evals[-1] == 6
    assert result.best["step"] >= 4
    assert not any(op.ramping for _, op in find_broadcasts(result.model))
    loaded = load(out).eval()
    assert not any(op.ramping for _, op in find_broadcasts(loaded))
    x = images(28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), result.model(x), atol=1e-6)


def test_resume_continues_the_ramp(tmp_path, data, nan_loss_at):
    """Stopped at step 3 of a 6-step ramp, resumed: the same weights as a straight run."""
    from cbtool.errors import TrainingError

    straight = finetune(tiny(CBSpec("cb")), *data, config(tmp_path, "a", steps=6, lr=1e-3, cb_ramp=5))
    nan_loss_at(4)

    with pytest.raises(TrainingError):
        finetune(tiny(CBSpec("cb")), *data, config(tmp_path, "b", steps=6, lr=1e-3, cb_ramp=5, save_every=1))
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 3 and saved["state"]["cb_ramp"] == pytest.approx(0.6)
    nan_loss_at(None)
    from cbtool.errors import CbtoolError

    with pytest.raises(CbtoolError, match=r"--cb-ramp 5 -> 4"):
        finetune(tiny(CBSpec("cb")), *data, config(tmp_path, "b", steps=6, lr=1e-3, cb_ramp=4, resume=str(tmp_path / "b")))
    resumed = finetune(tiny(CBSpec("cb"), seed=1), *data,
                       config(tmp_path, "b", steps=6, lr=1e-3, cb_ramp=5, resume=str(tmp_path / "b")))  # fmt: skip
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resumed_cbs_run_keeps_its_scale_rate(tmp_path, data, monkeypatch, nan_loss_at):
    """A cbs run stopped and resumed (here with another backbone lr) trains its scales at --cb-lr all along."""
    import cbtool.train.loop as loop
    from cbtool.errors import TrainingError

    common = dict(steps=4, lr=1e-3, cb_lr=2e-2, warmup_steps=0, save_every=1)
    nan_loss_at(3)
    with pytest.raises(TrainingError):
        finetune(tiny(CBSpec("cbs")), *data, config(tmp_path, "run", **common))
    nan_loss_at(None)
    groups = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g.get("lr_scale") for g in groups] == [None, None, pytest.approx(20.0)]
    seen = []
    real_step = loop._train_step

    def spy(runner, family, batches, optimizer, *args, **kwargs):
        out = real_step(runner, family, batches, optimizer, *args, **kwargs)
        seen.append([g["lr"] for g in optimizer.param_groups])
        return out

    monkeypatch.setattr(loop, "_train_step", spy)
    resumed = {**common, "lr": 1e-4, "resume": str(tmp_path / "run")}
    finetune(tiny(CBSpec("cbs")), *data, config(tmp_path, "run", **resumed))
    schedule = [0.5 * (1 + math.cos(math.pi * step / 4)) for step in (2, 3)]  # cosine, no warmup, 4 steps
    for lrs, factor in zip(seen, schedule):
        assert lrs == pytest.approx([1e-4 * factor, 1e-4 * factor, 2e-2 * factor])


def test_a_run_saved_before_cb_lr_resumes_with_the_shared_rate(tmp_path, data, monkeypatch, nan_loss_at):
    """Checkpoints from before --cb-lr hold two groups (the scales among the undecayed ones): they still resume."""
    import cbtool.train.prepare as prepare
    from cbtool.errors import TrainingError

    real_groups = prepare.param_groups
    monkeypatch.setattr(prepare, "param_groups", lambda model, wd, cb_lr_scale=None: real_groups(model, wd))
    nan_loss_at(2)
    with pytest.raises(TrainingError):
        finetune(tiny(CBSpec("cbs")), *data, config(tmp_path, "old", steps=3, lr=1e-3, save_every=1))
    nan_loss_at(None)
    monkeypatch.setattr(prepare, "param_groups", real_groups)
    path = tmp_path / "old" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    old_config = json.loads(saved["config"])
    for key in ("cb_lr", "cb_ramp"):
        del old_config[key]
    saved["config"] = json.dumps(old_config)
    torch.save(saved, path)
    result = finetune(tiny(CBSpec("cbs")), *data, config(tmp_path, "old", steps=3, lr=1e-3, resume=str(tmp_path / "old")))
    assert result.step == 3 and result.summary["cb_lr"] is None
    saved["optimizer"]["param_groups"] = saved["optimizer"]["param_groups"][:1]  # a foreign layout: one line
    torch.save(saved, path)
    from cbtool.errors import CbtoolError

    with pytest.raises(CbtoolError, match="does not hold this run's parameter groups"):
        finetune(tiny(CBSpec("cbs")), *data, config(tmp_path, "old", steps=3, lr=1e-3, resume=str(tmp_path / "old")))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["--cb-ramp", "4", "--steps", "2"], "has none; add --inject"),
    (["--inject", "--cb-ramp", "4", "--steps", "2"], "--cb-ramp 4 leaves no step of the run (2 steps) at the full"),
    (["--inject", "--cb-ramp", "2", "--steps", "2"], "--cb-ramp 2 leaves no step of the run (2 steps) at the full"),
    (["--inject", "--cb-lr", "0.01", "--steps", "1"], "no cbs scale trains here"),
    (["--inject", "--variant", "cbs", "--cb-lr", "0", "--steps", "1"], "--cb-lr must be"),
    (["--inject", "--variant", "cbs", "--cb-lr", "nan", "--steps", "1"], "--cb-lr must be"),
    (["--inject", "--cb-ramp", "0", "--steps", "1"], "usage: Invalid value for '--cb-ramp'"),
])
def test_bad_healing_options_are_one_line(main_cli, tmp_path, args, message):
    out = tmp_path / "m.safetensors"
    code, stderr = main_cli("finetune", *TINY_ARGS, *args, "--run-dir", tmp_path / "run", "-o", out)
    if message.startswith("usage: "):  # Typer's own range check keeps its short usage box
        assert code == 2 and message.removeprefix("usage: ") in stderr
    else:
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not out.exists()


def test_cli_heals_with_ramp_and_cb_lr(main_cli, tmp_path):
    out = tmp_path / "m.safetensors"
    code, stderr = main_cli("finetune", *TINY_ARGS, "--inject", "--variant", "cbs", "--scale-init", "0",
                            "--cb-ramp", "2", "--cb-lr", "0.05", "--steps", "3", "--run-dir", tmp_path / "run",
                            "-o", out)  # fmt: skip
    assert code == 0, stderr
    scales = [v for k, v in load_file(out).items() if k.endswith("cb.scale")]
    assert len(scales) == 2 and max(s.abs().max().item() for s in scales) > 1e-2
    info = json.loads((tmp_path / "run" / "checkpoint.json").read_text())
    assert info["run_info"]["cb_ramp"] == 2 and info["run_info"]["cb_lr"] == 0.05
