#!/usr/bin/env bash
# Creates .venv and installs the project with the exact tested versions (constraints.txt).
# torch goes first and alone: on a CPU box a plain `pip install torch` pulls a multi-GB CUDA build.
# Set TORCH_SPEC to choose another build, e.g. TORCH_SPEC="torch==2.13.0" on a GPU box with CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
echo "installed into .venv: $(.venv/bin/python -c 'import torch, transformers, trl; print("torch", torch.__version__, "transformers", transformers.__version__, "trl", trl.__version__)')"
