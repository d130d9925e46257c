"""Ctrl-C (SIGINT to the process group, as a terminal sends it) and kill -9 at several moments of ``inject``,
``eval`` and ``finetune``: what each says, its exit code, and what it leaves on disk.

Whatever the moment: SIGINT exits 130 with one line that says what was written (or that nothing was), and
leaves no temporary; SIGKILL leaves at most one temporary with cbtool's own name, which the next write to
that folder removes. Outputs are whole or absent, never partial.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cbtool.models.checkpoint import load, save
from cbtool.cli.app import main
from cbtool.models.resolve import resolve
from cbtool.spec import CBSpec
from cbtool.surgery import inject

TEMPORARY = re.compile(r"^\..+\.cbtool-[0-9a-f]{8}-\d+-[0-9a-z]{8}\.tmp$")
NOTHING = "cbtool: interrupted; nothing was written"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")


class Running:
    """``python -m cbtool ARGS`` in its own process group, its stderr collected as it comes."""

    def __init__(self, args, cwd: Path, env: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cbtool", *map(str, args)], cwd=cwd, env={**env, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.process.stderr.read1(4096), b""):
            self.chunks.append(chunk)

    @property
    def stderr(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def wait_for(self, ready, what: str, timeout: float = 120) -> None:
        """Poll ``ready()`` every few milliseconds; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"ended (code {self.process.returncode}) before {what}: {self.stderr[-2000:]}")
            time.sleep(0.002)
        raise AssertionError(f"no {what} within {timeout} s: {self.stderr[-2000:]}")

    def send(self, sig: int, times: int = 1) -> None:
        for _ in range(times):
            os.killpg(self.process.pid, sig)

    def finish(self, timeout: float = 120) -> tuple[int, list[str]]:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.reader.join(timeout=10)
        lines = [line for line in self.stderr.replace("\r", "\n").splitlines() if line.strip()]
        return code, lines


def _temporaries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.rglob(".*") if TEMPORARY.match(path.name))


def _tiny_file(path: Path) -> Path:
    torch.manual_seed(0)
    model = resolve("vit_tiny_patch16_224", pretrained=False, model_kwargs=dict(
        img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=2, num_classes=10))  # fmt: skip
    return save(inject(model, CBSpec()), path)


# --- inject: a ViT-S/16 is 88 MB, long enough to be caught while it is written ------------------------

INJECT = ["inject", "vit_small_patch16_224", "--no-pretrained", "-o", "out/m.safetensors"]


@pytest.mark.parametrize(("moment", "sig"), [("starting", signal.SIGINT), ("writing", signal.SIGINT),
                                             ("starting", signal.SIGKILL)])  # fmt: skip
def test_inject_interrupted(tmp_path, cli_env, moment, sig):
    (tmp_path / "out").mkdir()
    run = Running(INJECT, tmp_path, cli_env)
    if moment == "starting":
        time.sleep(1.0)
    else:
        run.wait_for(lambda: _temporaries(tmp_path / "out"), "the temporary file")
    run.send(sig)
    code, lines = run.finish()
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    if code == 0:  # finished before the signal came: the whole file, nothing else
        assert left == ["m.safetensors"] and load(tmp_path / "out/m.safetensors") is not None
        return
    if sig == signal.SIGKILL:  # before the write began: nothing at all
        assert code == -signal.SIGKILL and left == []
        return
    assert code == 130 and "Traceback" not in "\n".join(lines), lines
    assert lines[-1] in (NOTHING, "cbtool: interrupted; wrote out/m.safetensors before stopping"), lines
    assert left == ([] if lines[-1] == NOTHING else ["m.safetensors"])


def test_inject_kill_9_while_writing_leaves_one_temporary_that_the_next_write_removes(tmp_path, cli_env, capsys):
    out = tmp_path / "out"
    out.mkdir()
    run = Running(INJECT, tmp_path, cli_env)
    # the temporary with bytes in it: the pre-flight probe (an empty temporary, created and removed at once) is not the write
    run.wait_for(lambda: any((out / name).stat().st_size for name in _temporaries(out) if (out / name).exists()),
                 "the temporary file")
    run.send(signal.SIGKILL)
    code, _ = run.finish()
    assert code == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir())
    stale = _temporaries(out)
    assert len(stale) == 1 and set(left) <= {stale[0], "m.safetensors"}  # one file of cbtool's, nothing else's

    with pytest.raises(SystemExit) as exited:  # the next write to the folder clears it
        main(["inject", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs", "img_size=28", "patch_size=4",
              "embed_dim=32", "depth=1", "num_heads=2", "-o", str(out / "next.safetensors")])  # fmt: skip
    assert exited.value.code in (0, None)
    assert "removed 1 temporary file(s)" in capsys.readouterr().err
    assert _temporaries(out) == [] and "next.safetensors" in {p.name for p in out.iterdir()}


