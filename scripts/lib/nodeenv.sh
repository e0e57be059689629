# Sourced by scripts/cluster.sh and scripts/images.sh: puts the private node root (scripts/nodepkgs.sh)
# first on PATH. Nothing here is system-wide; it only changes this shell's environment.
KILN_CACHE="${KILN_CACHE:-$HOME/.cache/kiln}"
NODE_ROOT="$KILN_CACHE/node/root"
K8S_BIN="$KILN_CACHE/k8s-1.20/bin"        # scripts/controlplane.sh: apiserver, controller-manager, etcd, kubelet, ...
KUBECTL="$KILN_CACHE/tools/kubectl"        # scripts/tools.sh
# Run folder: configs, state, sockets and logs of the running cluster (removed by `cluster.sh down`).
RUN_DIR="${KILN_CLUSTER_DIR:-$KILN_CACHE/cluster}"
IMAGES_DIR="$KILN_CACHE/images"            # image archives + content stamps (scripts/images.sh)
export PATH="$NODE_ROOT/links:$NODE_ROOT/usr/sbin:$NODE_ROOT/usr/bin:$K8S_BIN:$PATH"
export LD_LIBRARY_PATH="$NODE_ROOT/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export XTABLES_LIBDIR="$NODE_ROOT/usr/lib/x86_64-linux-gnu/xtables"   # the compiled-in path is /usr/lib/...
CTR_SOCK="$RUN_DIR/run/containerd/containerd.sock"
