#!/usr/bin/env bash
# Multi-GPU check for a machine with 2+ GPUs and Ray installed (see README "GPU check"):
#   bash scripts/nccl_check.sh OUT [--device cpu] [--tokens N]
# Runs scripts/nccl_check.py OUT: an EP group D=1 x X=1 on NCCL against the single-process model (greedy
# tokens equal), and the NCCL all-to-all exchange at decode sizes; OUT/nccl_check.json + nccl_check.md.
# `--device cpu` is the gloo dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/nccl_check.sh OUT [--device cpu] [--tokens N]" >&2
  exit 2
fi
python -c "import ray" 2>/dev/null || { echo "nccl_check: needs Ray (pip install -e '.[gpu]')" >&2; exit 2; }
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/nccl_check.py "$@"
