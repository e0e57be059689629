#!/usr/bin/env bash
# Builds Kiln's images for the local node from the project's own Dockerfiles, with buildah and no
# registry at all, and hands them to the node's containerd:
#
#   localhost/kiln/python-base:bookworm  Debian bookworm + python3.11 (mmdebstrap); the base of the three below
#   localhost/kiln/python-build:bookworm the same + gcc and Python's headers: the server's build stage only
#                                        (--build-arg BUILD_IMAGE; not imported into containerd)
#   localhost/kiln/operator:dev          images/operator/Dockerfile, --build-arg PYTHON_IMAGE=<python-base>
#   localhost/kiln/server:dev            images/server/Dockerfile,   --build-arg PYTHON_IMAGE=<python-base>
#   localhost/kiln/trainer:dev           images/trainer/Dockerfile,  --build-arg TF_IMAGE=<python-base>
#                                        (no TensorFlow in that base, so it installs the extra's tensorflow-cpu)
#   localhost/kiln/pause:3.4             the pod sandbox: Kubernetes' own pause.c, static, FROM scratch
#
# The Dockerfiles keep their public defaults (python:3.11-slim-bookworm, tensorflow/tensorflow:2.21.0-gpu)
# for real clusters; only the build argument points them at the local base here.
#
# Usage: scripts/images.sh [build]   build what is stale, export the archives, import them into the node's
#                                    containerd if it answers; one line per image: name, built/cached, seconds
#        scripts/images.sh import    only import the archives into the running containerd (scripts/cluster.sh up)
#        scripts/images.sh list      what is built and exported, and what containerd has
# Env:   KILN_CACHE (default ~/.cache/kiln), KILN_TRAINER_EXTRAS (EXTRAS of the trainer image, default "s3"),
#        KILN_DEBIAN_MIRROR / KILN_DEBIAN_SECURITY_MIRROR (for the base rootfs)
#
# Where things live (nothing system-wide: no /etc/containers, no /var/lib/containers, no /run/runc):
#   $KILN_CACHE/buildah/            storage, configs, build folders, temp files, logs
#   $IMAGES_DIR/NAME.docker.tar     docker-archive of each image (`ctr images import` keeps its name)
#   $IMAGES_DIR/NAME.stamp          input hash + image id of the build that archive holds
#   $IMAGES_DIR/NAME.imported       input hash of the build last imported into containerd + containerd's digest
#
# When an image is rebuilt: its input hash covers the Dockerfile, every file its COPY/ADD lines take from
# the build context (path, mode, content), the build arguments, the base image's id and the build recipe
# (flags, buildah version). An image is "cached" when its stamp has that hash, its archive exists and
# buildah still holds the very image id the stamp names. A rebuilt base gets a new id, so everything on it
# is rebuilt too. To refresh the Debian base (security updates), delete $KILN_CACHE/buildah/base/rootfs.tar.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
USAGE="usage: scripts/images.sh [build|import|list]"
die() { echo "images.sh: $*" >&2; exit 1; }

MODE="${1:-build}"
case "$MODE" in
  build | import | list) ;;
  -h | --help) echo "$USAGE"; exit 0 ;;
  *) echo "$USAGE" >&2; exit 2 ;;
esac
[[ $# -le 1 ]] || { echo "$USAGE" >&2; exit 2; }
[[ "$(id -u)" -eq 0 ]] || die "must run as root (buildah with runc, mmdebstrap --mode=root and containerd need it)"

if [[ "$MODE" == build ]]; then
  for tool in gcc strip sha256sum tar flock awk timeout apt-get; do
    command -v "$tool" >/dev/null || die "missing prerequisite: $tool"
  done
  # buildah, runc, umoci, mmdebstrap and ctr come from the private node root (cached after the first run)
  bash "$REPO/scripts/nodepkgs.sh" >/dev/null || die "scripts/nodepkgs.sh failed: no private buildah/runc/mmdebstrap"
fi
# shellcheck source-path=SCRIPTDIR source=lib/nodeenv.sh
source "$REPO/scripts/lib/nodeenv.sh"
need=(buildah ctr flock sha256sum timeout)
[[ "$MODE" == build ]] && need+=(runc mmdebstrap)
for tool in "${need[@]}"; do
  command -v "$tool" >/dev/null || die "missing prerequisite: $tool (run scripts/nodepkgs.sh)"
done

IMAGES=(python-base pause operator server trainer)
ref_of() {
  case "$1" in
    python-base) echo localhost/kiln/python-base:bookworm ;;
    python-build) echo localhost/kiln/python-build:bookworm ;;
    pause) echo localhost/kiln/pause:3.4 ;;
    *) echo "localhost/kiln/$1:dev" ;;
  esac
}
BASE_REF="$(ref_of python-base)"
BUILD_REF="$(ref_of python-build)"

