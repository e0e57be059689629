#!/usr/bin/env bash
# Builds and caches a real Kubernetes 1.20 (kube-apiserver, kube-controller-manager, etcd, and the node
# half: kubelet, kube-proxy, kube-scheduler, plus pause.c for the sandbox image) from Debian bookworm's
# packages only: the `kubernetes` source package built with Debian's Go 1.19,
# and `etcd-server`. Nothing is installed system-wide; everything lives under $KILN_CACHE.
#
# Usage: scripts/controlplane.sh            # prints the bin folder on success
# The result is cached: a second run only prints the folder.
set -euo pipefail

CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
BIN="$CACHE/k8s-1.20/bin"
# One `make` for all five binaries: they share most packages, so one build is far quicker than two.
WHAT_BINS=(kube-apiserver kube-controller-manager kubelet kube-proxy kube-scheduler)
have_all() {
  local b; for b in "${WHAT_BINS[@]}" etcd; do [[ -x "$BIN/$b" ]] || return 1; done
  [[ -f "$BIN/pause.c" ]]
}
if have_all; then
  echo "$BIN"; exit 0
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.controlplane.lock"
flock 9
if have_all; then
  echo "$BIN"; exit 0
fi

WORK="$CACHE/k8s-build"
rm -rf "$WORK"; mkdir -p "$WORK"/{apt/lists/partial,apt/cache/archives/partial,debs,root,src}
log() { echo "[controlplane] $*" >&2; }

SRC="$WORK/apt/sources.list"
# shellcheck source=lib/aptsources.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/aptsources.sh"
debian_sources "$SRC" deb-src || { log "no Debian apt sources found in /etc/apt"; exit 1; }
APT=(-o Dir::Etc::SourceList="$SRC" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$WORK/apt/lists" -o Dir::Cache="$WORK/apt/cache"
     -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
log "apt update (private lists)"
apt-get "${APT[@]}" update -qq >&2

log "downloading packages"
( cd "$WORK/debs" && apt-get "${APT[@]}" download -qq \
    golang-1.19-go golang-1.19-src rsync libpopt0 etcd-server \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev >&2 )
( cd "$WORK/src" && apt-get "${APT[@]}" source --download-only -qq kubernetes >&2 )
for d in "$WORK"/debs/*.deb; do dpkg-deb -x "$d" "$WORK/root"; done

log "unpacking the kubernetes source package"
cd "$WORK/src"
dsc=$(ls kubernetes_*.dsc | head -1)
orig=$(ls kubernetes_*.orig.tar.* | head -1)
mkdir tree && tar -xf "$orig" -C tree
top=$(find tree -mindepth 1 -maxdepth 1 -type d | head -1)
[[ -d "$top/vendor" ]] || { log "unexpected source layout in $orig"; exit 1; }
log "source: $dsc"

# reflect2 1.0.1 segfaults under Go >= 1.18: take Debian's 1.0.2 and json-iterator 1.1.12.
for pair in "github.com/modern-go/reflect2" "github.com/json-iterator/go"; do
  from="$WORK/root/usr/share/gocode/src/$pair"
  [[ -d "$from" ]] || { log "missing $from"; exit 1; }
  rm -rf "$top/vendor/$pair"; mkdir -p "$top/vendor/$pair"
  cp -r "$from"/. "$top/vendor/$pair"/
  rm -rf "$top/vendor/$pair"/*_test.go "$top/vendor/$pair/.git"* || true
done

export GOROOT="$WORK/root/usr/lib/go-1.19"
export PATH="$GOROOT/bin:$WORK/root/usr/bin:$PATH"
export LD_LIBRARY_PATH="$WORK/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GOFLAGS=-mod=vendor CGO_ENABLED=0 GO111MODULE=on
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$(cd "$top" && pwd)" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"
go version >&2
log "building ${WHAT_BINS[*]} (several minutes)"
KUBE_BUILD_PLATFORMS=linux/amd64 KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean \
  make WHAT="${WHAT_BINS[*]/#/cmd/}" >&2

mkdir -p "$BIN.tmp"
out=$(find _output -type f -name kube-apiserver -path '*bin*' | head -1)
for b in "${WHAT_BINS[@]}"; do cp "$(dirname "$out")/$b" "$BIN.tmp/"; done
# the pod sandbox ("pause") program, compiled by scripts/images.sh into localhost/kiln/pause
cp build/pause/linux/pause.c "$BIN.tmp/pause.c"
cp "$WORK/root/usr/bin/etcd" "$BIN.tmp/etcd"
chmod +x "$BIN.tmp"/kube* "$BIN.tmp/etcd"
rm -rf "$BIN"; mv "$BIN.tmp" "$BIN"
cd /; rm -rf "$WORK"
log "done"
echo "$BIN"
