#!/usr/bin/env bash
# Staged runs:  ./launch.sh [CONFIG] [--stages prep,sft,eval] [--smoke] [--force] [key=value ...]
#
#   ./launch.sh                              built-in default (configs/default.yaml) on CPU, into runs/default/
#   ./launch.sh configs/gpt2-vqav2.yaml      a real config (see its header for data preparation)
#   ./launch.sh configs/default.yaml --smoke validate a config: a few steps of each stage on a small slice
#
# Multi-GPU / multi-node: set `launcher: deepspeed` and `nproc_per_node` (or `hostfile`) in the
# config; training stages then start under the DeepSpeed launcher. A hostfile lists one node
# per line with its GPU slots:
#     worker-1 slots=8
#     worker-2 slots=8
set -euo pipefail
cd "$(dirname "$0")"
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=${PYTHON:-python3}; fi
if ! "$PYTHON" -c "import vlm, stages, transformers" 2>/dev/null; then
  echo "launch.sh: the project is not installed for $PYTHON; run ./install.sh first (see README.md)" >&2
  exit 1
fi
export TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m stages.pipeline "$@"
