"""Output files: the safetensors stream writer, cbtool's one temporary name, stale temporaries, outputs vs. inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cbtool import files
from cbtool.models.checkpoint import save
from cbtool.errors import OutputError
from cbtool.files import (atomic_path, check_outputs, check_writable_folder, remove_stale_temporaries, temporary_name,
                          write_safetensors)  # fmt: skip


def test_written_safetensors_read_back_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = {
        "f32": torch.randn(3, 5, generator=generator),
        "f16": torch.randn(7, generator=generator).half(),
        "bf16": torch.randn(2, 2, generator=generator).bfloat16(),
        "i64": torch.arange(5),
        "u8": torch.arange(9, dtype=torch.uint8).reshape(3, 3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    write_safetensors(state, path, metadata={"format": "pt", "note": "é"})
    loaded = load_file(path)
    assert set(loaded) == set(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and loaded[key].shape == tensor.shape and torch.equal(loaded[key], tensor)
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "é"}
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0  # data 8-byte aligned, as safetensors writes


def test_a_save_creates_one_temporary_with_cbtool_name_and_nothing_else(tmp_path, timm_model, monkeypatch):
    seen = []
    real = files.write_safetensors

    def spy(state, path, metadata=None):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        real(state, path, metadata)
        seen.append(sorted(p.name for p in tmp_path.iterdir()))

    monkeypatch.setattr("cbtool.models.checkpoint.write_safetensors", spy)
    save(timm_model(), tmp_path / "m.safetensors")
    assert len(seen[0]) == 1 and seen[1] == seen[0]  # the one temporary, even after writing
    assert seen[0][0].startswith(".m.safetensors.cbtool-") and seen[0][0].endswith(".tmp")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_ended_processes_are_removed(tmp_path, capsys):
    dead = temporary_name(tmp_path / "a.safetensors").name.replace(f"-{os.getpid()}-", f"-{_dead_pid()}-")
    live = temporary_name(tmp_path / "b.safetensors").name  # this process: still writing
    foreign = f".a.safetensors.cbtool-{'0' * 8 if files._host_tag() != '0' * 8 else 'f' * 8}-{_dead_pid()}-abcdefgh.tmp"
    keep = [live, foreign, ".hidden-by-someone-else.tmp", "a.safetensors"]
    for name in [dead, *keep]:
        (tmp_path / name).write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [tmp_path / dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
    with atomic_path(tmp_path / "c.json") as temporary:  # every atomic write cleans its folder first
        temporary.write_text("{}")
    assert files.written[-1] == tmp_path / "c.json"


def test_outputs_that_are_inputs_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(b"x")
    (tmp_path / "data" / "a").mkdir(parents=True)
    os.symlink(tmp_path / "m.safetensors", tmp_path / "link.safetensors")
    with pytest.raises(OutputError, match="is an input of this command"):
        check_outputs({"--json": "./m.safetensors"}, [str(tmp_path / "m.safetensors")])
    with pytest.raises(OutputError, match=r"is an input of this command \(m.safetensors\)"):
        check_outputs({"--json": tmp_path / "link.safetensors"}, ["m.safetensors"])
    with pytest.raises(OutputError, match="inside the dataset folder"):
        check_outputs({"--json": "data/a/r.json"}, [], dataset="data")
    with pytest.raises(OutputError, match="--plot and --json name the same file"):
        check_outputs({"--json": "r.json", "--plot": tmp_path / "r.json"}, [])
    check_outputs({"--json": "r.json", "--plot": None}, ["vit_tiny_patch16_224", None], dataset="sample")


def test_run_folders_are_checked_before_any_work(tmp_path):
    assert check_writable_folder(tmp_path / "new" / "run", "run folder", "hint") == tmp_path / "new" / "run"
    assert list(tmp_path.iterdir()) == []  # checked, not created
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file; hint"):
        check_writable_folder(tmp_path / "file" / "run", "run folder", "hint")
    if Path("/proc").is_dir():
        with pytest.raises(OutputError, match="cannot write the run folder /proc/x: /proc is not writable"):
            check_writable_folder("/proc/x", "run folder", "hint")


@pytest.mark.parametrize("full", ["no free block", "no inode"])
def test_a_full_disk_is_refused_in_one_wording_by_both_probes(tmp_path, monkeypatch, full):
    """A run folder and an output file on a full device: the same words, each naming the path and what to do."""
    import errno

    if full == "no free block":
        monkeypatch.setattr(files, "_has_free_space", lambda folder: False)
    else:
        def no_inode(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(files.os, "open", no_inode)
    with pytest.raises(OutputError) as folder:
        check_writable_folder(tmp_path / "run", "run folder", "pick another with --run-dir")
    with pytest.raises(OutputError) as output:
        files.check_writable_output(tmp_path / "m.safetensors")
    monkeypatch.undo()
    words = "no space left on the device; free some space or"
    assert str(folder.value) == f"cannot write the run folder {tmp_path / 'run'}: {words} pick another with --run-dir"
    assert str(output.value) == f"cannot write {tmp_path / 'm.safetensors'}: {words} write elsewhere"
    assert list(tmp_path.iterdir()) == []  # the probes removed, nothing created


# --- issue 24: one guard, strict JSON --------------------------------------------------------------


def test_same_file_sees_through_links_and_spellings(tmp_path):
    from cbtool.files import same_file

    (tmp_path / "a.json").write_text("{}")
    os.link(tmp_path / "a.json", tmp_path / "hard.json")
    os.symlink("a.json", tmp_path / "soft.json")
    (tmp_path / "b.json").write_text("{}")
    assert same_file(tmp_path / "a.json", tmp_path / "hard.json")  # another name, one inode
    assert same_file(tmp_path / "soft.json", tmp_path / "a.json")
    assert same_file(tmp_path / "sub" / ".." / "a.json", tmp_path / "a.json")  # resolved, though sub/ does not exist
    assert not same_file(tmp_path / "a.json", tmp_path / "b.json")  # same bytes, another file
    assert not same_file(tmp_path / "new.json", tmp_path / "a.json")


def test_check_outputs_refuses_hard_links_folder_files_and_every_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.safetensors").write_bytes(b"x")
    os.link(tmp_path / "m.safetensors", tmp_path / "twin.safetensors")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")
    (tmp_path / "train" / "c0").mkdir(parents=True)
    (tmp_path / "val").mkdir()
    with pytest.raises(OutputError, match=r"--json twin.safetensors is an input of this command \(m.safetensors\)"):
        check_outputs({"--json": "twin.safetensors"}, ["m.safetensors"])
    for name in ("config.json", "model.safetensors"):  # what cbtool reads from a model folder
        with pytest.raises(OutputError, match=rf"-o hf/{name} is an input of this command \(read from hf\)"):
            check_outputs({"-o": f"hf/{name}"}, ["hf"])
    check_outputs({"--json": "hf/results.json", "--plot": "hf/new.png"}, ["hf"])  # new files beside it are fine
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"x")
    (run / "model.safetensors").write_bytes(b"x")  # a run folder's output, not something --resume reads
    check_outputs({"--output": "run/model.safetensors"}, ["run"])
    with pytest.raises(OutputError, match=r"--log run/checkpoint.pt is an input of this command \(read from run\)"):
        check_outputs({"--log": "run/checkpoint.pt"}, ["run"])
    with pytest.raises(OutputError, match="inside the dataset folder val"):
        check_outputs({"--output": "val/sweep"}, [], dataset=["train", "val"])
    with pytest.raises(OutputError, match="inside the dataset folder train"):
        check_outputs({"--save-examples": "train"}, [], dataset="train")  # the folder itself
    with pytest.raises(OutputError, match="--plot and --json name the same file"):
        check_outputs({"--json": "m.safetensors", "--plot": "twin.safetensors"}, [])
    check_outputs({"--json": "r.json"}, ["vit_tiny_patch16_224", None], dataset=["sample", None, "timm/mini"])


def test_json_is_written_strictly(tmp_path):
    """NaN is not JSON: refused with where it is, and no file (nor temporary) is left."""
    import math

    from cbtool.files import finite_or_null, json_text, write_json_atomic

    with pytest.raises(OutputError, match=r"non-finite number as JSON at models\.0\.metrics\.loss, x"):
        write_json_atomic(tmp_path / "r.json", {"models": [{"metrics": {"loss": math.nan, "top1": 1.0}}], "x": math.inf})
    assert list(tmp_path.iterdir()) == []
    assert json_text({"b": 1, "a": [1.5]}, indent=None) == '{"a": [1.5], "b": 1}'
    assert finite_or_null({"loss": math.nan, "step": 3}) == {"loss": None, "step": 3, "non_finite": {"loss": "nan"}}
    assert finite_or_null({"loss": 0.5}) == {"loss": 0.5}


def test_pictures_must_be_named_png():
    from cbtool.files import check_png_name

    check_png_name("--plot", "a/b.PNG")
    check_png_name("--plot", None)
    for name in ("p.jpg", "p.svg", "p"):
        with pytest.raises(OutputError, match=f"--plot {name}: cbtool writes PNG pictures"):
            check_png_name("--plot", name)