# --- eval: data-loading workers get the SIGINT too -------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.mark.parametrize(("moment", "sig"), [("starting", signal.SIGINT), ("evaluating", signal.SIGINT),
                                             ("evaluating", signal.SIGKILL)])  # fmt: skip
def test_eval_interrupted(tmp_path, cli_env, tiny, moment, sig):
    # Workers only once batches flow: CPython can lose a SIGINT that lands while they fork.
    workers = "0" if moment == "starting" else "2"
    run = Running(["eval", tiny, "--dataset", "sample", "--batch-size", "5", "--workers", workers, "--density",
                   "--json", "r.json", "--plot", "r.png"], tmp_path, cli_env)  # fmt: skip
    if moment == "starting":
        time.sleep(1.0)
    else:
        run.wait_for(lambda: re.search(r"eval: [1-9]\d*/\d+", run.stderr), "the first batches")  # a line per 5% (a pipe)
    run.send(sig)
    code, lines = run.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the reports are written only at the end
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        return
    assert code == 130 and lines[-1] == NOTHING, lines
    assert "Traceback" not in "\n".join(lines)


# --- finetune: one Ctrl-C saves; a second stops at once; kill -9 keeps the last whole checkpoint ------

FINETUNE = ["--dataset", "sample", "--limit", "1000", "--val-limit", "50", "--batch-size", "20", "--workers", "0",
            "--steps", "100000", "--save-every", "2", "--quiet"]  # fmt: skip


def _checkpoint_step(run_dir: Path) -> int:
    saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return int(saved["state"]["step"])


def _has_checkpoint(run_dir: Path):
    return lambda: (run_dir / "checkpoint.json").exists()


@pytest.mark.parametrize(("moment", "sig", "times"), [
    ("starting", signal.SIGINT, 1),
    ("starting", signal.SIGKILL, 1),
    ("training", signal.SIGINT, 2),
    ("training", signal.SIGKILL, 1),
])  # fmt: skip
def test_finetune_interrupted(tmp_path, cli_env, tiny, moment, sig, times):
    run_dir = tmp_path / "run"
    run = Running(["finetune", tiny, *FINETUNE, "--run-dir", run_dir, "-o", "out.safetensors"], tmp_path, cli_env)
    if moment == "starting":
        time.sleep(1.0)
    else:
        run.wait_for(_has_checkpoint(run_dir), "the first checkpoint")
    run.send(sig, times)
    code, lines = run.finish()
    assert not (tmp_path / "out.safetensors").exists()
    text = "\n".join(lines)
    assert "Traceback" not in text
    if sig == signal.SIGKILL and moment == "starting":  # still loading: no run folder yet, or an empty start
        assert code == -signal.SIGKILL and not (run_dir / "checkpoint.pt").exists() and _temporaries(tmp_path) == []
        return
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
        assert len(_temporaries(run_dir)) <= 1  # at most the one being written
        info = json.loads((run_dir / "checkpoint.json").read_text())
        assert _checkpoint_step(run_dir) >= info["step"] >= 2  # both whole; the .pt may be one save newer
        return
    assert code == 130 and _temporaries(tmp_path) == [], lines
    last = lines[-1]
    if moment == "starting":
        assert last == NOTHING or re.fullmatch(r"cbtool: interrupted at step \d+; (saved|nothing was saved).*", last), last
        return
    resume = f"resume with: cbtool finetune --resume {run_dir}"
    said = re.fullmatch(r"cbtool: interrupted at step (\d+)(; saved | before saving; the last complete checkpoint is )"
                        r"(\S+)checkpoint\.pt; (.*)", last)  # fmt: skip
    assert said and said.group(4) == resume, last
    assert _checkpoint_step(run_dir) <= int(said.group(1))
