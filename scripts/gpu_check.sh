#!/usr/bin/env bash
# One-command GPU check for a single-GPU machine (H100 / H200) with torch (2.11+), triton and transformers
# preinstalled, no network and no Ray. See README "GPU check".
#   bash scripts/gpu_check.sh OUT [--quick|--full] [--device cpu] [--stages a,b]
# 1. Installs the project and the wheels in $EPSERVE_WHEELS (default: ./wheels) without the network:
#    the project with --no-deps (its serving dependencies, Ray included, are not needed here), then every
#    wheel of the folder, each resolved against the folder and what is installed. Fill the folder on a
#    machine with network, for the GPU machine's Python (see README "GPU check"):
#      pip download --dest wheels --only-binary=:all: --no-deps --python-version 3.12 \
#        --platform manylinux2014_x86_64 fla-core einops pytest pytest-timeout pluggy iniconfig
#    (a few MB). An install that fails (e.g. setuptools older than the build needs) falls back to running
#    from the source tree (PYTHONPATH), which is all the check needs.
# 2. Runs scripts/gpu_check.py OUT: stages env, cuda_tests, hf_parity, cuda_graph, bench, each writing
#    OUT/gpu_check.json and OUT/gpu_check.md as it ends. --quick (default) fits in 5 minutes.
# `--device cpu` is the dry run CI performs (tiny sizes, same entry points).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash scripts/gpu_check.sh OUT [--quick|--full] [--device cpu] [--stages a,b]" >&2
  exit 2
fi
wheels="${EPSERVE_WHEELS:-wheels}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${EPSERVE_GPU_CHECK_NO_INSTALL:-0}" != 1 ]; then
  if ! python -m pip install -q --no-deps --no-build-isolation -e . 2>/tmp/epserve_gpu_check_install.log; then
    echo "gpu_check: editable install failed (see /tmp/epserve_gpu_check_install.log); running from the source tree" >&2
  fi
  if [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
    python -m pip install -q --find-links "$wheels" "$wheels"/*.whl
  else
    echo "gpu_check: no wheels in $wheels: the CUDA kernels need fla-core (the torch references run without it)" >&2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "transformers", "pytest", "safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing {missing}: add their wheels to the wheels folder")
PY
exec python scripts/gpu_check.py "$@"
