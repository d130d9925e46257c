#!/usr/bin/env bash
# Create .venv and install cbtool with every extra (torch pinned to the release this project is tested with).
# An existing .venv is reused (e.g. one made with a CPU-only torch first), unless it is broken: then the script
# says so in one line and stops. `bash scripts/install.sh --check-venv` runs only that check.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"

# A .venv that exists but cannot run Python with pip (an interrupted install leaves an empty one) would make
# every later step fail far from the cause.
check_venv() {
    [ -e .venv ] || return 0
    local why=""
    if [ ! -x .venv/bin/python ]; then
        why="it has no python (.venv/bin/python is missing)"
    elif ! .venv/bin/python -c "" >/dev/null 2>&1; then
        why="its python does not run"
    elif ! .venv/bin/python -c "import pip" >/dev/null 2>&1; then
        why="its python cannot import pip"
    fi
    if [ -n "$why" ]; then
        echo "scripts/install.sh: .venv is broken: $why; remove it (rm -rf .venv) and run this script again" >&2
        return 1
    fi
}

check_venv
[ "${1:-}" = "--check-venv" ] && exit 0
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "scripts/install.sh: note: .venv has no torch yet: installing torch 2.14.1 from PyPI (with CUDA libraries; for a CPU-only torch, see the README's set-up)" >&2
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[hf,plot,slurm,test]"
echo "installed: $(.venv/bin/cbtool --version)"
