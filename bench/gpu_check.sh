#!/usr/bin/env bash
# GPU check of the model server (not part of CI): where a GPU is present, run Kiln's server on the
# CUDA execution provider, check its answers against the CPU provider, and print req/s at batch 1
# and 64 and the dynamic-batching gain (bench/gpu_check.py). Elsewhere: one "no GPU" line, exit 0.
#   bash bench/gpu_check.sh [--width 1024] [--seconds 8]
#   bash bench/gpu_check.sh --cpu-dry-run     # the same steps on the CPU provider (checks the script)
# The GPU venv (onnxruntime-gpu with the CUDA/cuDNN wheels, as the GPU server image) is made once
# under ${KILN_BENCH_ENVS:-~/.cache/kiln/bench}/gpu; needs wrk and Python 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " == *" --cpu-dry-run "* ]]; then
  exec .venv/bin/python bench/gpu_check.py "$@"
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: no GPU on this machine (nvidia-smi finds none): nothing to check"
  exit 0
fi
nvidia-smi -L
ENV="${KILN_BENCH_ENVS:-$HOME/.cache/kiln/bench}/gpu"
if [[ ! -f "$ENV/.ok" ]]; then
  "${PYTHON:-python3.11}" -m venv "$ENV"
  "$ENV/bin/pip" install -q --upgrade pip
  "$ENV/bin/pip" install -q -e '.[server]' onnx
  "$ENV/bin/pip" uninstall -q -y onnxruntime
  "$ENV/bin/pip" install -q 'onnxruntime-gpu[cuda,cudnn]'
  touch "$ENV/.ok"
fi
"$ENV/bin/python" -c "import onnxruntime as o, sys; p = o.get_available_providers(); print('ONNX Runtime', o.__version__, p); sys.exit('CUDAExecutionProvider' not in p)"
exec "$ENV/bin/python" bench/gpu_check.py "$@"
