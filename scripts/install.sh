#!/usr/bin/env bash
# Install epserve (editable) into the active Python environment.
#   bash scripts/install.sh          # serving, plus what the README's other commands need:
#                                    # matplotlib (epserve bench --plot) and openai (the Python examples)
#   bash scripts/install.sh --test   # plus the test oracle (transformers) and test tools
#   bash scripts/install.sh --video  # serving, plus video files as chat content (PyAV)
# On a machine whose nvidia-smi lists a GPU, the `gpu` extra (fla-core: the CUDA DeltaNet kernels) too.
# torch: kept if already installed; on a machine with an NVIDIA GPU the default (CUDA) build;
# otherwise the 2.13.0 CPU wheel (set EPSERVE_TORCH_INDEX=https://download.pytorch.org/whl/cpu
# where the default index would hand out the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="[plot,client]"
if [ "${1:-}" = "--test" ]; then extras="[plot,client,test]"; fi
if [ "${1:-}" = "--video" ]; then extras="[plot,client,video]"; fi
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }
if has_gpu; then extras="${extras%]},gpu]"; fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" >/dev/null 2>&1; then
  if has_gpu; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0" ${EPSERVE_TORCH_INDEX:+--extra-index-url "$EPSERVE_TORCH_INDEX"}
  fi
fi
python -m pip install -q -e ".${extras}"
python -c "import torch, ray, epserve; print(f'epserve installed: torch {torch.__version__}, ray {ray.__version__}')"
