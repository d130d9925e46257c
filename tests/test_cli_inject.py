"""``cbtool inject`` and ``cbtool info``: user errors through a real process, successes through ``main``."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cbtool.models.checkpoint import load, read_header, save
from cbtool.cli.app import expand_multi_value_options, main
from cbtool.models.resolve import parse_model_kwargs, resolve
from cbtool.spec import CBSpec
from cbtool.surgery import find_broadcasts, inject, spec_of

OUT = "out.safetensors"
TINY = ["img_size=32", "patch_size=8", "embed_dim=32", "depth=3", "num_heads=2", "num_classes=5"]

# id: (arguments after `cbtool`, regex the one stderr line must match, seconds allowed or None)
ERROR_CASES = {
    "unknown-name": (["inject", "vit_tinny_patch16_224", "--no-pretrained", "-o", OUT],
                     r"unknown model 'vit_tinny_patch16_224'.*did you mean .*vit_tiny_patch16_224", None),
    "resnet50": (["inject", "resnet50", "--no-pretrained", "-o", OUT],
                 r"ResNet \(timm.models.resnet\) is not a model class cbtool supports.*`cbtool families`", None),
    "missing-checkpoint": (["inject", "vit_tiny_patch16_224", "--model-kwargs", *TINY, "--checkpoint", "nope.pth",
                            "-o", OUT],
                           r"checkpoint nope\.pth does not exist", None),
    "missing-model-file": (["inject", "nope.safetensors", "-o", OUT], r"nope\.safetensors does not exist", None),
    "info-missing-file": (["info", "nope.safetensors"], r"nope\.safetensors does not exist", None),
    "info-random-bytes": (["info", "random.safetensors"], r"random\.safetensors is not a safetensors file", None),
    "model-random-bytes": (["inject", "random.safetensors", "-o", OUT],
                           r"random\.safetensors is not a safetensors file", None),
    "info-truncated": (["info", "truncated.safetensors"], r"truncated\.safetensors is truncated or corrupt", None),
    "model-truncated": (["inject", "truncated.safetensors", "-o", OUT],
                        r"truncated\.safetensors is truncated or corrupt", None),
    "model-plain-file": (["inject", "plain.safetensors", "-o", OUT],
                         r"plain safetensors file without cbtool metadata.*--checkpoint plain\.safetensors", None),
    "info-garbled-metadata": (["info", "garbled.safetensors"],
                              r"garbled cbtool metadata \(cbtool_source is not valid JSON\)", None),
    "model-garbled-metadata": (["inject", "garbled.safetensors", "-o", OUT],
                               r"garbled cbtool metadata \(cbtool_source is not valid JSON\)", None),
    "output-folder-missing": (["inject", "vit_tiny_patch16_224", "--no-pretrained", "-o", "missing/out.safetensors"],
                              r"output folder missing does not exist; create it first", None),
    "output-exists": (["inject", "vit_tiny_patch16_224", "--no-pretrained", "-o", "existing.safetensors"],
                      r"existing\.safetensors already exists; pass --force", None),
    "layers-syntax": (["inject", "vit_tiny_patch16_224", "--no-pretrained", "--layers", "1-", "-o", OUT],
                      r"bad --layers term '1-'", None),
    "bad-variant": (["inject", "vit_tiny_patch16_224", "--variant", "cbx", "-o", OUT], r"unknown variant 'cbx'", None),
    "timm-pretrained-offline": (["inject", "vit_tiny_patch16_224", "-o", OUT],
                                r"cannot download the weights of vit_tiny_patch16_224.*--no-pretrained", 15),
    "hf-id-offline": (["inject", "google/vit-base-patch16-224", "-o", OUT],
                      r"cannot download the Hugging Face model google/vit-base-patch16-224: the Hugging Face Hub is unreachable.*local folder", 15),
}


# Whatever this machine's network, the Hub is unreachable for the error runs: a closed local port refuses at once.
UNREACHABLE_HUB = {"HF_ENDPOINT": "http://127.0.0.1:9"}
_PROXIES = {"https_proxy", "http_proxy", "all_proxy"}


def _listing(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden temporaries included) with a hash of its bytes."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def _tiny_timm_file(timm_model, path: Path, spec: CBSpec | None = CBSpec()) -> Path:
    model = timm_model()
    if spec is not None:
        inject(model, spec)
    return save(model, path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder of input files: real cbtool files (with and without CB) and broken or foreign versions."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = resolve("vit_tiny_patch16_224", pretrained=False, model_kwargs=parse_model_kwargs(TINY))
    save(model, folder / "plain-cbtool.safetensors")
    real = save(inject(model, CBSpec()), folder / "real.safetensors")
    data = real.read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    generator = torch.Generator().manual_seed(0)
    (folder / "random.safetensors").write_bytes(bytes(torch.randint(0, 256, (4096,), generator=generator).tolist()))
    save_file(load_file(real), str(folder / "plain.safetensors"))
    metadata, _ = read_header(real)
    save_file(load_file(real), str(folder / "garbled.safetensors"), metadata={**metadata, "cbtool_source": "{not json"})
    shutil.copy(real, folder / "existing.safetensors")
    return folder


@pytest.fixture(scope="module")
def error_runs(inputs, cli_env, tmp_path_factory) -> dict:
    """Every ERROR_CASES command, each in its own copy of ``inputs``; untimed ones two at a time (one per core)."""
    base = tmp_path_factory.mktemp("error_runs")
    env = {**{k: v for k, v in cli_env.items() if k.lower() not in _PROXIES}, **UNREACHABLE_HUB}

    def run(case_id: str):
        args = ERROR_CASES[case_id][0]
        cwd = base / case_id
        shutil.copytree(inputs, cwd)
        before = _listing(cwd)
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "cbtool", *args], cwd=cwd, env=env,
                                capture_output=True, text=True, timeout=120)
        return case_id, (result, time.monotonic() - start, before, _listing(cwd))

    # The timed cases run alone, so that the other cases cannot slow them down.
    timed = [case_id for case_id, case in ERROR_CASES.items() if case[2] is not None]
    results = dict(map(run, timed))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results.update(pool.map(run, [case_id for case_id in ERROR_CASES if case_id not in timed]))
    return results


@pytest.mark.parametrize("case_id", ERROR_CASES)
def test_user_errors_are_one_line_and_exit_2(error_runs, case_id):
    _, message, seconds = ERROR_CASES[case_id]
    result, elapsed, before, after = error_runs[case_id]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cbtool: error: ")
    assert "Traceback" not in result.stderr + result.stdout
    assert re.search(message, lines[0]), lines[0]
    assert after == before  # no output file, no temporary left behind, inputs unchanged
    if seconds is not None:
        assert elapsed < seconds


def test_debug_variable_shows_the_traceback(run_cli):
    result = run_cli("inject", "vit_tiny_patch16_224", "--layers", "1-", "-o", OUT, env={"CBTOOL_DEBUG": "1"})
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert "cbtool.errors.SpecError: bad --layers term '1-'" in result.stderr


# --- through main(), in this process ------------------------------------------------------------


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


@pytest.fixture
def no_debug(monkeypatch):
    monkeypatch.delenv("CBTOOL_DEBUG", raising=False)


# Errors found after the model is built: (arguments, regex the one stderr line must match).
LATE_ERRORS = {
    "layers-out-of-range": (["vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", *TINY, "--layers", "0,3"],
                            r"layer 3 is out of range for a model with 3 blocks"),
    "layers-empty-range": (["vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", *TINY, "--layers", "2-1"],
                           r"empty layer range 2-1"),
    "bad-model-kwargs-entry": (["vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", "patch_size"],
                               r"bad --model-kwargs entry 'patch_size'"),
    "unknown-architecture-argument": (["vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", "bogus=1"],
                                      r"bad architecture argument for vit_tiny_patch16_224"),
    "model-already-has-cb": (["{inputs}/real.safetensors"], r"already has Context Broadcasting .*inject it only once"),
    "file-with-model-kwargs": (["{inputs}/plain-cbtool.safetensors", "--model-kwargs", "depth=2"],
                               r"--img-size and --model-kwargs cannot change a saved model's architecture"),
    "file-with-checkpoint": (["{inputs}/real.safetensors", "--checkpoint", "{inputs}/plain.safetensors"],
                             r"--checkpoint goes with a timm model name, not with a file"),
}


@pytest.mark.parametrize("args, message", LATE_ERRORS.values(), ids=LATE_ERRORS.keys())
def test_late_user_errors_leave_no_file(tmp_path, capsys, no_debug, inputs, args, message):
    before = _listing(inputs)
    out = tmp_path / OUT
    code, stdout, stderr = run_main(["inject", *[a.format(inputs=inputs) for a in args], "-o", str(out)], capsys)
    assert code == 2
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: ") and re.search(message, lines[0]), stderr
    assert stdout == ""
    assert list(tmp_path.iterdir()) == [] and _listing(inputs) == before


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["inject", "m", "--model-kwargs", "a=1", "b=2", "-o", "x"],
         ["inject", "m", "--model-kwargs", "a=1", "--model-kwargs", "b=2", "-o", "x"]),
        (["inject", "--model-kwargs", "a=1", "m", "-o", "x"], ["inject", "--model-kwargs", "a=1", "m", "-o", "x"]),
        (["inject", "m", "--model-kwargs", "a=1", "--model-kwargs", "b=(1, 2)"],
         ["inject", "m", "--model-kwargs", "a=1", "--model-kwargs", "b=(1, 2)"]),
        (["inject", "m", "--model-kwargs"], ["inject", "m", "--model-kwargs"]),  # Typer reports the missing value
        (["inject", "m", "--model-kwargs", "-o", "x"], ["inject", "m", "--model-kwargs", "-o", "x"]),
        (["inject", "m", "--model-kwargs", "bare", "-o", "x"], ["inject", "m", "--model-kwargs", "bare", "-o", "x"]),
        (["inject", "m", "-o", "a=b.safetensors"], ["inject", "m", "-o", "a=b.safetensors"]),
    ],
)
def test_expand_multi_value_options(argv, expected):
    assert expand_multi_value_options(argv) == expected


def test_model_kwargs_take_several_values_after_one_flag(tmp_path, capsys, no_debug):
    out = tmp_path / "m.safetensors"
    code, stdout, stderr = run_main(["inject", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
                                     "img_size=32", "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2",
                                     "--variant", "cbs", "--layers", "-1", "-o", str(out)], capsys)
    assert code == 0, stderr
    assert stderr.strip() == f"wrote {out}: timm-vit, cbs at mlp in 1 of 2 blocks" and not stdout
    model = load(out)
    assert tuple(model.patch_embed.patch_size) == (4, 4)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (32, 2, 2)
    assert model.cbtool_source["model_kwargs"] == {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2,
                                                   "num_heads": 2, "num_classes": 1000}
    assert [name for name, _ in find_broadcasts(model)] == ["blocks.1.mlp.cb"]
    assert model.cbtool_data_config["input_size"] == [3, 32, 32]


def write_checkpoint(kind: str, state: dict, folder: Path) -> Path:
    """``state`` as the training scripts of the world write it."""
    if kind == "safetensors":
        save_file(state, str(folder / "weights.safetensors"))
        return folder / "weights.safetensors"
    wrapped = {
        "pth": state,
        "pth-in-state_dict": {"state_dict": state, "epoch": 3},
        "pth-ddp-prefix": {f"module.{key}": value for key, value in state.items()},
    }[kind]
    torch.save(wrapped, folder / "weights.pth")
    return folder / "weights.pth"


@pytest.mark.parametrize("kind", ["pth", "pth-in-state_dict", "pth-ddp-prefix", "safetensors"])
def test_checkpoint_weights_are_loaded(tmp_path, capsys, no_debug, timm_model, kind):
    source = timm_model(seed=7)  # weights unlike any fresh initialisation
    weights = write_checkpoint(kind, source.state_dict(), tmp_path)
    out = tmp_path / "cb.safetensors"
    code, _, stderr = run_main(["inject", "vit_tiny_patch16_224", "--checkpoint", str(weights), "--model-kwargs",
                                *TINY, "-o", str(out)], capsys)
    assert code == 0, stderr
    saved = load_file(out)
    expected = source.state_dict()
    assert set(saved) == set(expected)
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    model = load(out)
    assert model.cbtool_source["checkpoint"] == str(weights) and model.cbtool_source["pretrained"] is False


def test_num_classes_with_a_checkpoint_of_another_head(tmp_path, capsys, no_debug, timm_model):
    source = timm_model(seed=7)  # 5 classes
    weights = tmp_path / "weights.pth"
    torch.save(source.state_dict(), weights)
    out = tmp_path / "cb.safetensors"
    tiny = [item for item in TINY if not item.startswith("num_classes=")]  # --num-classes and kwargs must agree
    code, _, stderr = run_main(["inject", "vit_tiny_patch16_224", "--checkpoint", str(weights), "--num-classes", "3",
                                "--model-kwargs", *tiny, "-o", str(out)], capsys)
    assert code == 0, stderr
    model = load(out)
    assert model.head.weight.shape == (3, 32) and model.num_classes == 3
    expected = source.state_dict()
    saved = load_file(out)
    assert all(torch.equal(saved[k], expected[k]) for k in expected if not k.startswith("head."))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_checkpoint_that_does_not_fit_is_refused(tmp_path, capsys, no_debug, timm_model):
    weights = tmp_path / "weights.pth"
    torch.save(timm_model(depth=2).state_dict(), weights)
    out = tmp_path / "cb.safetensors"
    code, _, stderr = run_main(["inject", "vit_tiny_patch16_224", "--checkpoint", str(weights), "--model-kwargs",
                                *TINY, "-o", str(out)], capsys)
    assert code == 2
    assert stderr.startswith("cbtool: error: ") and "does not fit VisionTransformer" in stderr
    assert "missing from the file (e.g. blocks.2." in stderr
    assert not out.exists()


def test_force_overwrites_an_existing_output(tmp_path, capsys, no_debug):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"old")
    argv = ["inject", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", *TINY, "--position", "attn",
            "-o", str(out)]
    code, _, stderr = run_main(argv, capsys)
    assert code == 2 and "already exists; pass --force" in stderr and out.read_bytes() == b"old"
    code, stdout, stderr = run_main([*argv, "--force"], capsys)
    assert code == 0, stderr
    assert spec_of(load(out)) == CBSpec(position="attn")
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_cbtool_file_as_model_with_new_head(tmp_path, capsys, no_debug, timm_model):
    plain = tmp_path / "plain.safetensors"
    _tiny_timm_file(timm_model, plain, spec=None)
    out = tmp_path / "cb.safetensors"
    code, _, stderr = run_main(["inject", str(plain), "--num-classes", "7", "--variant", "cbs", "-o", str(out)], capsys)
    assert code == 0, stderr
    model = load(out)
    assert model.head.out_features == 7 and model.cbtool_source["model_kwargs"]["num_classes"] == 7
    assert spec_of(model) == CBSpec("cbs")
    original = load_file(plain)
    saved = load_file(out)
    assert all(torch.equal(saved[k], original[k]) for k in original if not k.startswith("head."))


# --- info and startup without torch ---------------------------------------------------------------

NO_TORCH_SCRIPT = """
import json, sys
from cbtool.cli.app import main
sys.argv = ["cbtool", *json.loads(sys.argv[1])]
try:
    main()
