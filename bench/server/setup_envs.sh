#!/usr/bin/env bash
# Create the comparison servers' virtual environments (separate: MLServer and KServe pin
# conflicting protobuf/fastapi versions, and neither may touch the project's .venv).
#   bash bench/server/setup_envs.sh            # idempotent; pip reaches PyPI
#   bash bench/server/setup_envs.sh pytriton    # only the named envs (and h2load)
# Result: ~/.cache/kiln/bench/{mlserver,kserve,pytriton,bentoml,litserve}/bin/python
# Not part of CI or `make test`: only the benchmarks in bench/server use these.
set -euo pipefail

ROOT="${KILN_BENCH_ENVS:-$HOME/.cache/kiln/bench}"
PY="${PYTHON:-python3}"
mkdir -p "$ROOT"

WANT=" ${*:-mlserver kserve pytriton bentoml litserve} "

make_env() {
  local name="$1"; shift
  local env="$ROOT/$name"
  local py="$PY"
  case "$WANT" in *" $name "*) ;; *) return ;; esac
  if [ "${1:-}" = "--python" ]; then py="$2"; shift 2; fi
  if [ -x "$env/bin/python" ] && "$env/bin/python" -c "import onnxruntime" 2>/dev/null && [ -f "$env/.ok" ]; then
    echo "$name: ready at $env"
    return
  fi
  rm -rf "$env"
  "$py" -m venv "$env"
  "$env/bin/pip" install -q --upgrade pip
  "$env/bin/pip" install -q "$@"
  touch "$env/.ok"
  echo "$name: installed at $env"
}

# MLServer 1.7.1 crashes with uvloop >= 0.22 in its default (parallel workers) mode: pin 0.21.
make_env mlserver "mlserver==1.7.1" "uvloop<0.22" onnxruntime numpy
make_env kserve "kserve==0.21.*" onnxruntime numpy
# PyTriton's bundled tritonserver has only the Python backend, whose stub links Debian's
# libpython3.11: the venv must come from Debian's /usr/bin/python3.11, not pyenv's.
make_env pytriton --python /usr/bin/python3.11 "nvidia-pytriton==0.7.0" onnxruntime numpy
make_env bentoml "bentoml==1.4.40" onnxruntime numpy
make_env litserve "litserve==0.2.19" onnxruntime numpy

# h2load (gRPC load for bench/server/grpc_rest.py): Debian's nghttp2-client and the libraries the base
# system lacks, unpacked privately (nothing installed system-wide).
if [ ! -x "$ROOT/h2load/root/usr/bin/h2load" ]; then
  mkdir -p "$ROOT/h2load/debs"
  (cd "$ROOT/h2load/debs" && apt-get download nghttp2-client libev4 libjemalloc2 libjansson4 >/dev/null)
  for deb in "$ROOT"/h2load/debs/*.deb; do dpkg-deb -x "$deb" "$ROOT/h2load/root"; done
fi
echo "h2load: ready at $ROOT/h2load/root/usr/bin/h2load"

version() {  # name, python statement printing the version
  case "$WANT" in *" $1 "*) "$ROOT/$1/bin/python" -c "$2" ;; esac
}
version mlserver "import mlserver, uvloop; print('mlserver', mlserver.__version__, 'uvloop', uvloop.__version__)"
version kserve "import kserve, importlib.metadata as m; print('kserve', m.version('kserve'))"
version pytriton "import pytriton, importlib.metadata as m; print('nvidia-pytriton', m.version('nvidia-pytriton'))"
version bentoml "import bentoml; print('bentoml', bentoml.__version__)"
version litserve "import litserve, importlib.metadata as m; print('litserve', m.version('litserve'))"