# ---------------------------------------------------------------------------------------- buildah setup
# buildah reads its storage, registries, policy and engine settings from /etc/containers by default;
# these variables point every buildah call at private files instead, so nothing system-wide is needed
# and the host's own container setup (if any) is neither used nor touched.
B="$KILN_CACHE/buildah"
CONF="$B/conf"
LOGS="$B/logs"
mkdir -p "$CONF" "$LOGS" "$B/tmp" "$B/runc" "$B/ctx" "$B/base" "$IMAGES_DIR"
cat >"$CONF/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$B/storage"
runroot = "$B/run"
EOF
# No search registries: an unqualified FROM can never turn into a docker.io look-up.
echo 'unqualified-search-registries = []' >"$CONF/registries.conf"
# Only local images are ever used (--pull=never); there is nothing to verify signatures against.
echo '{"default": [{"type": "insecureAcceptAnything"}]}' >"$CONF/policy.json"
# The private runc and seccomp profile (the compiled-in paths are /usr/...); cgroupfs: no systemd here.
# The CNI settings are never used (RUN steps take --network=host or none) but buildah insists on a backend.
cat >"$CONF/containers.conf" <<EOF
[containers]
seccomp_profile = "$NODE_ROOT/usr/share/containers/seccomp.json"
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
[engine.runtimes]
runc = ["$NODE_ROOT/usr/sbin/runc"]
[network]
network_backend = "cni"
cni_plugin_dirs = ["$NODE_ROOT/usr/lib/cni"]
network_config_dir = "$CONF/cni-unused"
EOF
export CONTAINERS_STORAGE_CONF="$CONF/storage.conf"
export CONTAINERS_REGISTRIES_CONF="$CONF/registries.conf"
export CONTAINERS_CONF="$CONF/containers.conf"
export BUILDAH_ISOLATION=oci
# Layer tars of the trainer are over a GB; the default /var/tmp may be small or shared.
export TMPDIR="$B/tmp"
POLICY=(--signature-policy "$CONF/policy.json")
# runc's state goes under the cache too (its default --root is /run/runc).
RUNC_FLAGS=(--runtime-flag "root=$B/runc")
BUD=(buildah bud "${POLICY[@]}" "${RUNC_FLAGS[@]}" --pull=never)
# The application images' RUN steps use pip against PyPI: the host network (no CNI, no NAT needed), and the
# host's CA bundle mounted for those steps only (PyPI is reached through a TLS-intercepting proxy here;
# -v is never committed into the image). --layers: the trainer's dependency layer (TensorFlow & co.)
# depends only on pyproject.toml, so a code change reuses it; --force-rm: no containers left by a failed
# step (buildah accepts it only together with --layers).
APP_FLAGS=(--layers --force-rm --network=host -v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
# Bump when the way images are built changes in a way the hashed inputs below do not show.
RECIPE="kiln-images/1"

# --------------------------------------------------------------------------------------------- helpers
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
sha() { sha256sum | cut -d' ' -f1; }
note() { echo "images.sh: $*" >&2; }
report() { printf '%-36s %-8s %6s s%s\n' "$1" "$2" "$3" "${4:+  ($4)}"; }   # REF STATE SECONDS [DETAIL]
stamp_get() { sed -n "s/^$2=//p" "$IMAGES_DIR/$1.stamp" 2>/dev/null || true; }
image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1" 2>/dev/null || true; }
image_size() { buildah images --noheading --format '{{.Size}}' "$1" 2>/dev/null | head -n1 || true; }

# run_logged LOG cmd...: a build's output goes to its log; on failure the end of it is shown.
run_logged() {
  local log=$1; shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 25 "$log" >&2
    die "failed: $1 $2 ... (full log: $log)"
  fi
}

# Context paths the Dockerfile's COPY/ADD lines take (lines joined at backslashes; not `--from` a stage).
copy_sources() {
  awk '
    function take(line,   f, n, i, src, from) {
      n = split(line, f, /[ \t]+/)
      if (f[1] == "") { for (i = 1; i < n; i++) f[i] = f[i + 1]; n-- }
      if (toupper(f[1]) != "COPY" && toupper(f[1]) != "ADD") return
      if (f[2] ~ /^\[/ || line ~ /<</) { print "UNSUPPORTED " line; return }
      src = 0; from = 0
      for (i = 2; i <= n; i++) { if (f[i] ~ /^--from=/) from = 1; else if (f[i] !~ /^--/) a[++src] = f[i] }
      if (!from) for (i = 1; i < src; i++) print a[i]
    }
    /^[ \t]*#/ { next }
    { line = line $0 }
    /\\[ \t]*$/ { sub(/\\[ \t]*$/, " ", line); next }
    { take(line); line = "" }' "$1"
}

# stage_context NAME DOCKERFILE: $B/ctx/NAME gets exactly the files the Dockerfile copies, minus what
# its <Dockerfile>.dockerignore drops and minus Python byte-code (host test runs leave __pycache__ behind;
# it would change the hash on every test run and is rebuilt inside the image anyway). Building from this
# folder means the hash below covers precisely what the build sees.
stage_context() {
  local name=$1 df=$2 dir="$B/ctx/$1" src pat srcs=() ex=(--no-anchored --exclude=__pycache__ --exclude='*.pyc')
  while read -r src; do
    [[ "$src" == UNSUPPORTED* ]] && die "$df: COPY/ADD form not understood here: ${src#UNSUPPORTED }"
    src="${src#./}"
    [[ "$src" != *://* && "$src" != /* && "$src" != *..* ]] || die "$df: COPY/ADD source outside the context: $src"
    [[ -e "$REPO/$src" ]] || die "$df: COPY/ADD source does not exist: $src"
    srcs+=("$src")
  done < <(copy_sources "$df")
  if [[ -f "$df.dockerignore" ]]; then
    # GNU tar patterns: '**/x' matches x at any depth (unanchored), anything else from the context root.
    while read -r pat; do
      pat="${pat%/}"
      case "$pat" in '' | '#'*) continue ;; '!'*) die "$df.dockerignore: '!' exceptions are not supported here" ;; esac
      if [[ "$pat" == '**/'* ]]; then ex+=(--no-anchored --exclude="${pat#'**/'}"); else ex+=(--anchored --exclude="${pat#/}"); fi
    done <"$df.dockerignore"
  fi
  rm -rf "$dir"; mkdir -p "$dir"
  [[ ${#srcs[@]} -eq 0 ]] || tar -C "$REPO" "${ex[@]}" -cf - "${srcs[@]}" | tar -C "$dir" -xf -
}

# Hash of a folder: every entry's type, mode and relative path (symlinks: target), then file contents.
tree_hash() {
  (
    cd "$1"
    find . -mindepth 1 \( -type l -printf 'l %l %p\n' -o -printf '%y %m %p\n' \) | LC_ALL=C sort
    find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum
  ) | sha
}

# up_to_date NAME REF HASH -> "cached" | "export" (image current, archive missing) | "build"
up_to_date() {
  local id
  id="$(image_id "$2")"
  if [[ "$(stamp_get "$1" hash)" != "$3" || -z "$id" || "$id" != "$(stamp_get "$1" id)" ]]; then
    echo build
  elif [[ -s "$IMAGES_DIR/$1.docker.tar" ]]; then
    echo cached
  else
    echo export
  fi
}

# export_image NAME REF HASH: docker-archive (the format `ctr images import` names after RepoTags), then the
# stamp; the stamp is written last, so an interrupted run never leaves a stamp for a half-written archive.
export_image() {
  local tar="$IMAGES_DIR/$1.docker.tar"
  rm -f "$tar.tmp"
  run_logged "$LOGS/$1-export.log" buildah push "${POLICY[@]}" "$2" "docker-archive:$tar.tmp:$2"
  mv -f "$tar.tmp" "$tar"
  printf 'hash=%s\nid=%s\nref=%s\nbuilt=%s\n' "$3" "$(image_id "$2")" "$2" "$(date -Is)" >"$IMAGES_DIR/$1.stamp.tmp"
  mv -f "$IMAGES_DIR/$1.stamp.tmp" "$IMAGES_DIR/$1.stamp"
}

# ensure NAME HASH PREP_FN BUD_ARGS...: build (PREP_FN first: staging that only a build needs) + export
# when stale, then print the image's line. Seconds are counted from STEP_T0 (the caller's start: staging,
# hashing, the rootfs) and the line's detail starts with STEP_DETAIL.
ensure() {
  local name=$1 hash=$2 prep=$3 ref t1 state detail="$STEP_DETAIL"
  shift 3
  ref="$(ref_of "$name")"
  state="$(up_to_date "$name" "$ref" "$hash")"
  if [[ "$state" == build ]]; then
    note "building $ref (log: $LOGS/$name.log)"
    [[ "$prep" == - ]] || "$prep"
    t1="$(now)"
    run_logged "$LOGS/$name.log" "${BUD[@]}" -t "$ref" "$@"
    detail="${detail:+$detail, }bud $(since "$t1") s"
  fi
  if [[ "$state" != cached ]]; then
    t1="$(now)"
    export_image "$name" "$ref" "$hash"
    detail="${detail:+$detail, }export $(since "$t1") s, $(image_size "$ref")"
    BUILT+=("$name")
  fi
  [[ "$state" == export ]] && state=exported
  [[ "$state" == build ]] && state=built
  report "$ref" "$state" "$(since "$STEP_T0")" "$detail"
}

# ------------------------------------------------------------------------------------------ the images
# python-base: mmdebstrap (--variant=essential: no apt, no init, no shell extras) + python3.11, venv, CA
# certificates and libstdc++6 (onnxruntime and most manylinux wheels need it; python:3.11-slim has it),
# as one tar; then `FROM scratch / ADD rootfs.tar /` and a venv at /opt/python first on PATH, so `python`
# and `pip` work as in python:3.11-slim (Debian's own python3 is PEP 668 "externally managed"; a venv is not).
DEBIAN_MIRROR="${KILN_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${KILN_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# (commas are mmdebstrap's list syntax; $1 in the hook is mmdebstrap's, expanded by the shell it runs)
# shellcheck disable=SC2054,SC2016
ROOTFS_ARGS=(--mode=root --variant=essential
  --hook-dir="$NODE_ROOT/usr/share/mmdebstrap/hooks/merged-usr"
  --include=usr-is-merged,python3,python3-venv,ca-certificates,libstdc++6
  --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='APT::Install-Recommends "false"'
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*'
  --skip=output/dev --format=tar
  --customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*.log "$1"/var/cache/ldconfig/aux-cache')
ROOTFS_SOURCES=("deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main"
  "deb $SECURITY_MIRROR bookworm-security main")

# The rootfs is not reproducible (timestamps), so its sha256 is taken once, when it is made, and kept in
# rootfs.stamp with the hash of the mmdebstrap command that made it; a warm run never re-reads 130 MB.
make_rootfs() {  # make_rootfs DIR [EXTRA_PACKAGES]: DIR/rootfs.tar, with EXTRA_PACKAGES (comma-separated) added
  local dir=$1 extra=${2:-} tar="$1/rootfs.tar" recipe t0 args=("${ROOTFS_ARGS[@]}")
  [[ -z "$extra" ]] || args+=(--include="$extra")
  recipe="$(printf '%s\n' "${args[@]}" "${ROOTFS_SOURCES[@]}" | sha)"
  if [[ ! -f "$tar" || "$(sed -n 's/^recipe=//p' "$dir/rootfs.stamp" 2>/dev/null)" != "$recipe" ]]; then
    note "making the Debian bookworm rootfs in $dir with mmdebstrap (log: $LOGS/mmdebstrap-$(basename "$dir").log)"
    t0="$(now)"
    rm -rf "$tar" "$tar.tmp.tar" "$dir/rootfs.stamp"
    # (mmdebstrap picks the output format from the file name: the temporary name must end in .tar)
    run_logged "$LOGS/mmdebstrap-$(basename "$dir").log" mmdebstrap "${args[@]}" bookworm "$tar.tmp.tar" "${ROOTFS_SOURCES[@]}"
    mv -f "$tar.tmp.tar" "$tar"
    printf 'recipe=%s\nsha256=%s\n' "$recipe" "$(sha <"$tar")" >"$dir/rootfs.stamp"
    STEP_DETAIL="mmdebstrap $(since "$t0") s, rootfs $(du -m "$tar" | cut -f1) MB"
  fi
}

# python_base_dockerfile REF: the Dockerfile of a base on DIR/rootfs.tar (a venv at /opt/python first on PATH).
python_base_dockerfile() {
  cat <<EOF
# $1 (written by scripts/images.sh): Debian bookworm from mmdebstrap + python3.11
FROM scratch
ADD rootfs.tar /
ENV LANG=C.UTF-8
RUN python3 -m venv /opt/python && /opt/python/bin/pip --version && rm -rf /root/.cache
ENV VIRTUAL_ENV=/opt/python PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
CMD ["python3"]
EOF
}

build_python_base() {
  STEP_T0="$(now)" STEP_DETAIL=""
  python_base_dockerfile "$BASE_REF" >"$B/base/Dockerfile"
  local hash
  make_rootfs "$B/base"
  hash="$( { echo "$RECIPE"; buildah --version; cat "$B/base/Dockerfile"; cat "$B/base/rootfs.stamp"; } | sha)"
  ensure python-base "$hash" - --network=none -f "$B/base/Dockerfile" "$B/base"
}

# python-build: the same Debian + python3.11 with a C compiler and Python's headers, for the server's build
# stage (images/server/build_compiled.py compiles its request path with Cython). Only a build stage uses
# it: no image that runs on the node contains a compiler. Not imported into containerd.
BUILD_PACKAGES=gcc,libc6-dev,python3-dev
build_python_build() {
  STEP_T0="$(now)" STEP_DETAIL=""
  mkdir -p "$B/build-base"
  python_base_dockerfile "$BUILD_REF" >"$B/build-base/Dockerfile"
  local hash
  make_rootfs "$B/build-base" "$BUILD_PACKAGES"
  hash="$( { echo "$RECIPE"; buildah --version; cat "$B/build-base/Dockerfile"; cat "$B/build-base/rootfs.stamp"; } | sha)"
  ensure python-build "$hash" - --network=none -f "$B/build-base/Dockerfile" "$B/build-base"
}

# pause: Kubernetes 1.20's build/pause/linux/pause.c (copied out of the source tree by
# scripts/controlplane.sh), static so that `FROM scratch` is enough.
PAUSE_CFLAGS=(-Os -Wall -Werror -static -DVERSION=v3.4-kiln)
build_pause_binary() {
  local dir="$B/ctx/pause"
  rm -rf "$dir"; mkdir -p "$dir"
  cp "$K8S_BIN/pause.c" "$dir/pause.c"
  printf 'FROM scratch\nADD pause /pause\nENTRYPOINT ["/pause"]\n' >"$dir/Dockerfile"
  gcc "${PAUSE_CFLAGS[@]}" -o "$dir/pause" "$dir/pause.c"
  strip "$dir/pause"
}
build_pause() {
  STEP_T0="$(now)" STEP_DETAIL=""
  if [[ ! -f "$K8S_BIN/pause.c" ]]; then
    note "waiting for scripts/controlplane.sh (pause.c comes from its Kubernetes source tree; log: $LOGS/controlplane.log)"
    bash "$REPO/scripts/controlplane.sh" >/dev/null 2>"$LOGS/controlplane.log" \
      || { tail -n 20 "$LOGS/controlplane.log" >&2; die "scripts/controlplane.sh failed (log: $LOGS/controlplane.log)"; }
  fi
  local hash
  hash="$( { echo "$RECIPE"; buildah --version; gcc --version | head -n1; echo "${PAUSE_CFLAGS[*]}"; sha <"$K8S_BIN/pause.c"; } | sha)"
  ensure pause "$hash" build_pause_binary --network=none -f "$B/ctx/pause/Dockerfile" "$B/ctx/pause"
}

# operator, server, trainer: the project's Dockerfiles, on the local python-base.
build_app() {
  local name=$1 df="$REPO/images/$1/Dockerfile" base_id hash args=()
  STEP_T0="$(now)" STEP_DETAIL=""
  case "$name" in
    trainer) args=(--build-arg "TF_IMAGE=$BASE_REF" --build-arg "EXTRAS=${KILN_TRAINER_EXTRAS-s3}") ;;
    server) args=(--build-arg "PYTHON_IMAGE=$BASE_REF" --build-arg "BUILD_IMAGE=$BUILD_REF") ;;
    *) args=(--build-arg "PYTHON_IMAGE=$BASE_REF") ;;
  esac
  base_id="$(image_id "$BASE_REF")"
  [[ -n "$base_id" ]] || die "$BASE_REF is missing from buildah's storage"
  if [[ "$name" == server ]]; then
    base_id="$base_id build $(image_id "$BUILD_REF")"
    [[ "$base_id" != *"build " ]] || die "$BUILD_REF is missing from buildah's storage"
  fi
  stage_context "$name" "$df"
  hash="$( { echo "$RECIPE"; buildah --version; echo "${APP_FLAGS[*]}" "${args[*]}"; echo "base $base_id"
             sha <"$df"; echo "context $(tree_hash "$B/ctx/$name")"; } | sha)"
  ensure "$name" "$hash" - "${APP_FLAGS[@]}" "${args[@]}" -f "$df" "$B/ctx/$name"
}

# ------------------------------------------------------------------------------------------ containerd
CTR=(ctr --address "$CTR_SOCK" -n k8s.io)
ctr_up() { [[ -S "$CTR_SOCK" ]] && timeout 10 ctr --address "$CTR_SOCK" version >/dev/null 2>&1; }
ctr_digest() { "${CTR[@]}" images ls "name==$1" 2>/dev/null | awk 'NR > 1 { print $3 }' || true; }

# containerd derives the same digest from the same archive, so "this build's hash was imported and the
# name still points at the digest it got" means containerd already has exactly this image.
import_all() {
  local name ref tar want cur t0
  for name in "${IMAGES[@]}"; do
    ref="$(ref_of "$name")"
    tar="$IMAGES_DIR/$name.docker.tar"
    [[ -s "$tar" && -f "$IMAGES_DIR/$name.stamp" ]] || die "no archive for $ref in $IMAGES_DIR: run scripts/images.sh build first"
    t0="$(now)"
    want="$(stamp_get "$name" hash)"
    cur="$(ctr_digest "$ref")"
    if [[ -n "$cur" && "$(cat "$IMAGES_DIR/$name.imported" 2>/dev/null)" == "$want $cur" ]]; then
      report "$ref" present "$(since "$t0")" "containerd"
      continue
    fi
    run_logged "$LOGS/$name-import.log" "${CTR[@]}" images import "$tar"
    cur="$(ctr_digest "$ref")"
    [[ -n "$cur" ]] || die "containerd has no $ref after importing $tar"
    echo "$want $cur" >"$IMAGES_DIR/$name.imported"
    report "$ref" imported "$(since "$t0")" "containerd"
  done
}

list_all() {
  local name ref id up=0 cur state
  ctr_up && up=1
  printf '%-36s %-12s %-9s %-9s %-25s %s\n' IMAGE BUILDAH-ID SIZE ARCHIVE BUILT CONTAINERD
  for name in "${IMAGES[@]}"; do
    ref="$(ref_of "$name")"
    id="$(image_id "$ref")"
    id="${id:-absent}"
    if [[ "$up" == 0 ]]; then
      state="(not running)"
    else
      cur="$(ctr_digest "$ref")"
      if [[ -z "$cur" ]]; then state=absent
      elif [[ "$(cat "$IMAGES_DIR/$name.imported" 2>/dev/null)" == "$(stamp_get "$name" hash) $cur" ]]; then state="current ${cur:7:12}"
      else state="other build ${cur:7:12}"
      fi
    fi
    printf '%-36s %-12s %-9s %-9s %-25s %s\n' "$ref" "${id:0:12}" "$(image_size "$ref")" \
      "$(if [[ -s "$IMAGES_DIR/$name.docker.tar" ]]; then du -h "$IMAGES_DIR/$name.docker.tar" | cut -f1; else echo -; fi)" \
      "$(stamp_get "$name" built)" "$state"
  done
}

# ----------------------------------------------------------------------------------------------- main
if [[ "$MODE" == list ]]; then
  list_all
  exit 0
fi
# One build or import at a time (buildah locks its storage, but not our stamps and archives).
exec 9>"$KILN_CACHE/.images.lock"
flock 9
if [[ "$MODE" == import ]]; then
  ctr_up || die "containerd does not answer at $CTR_SOCK (start it first: scripts/cluster.sh up)"
  import_all
  exit 0
fi

T0="$(now)"
BUILT=()
build_python_base
build_python_build
for app in operator server trainer; do build_app "$app"; done
build_pause
# Old builds' layers (untagged, nothing built on them) would pile up on every rebuild.
[[ ${#BUILT[@]} -eq 0 ]] || buildah rmi --prune >/dev/null 2>&1 || true
if ctr_up; then
  import_all
else
  note "containerd is not running at $CTR_SOCK: import skipped (scripts/cluster.sh up runs 'scripts/images.sh import')"
fi
note "done in $(since "$T0") s"
