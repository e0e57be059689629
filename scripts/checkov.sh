#!/usr/bin/env bash
# Scan what Kiln creates with checkov: the chart (helm template, several value sets) and what the operator
# renders for the examples (kiln render). checkov lives in its own cached venv (~/.cache/kiln/checkov-venv,
# it pins many packages of its own that would clash with .[dev]); `--install` only installs it.
# Skips, each with its reason: scripts/checkov-skips.txt. Exit status: checkov's (non-zero on a finding).
# Usage: scripts/checkov.sh [--install]
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=3.3.30
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
VENV="$CACHE/checkov-venv"
installed() { [[ -x "$VENV/bin/checkov" && "$("$VENV/bin/checkov" --version 2>/dev/null)" == "$VERSION" ]]; }
if ! installed; then
  # One installer at a time (two worktrees or a CI clone may start together); the second finds it done.
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.checkov.lock"
  flock 8
  if ! installed; then
    rm -rf "$VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
    log="$(mktemp)"
    if ! "$VENV/bin/pip" install -q "checkov==$VERSION" > "$log" 2>&1; then
      grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
  fi
  flock -u 8
fi
[[ "${1:-}" == "--install" ]] && exit 0
HELM="${HELM:-$CACHE/tools/helm}"
KILN="${KILN:-.venv/bin/kiln}"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$HELM" template kiln charts/kiln -n kiln-system > "$out/chart-defaults.yaml"
"$HELM" template kiln charts/kiln -n kiln-system --set-json 'watchNamespaces=["ml-a","ml-b"]' > "$out/chart-cluster-list.yaml"
"$HELM" template kiln charts/kiln -n kiln-system --set scope=namespaced --set-json 'watchNamespaces=["ml-a"]' \
  --set peering.enabled=true > "$out/chart-namespaced.yaml"
for f in examples/cluster/digits.yaml examples/gpu-trainingjob.yaml; do
  "$KILN" render -n ml "$f" > "$out/kiln-$(basename "$(dirname "$f")")-$(basename "$f")" 2>/dev/null
done
skips="$(grep -v '^#' scripts/checkov-skips.txt | awk 'NF {print $1}' | paste -sd, -)"
"$VENV/bin/checkov" -d "$out" --framework kubernetes --compact --quiet --skip-download --skip-check "$skips" "$@"