except SystemExit as exited:
    code = exited.code or 0
heavy = sorted(name for name in ("torch", "timm", "transformers") if name in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["info", "--help"], 0),
        (["inject", "--help"], 0),
        (["info", "real.safetensors"], 0),
        (["info", "--json", "real.safetensors"], 0),
        (["info", "plain.safetensors"], 0),
        (["info", "truncated.safetensors"], 2),
        (["info", "garbled.safetensors"], 2),
    ],
)
def test_help_and_info_do_not_import_torch(inputs, cli_env, args, code):
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, json.dumps(args)], cwd=inputs, env=cli_env,
                            capture_output=True, text=True, timeout=60)
    report = json.loads(result.stderr.splitlines()[-1])
    assert report == {"code": code, "heavy": []}, result.stderr


@pytest.mark.parametrize(
    "spec",
    [CBSpec("cb", "mlp", "all"), CBSpec("cbs", "attn", "0,-1", 0.25), None],
    ids=["cb", "cbs", "plain"],
)
def test_info_json(tmp_path, capsys, no_debug, timm_model, spec):
    model = timm_model()
    if spec is not None:
        inject(model, spec)
    path = save(model, tmp_path / "m.safetensors")
    code, stdout, _ = run_main(["info", "--json", str(path)], capsys)
    assert code == 0
    info = json.loads(stdout)
    assert info["cbtool"] is True
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["tensors"] == len(model.state_dict())
    assert info["cb_spec"] == (spec.to_dict() if spec else None)  # variant, position, layers, scale_init
    assert info["cb_parameters"] == (2 * 32 if spec and spec.variant == "cbs" else 0)
    assert info["source"]["model_name"].split(".")[0] == "vit_tiny_patch16_224"
    assert info["source"]["library"] == "timm"
    assert info["data_config"]["input_size"] == [3, 32, 32]
    code, text, _ = run_main(["info", str(path)], capsys)
    assert code == 0
    expected_cb = {
        "cb": "cb:          cb at mlp, layers all (0 CB parameters)",
        "cbs": "cb:          cbs at attn, layers 0,-1 (64 CB parameters)",
        None: "cb:          none (plain model)",
    }[spec.variant if spec else None]
    assert expected_cb in text.splitlines()
    assert f"parameters:  {info['parameters']:,} in {info['tensors']} tensors" in text.splitlines()


def test_info_shows_the_architecture_arguments(tmp_path, capsys, no_debug, hf_model):
    """A tiny patch-4 ViT must not read as a stock ViT-Ti/16: info names what the architecture was built with."""
    out = tmp_path / "tiny.safetensors"
    code, _, stderr = run_main(["inject", "vit_tiny_patch16_224", "--no-pretrained", "--img-size", "28", "--model-kwargs",
                                "patch_size=4", "embed_dim=32", "depth=2", "num_heads=2", "-o", str(out)], capsys)
    assert code == 0, stderr
    code, text, _ = run_main(["info", str(out)], capsys)
    assert code == 0
    assert "arguments:   depth=2 embed_dim=32 img_size=28 num_classes=1000 num_heads=2 patch_size=4" in text.splitlines()
    hf = save(hf_model(), tmp_path / "hf.safetensors")
    code, text, _ = run_main(["info", str(hf)], capsys)
    assert code == 0 and ("arguments:   image_size=32 patch_size=8 hidden_size=32 num_hidden_layers=3 "
                          "num_attention_heads=2 num_labels=5") in text.splitlines()
