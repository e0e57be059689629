#!/usr/bin/env bash
# Downloads (never installs) the node's runtime and image tooling from Debian bookworm and unpacks it with
# `dpkg-deb -x` into a private root, $KILN_CACHE/node/root (default ~/.cache/kiln/node/root):
# containerd 1.6, runc, the CNI plugins, iptables (nft backend), conntrack, nftables, buildah, umoci,
# mmdebstrap and dnsmasq-base. The host's dpkg status only decides which dependencies are already there.
# Nothing is installed system-wide. Cached: a second run only prints the root folder.
# Usage: scripts/nodepkgs.sh      # prints the root folder
set -euo pipefail
CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
ROOT="$CACHE/node/root"
have_all() {
  [[ -x "$ROOT/usr/bin/containerd" && -x "$ROOT/usr/sbin/runc" && -x "$ROOT/usr/bin/buildah" && -x "$ROOT/usr/sbin/nft" \
     && -x "$ROOT/usr/sbin/dnsmasq" && -x "$ROOT/usr/bin/mmdebstrap" && -x "$ROOT/usr/lib/cni/bridge" && -x "$ROOT/links/iptables" ]]
}
if have_all; then echo "$ROOT"; exit 0; fi
mkdir -p "$CACHE/node"
exec 9>"$CACHE/node/.pkgs.lock"; flock 9
if have_all; then echo "$ROOT"; exit 0; fi
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null \
  || { echo "nodepkgs: needs apt-get and dpkg-deb (a Debian or Ubuntu host)" >&2; exit 1; }
WORK="$CACHE/node/pkgs-work"
rm -rf "$WORK"; mkdir -p "$WORK"/{apt/lists/partial,apt/cache/archives/partial,debs}
SRC="$WORK/apt/sources.list"
# shellcheck source=lib/aptsources.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/aptsources.sh"
debian_sources "$SRC" || { echo "nodepkgs: no Debian apt sources found in /etc/apt" >&2; exit 1; }
APT=(-o Dir::Etc::SourceList="$SRC" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$WORK/apt/lists" -o Dir::Cache="$WORK/apt/cache"
     -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
apt-get "${APT[@]}" update -qq >&2
# nftables: `nft delete table` at teardown (iptables-nft leaves empty tables behind); dnsmasq-base: cluster DNS
PKGS=(containerd runc containernetworking-plugins iptables conntrack buildah umoci mmdebstrap nftables dnsmasq-base)
apt-get "${APT[@]}" install -d -y -qq --no-install-recommends "${PKGS[@]}" >&2
# Packages the host already has are not downloaded by `install -d`: take private copies of the ones we run.
( cd "$WORK/debs" && apt-get "${APT[@]}" download -qq runc iptables libip4tc2 libip6tc2 libxtables12 libnftnl11 \
    libnetfilter-conntrack3 libnfnetlink0 libmnl0 nftables libnftables1 conntrack >&2 )
rm -rf "$ROOT.tmp"; mkdir -p "$ROOT.tmp"
for d in "$WORK"/apt/cache/archives/*.deb "$WORK"/debs/*.deb; do dpkg-deb -x "$d" "$ROOT.tmp"; done
# Debian makes these with update-alternatives; iptables-nft is Debian's default backend.
mkdir -p "$ROOT.tmp/links"
for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
  ln -sf "$ROOT/usr/sbin/xtables-nft-multi" "$ROOT.tmp/links/$n"; done
rm -rf "$ROOT"; mv "$ROOT.tmp" "$ROOT"; rm -rf "$WORK"
echo "$ROOT"
