"""scripts/install.sh refuses a broken or empty .venv in one line instead of reusing it (its check part only:
``--check-venv`` never installs anything)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def check(root: Path) -> subprocess.CompletedProcess:
    (root / "scripts").mkdir(exist_ok=True)
    shutil.copy(SCRIPT, root / "scripts" / "install.sh")
    return subprocess.run(["bash", str(root / "scripts" / "install.sh"), "--check-venv"], capture_output=True,
                          text=True, timeout=60)


def fake_python(root: Path, body: str) -> None:
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text("#!/bin/sh\n" + body + "\n")
    (bin_dir / "python").chmod(0o755)


@pytest.mark.parametrize(("make", "why"), [
    (lambda root: (root / ".venv").mkdir(), "it has no python (.venv/bin/python is missing)"),
    (lambda root: fake_python(root, "exit 1"), "its python does not run"),
    (lambda root: fake_python(root, 'case "$*" in *"import pip"*) exit 1;; esac; exit 0'), "its python cannot import pip"),
])  # fmt: skip
def test_a_broken_venv_is_refused_in_one_line(tmp_path, make, why):
    make(tmp_path)
    done = check(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"scripts/install.sh: .venv is broken: {why}; remove it (rm -rf .venv) and run this script again"]


def test_a_working_venv_and_no_venv_pass_the_check(tmp_path):
    assert check(tmp_path).returncode == 0 and not (tmp_path / ".venv").exists()  # nothing made by the check
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv" / "bin" / "python")  # this interpreter imports pip
    done = check(tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
