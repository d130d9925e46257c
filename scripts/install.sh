#!/usr/bin/env bash
# Create .venv and install cbtool with every extra (torch pinned to the release this project is tested with).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[hf,plot,slurm,test]"
echo "installed: $(.venv/bin/cbtool --version)"
