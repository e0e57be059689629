#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 on this machine, from registry-free parts only:
#   control plane  etcd + kube-apiserver (RBAC + Node authorization) + kube-controller-manager + kube-scheduler
#   node           kubelet + kube-proxy (iptables) + containerd 1.6 + runc + CNI bridge, named "kiln-node"
#   DNS            dnsmasq answering <service>.<namespace>.svc.cluster.local from the Service list
# Binaries come from Debian packages (scripts/controlplane.sh builds Kubernetes from Debian's source package,
# scripts/nodepkgs.sh unpacks containerd/runc/CNI/iptables/dnsmasq privately); images from scripts/images.sh.
# Everything is cached under $KILN_CACHE (~/.cache/kiln); nothing is installed system-wide.
#
#   scripts/cluster.sh up        start it (builds what is not cached yet); prints the kubeconfig path
#   scripts/cluster.sh down      stop it and put the machine back as it was (iptables, bridge, mounts,
#                                sysctls, cgroups, processes, the kubelet's fixed paths)
#   scripts/cluster.sh status    what runs; exit 0 when the node is Ready
#   scripts/cluster.sh env       `export KUBECONFIG=...` for eval
#
# Network: the cluster only talks to 127.0.0.1 and to 10.244.0.0/24, the pods' bridge kiln-cni0 whose gateway
# 10.244.0.1 is the node IP, the API address and the DNS server. Pods get no default route (CNI routes only the
# Service range), nothing is masqueraded, and a FORWARD rule drops anything leaving the bridge for another
# interface. Images are localhost/... with IfNotPresent: a pull can only ever try 127.0.0.1.
# Limits: one node; no LoadBalancer/Ingress; no NetworkPolicy enforcement; no GPUs; DNS has A records for
# ClusterIP Services only (no SRV, headless or pod records); the kubelet's API is for the API server only.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/nodeenv.sh
source "$HERE/lib/nodeenv.sh"

BRIDGE=kiln-cni0
NODE_IP=10.244.0.1
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
API_PORT="${KILN_API_PORT:-16443}"
ETCD_PORT=23790
ETCD_PEER_PORT=23800
NODE_NAME=kiln-node
STATE="$RUN_DIR/state"
LOGS="$RUN_DIR/logs"
CONF="$RUN_DIR/conf"
DNS_DIR=/run/kiln-cluster-dns               # the Service hosts file dnsmasq answers from (see start_dns)
KUBECONFIG_FILE="$RUN_DIR/kubeconfig"
CTR=(ctr --address "$CTR_SOCK" -n k8s.io)
# Paths kubelet 1.20, containerd and libcni write to whatever their flags say: removed by `down` if new.
FIXED_PATHS=(/var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni /run/containerd)
SYSCTLS=(net.ipv4.ip_forward net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
         vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
         kernel.keys.root_maxkeys kernel.keys.root_maxbytes)

log() { echo "[cluster $(date +%T)] $*" >&2; }
die() { echo "cluster.sh: $*" >&2; exit 1; }
alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
spawn() {  # spawn NAME argv...: a daemon in its own session, its PID recorded for `down`
  local n=$1; shift
  setsid "$@" >>"$LOGS/$n.log" 2>&1 </dev/null &
  echo $! >"$STATE/$n.pid"
}
kc() { "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" "$@"; }
wait_until() {  # wait_until SECONDS WHAT cmd...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || die "timed out after ${secs}s waiting for $what (logs: $LOGS)"
    sleep 0.25
  done
}

# ------------------------------------------------------------------------------------------- prerequisites
prerequisites() {
  [[ $(id -u) == 0 ]] || die "needs root (it creates a bridge, iptables rules, mounts and cgroups)"
  [[ $(uname -s) == Linux ]] || die "needs Linux"
  [[ -d /sys/fs/cgroup/memory && -w /sys/fs/cgroup/memory ]] \
    || die "needs a writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory (kubelet 1.20 uses cgroupfs v1)"
  grep -qw overlay /proc/filesystems || die "needs the overlay filesystem in the kernel (containerd's snapshotter)"
  local t
  for t in ip openssl curl gcc flock apt-get dpkg-deb; do command -v "$t" >/dev/null || die "needs '$t' on PATH"; done
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    if ip -o route show | grep -qE "^(10\.244\.|10\.96\.)"; then die "10.244.0.0/24 or 10.96.0.0/16 is already routed on this machine"; fi
  fi
}

ensure_parts() {  # the cached builds (each a no-op once cached)
  bash "$HERE/controlplane.sh" >/dev/null || die "scripts/controlplane.sh failed (building Kubernetes)"
  bash "$HERE/nodepkgs.sh" >/dev/null || die "scripts/nodepkgs.sh failed (containerd, runc, CNI, iptables)"
  PYTHON="${PYTHON:-python3}" bash "$HERE/tools.sh" >/dev/null || die "scripts/tools.sh failed (kubectl, helm)"
}

# ------------------------------------------------------------------------------------------- configuration
record_host_state() {  # once per up/down cycle: what existed before, so `down` restores exactly that
  [[ -f "$STATE/host.orig" ]] && return 0
  local s d
  { for s in "${SYSCTLS[@]}"; do
      if v=$(sysctl -n "$s" 2>/dev/null); then echo "sysctl $s=$v"; fi
    done
    for d in "${FIXED_PATHS[@]}"; do [[ -e "$d" ]] && echo "existed $d"; done
    nft list tables 2>/dev/null | sed 's/^/nfttable /'
  } >"$STATE/host.orig.tmp" || true
  mv "$STATE/host.orig.tmp" "$STATE/host.orig"
}

write_certs() {  # service-account key, tokens, and a CA + client certificate for API server -> kubelet
  local c="$STATE/pki"
  mkdir -p "$c"
  [[ -f "$c/sa.key" ]] || openssl genrsa -out "$c/sa.key" 2048 2>/dev/null
  if [[ ! -f "$c/kubelet-client.crt" ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$c/kubelet-ca.key" -out "$c/kubelet-ca.crt" -days 3650 \
      -subj "/CN=kiln-kubelet-client-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout "$c/kubelet-client.key" -out "$c/kubelet-client.csr" \
      -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" 2>/dev/null
    openssl x509 -req -in "$c/kubelet-client.csr" -CA "$c/kubelet-ca.crt" -CAkey "$c/kubelet-ca.key" \
      -CAcreateserial -out "$c/kubelet-client.crt" -days 3650 2>/dev/null
  fi
  if [[ ! -f "$c/tokens.csv" ]]; then  # fresh random tokens per cluster; the file stays root-only
    (umask 077; {
      echo "$(openssl rand -hex 16),kiln-admin,kiln-admin,\"system:masters\""
      echo "$(openssl rand -hex 16),system:node:$NODE_NAME,$NODE_NAME,\"system:nodes\""
      echo "$(openssl rand -hex 16),system:kube-proxy,kube-proxy"
    } >"$c/tokens.csv")
  fi
  kubeconfig "$KUBECONFIG_FILE" "$(sed -n 1p "$c/tokens.csv" | cut -d, -f1)"
  kubeconfig "$STATE/node.kubeconfig" "$(sed -n 2p "$c/tokens.csv" | cut -d, -f1)"
  kubeconfig "$STATE/proxy.kubeconfig" "$(sed -n 3p "$c/tokens.csv" | cut -d, -f1)"
}

kubeconfig() {  # kubeconfig FILE TOKEN
  (umask 077; cat >"$1" <<K
apiVersion: v1
kind: Config
clusters: [{name: kiln-node, cluster: {server: "https://$NODE_IP:$API_PORT", insecure-skip-tls-verify: true}}]
users: [{name: kiln, user: {token: "$2"}}]
contexts: [{name: kiln-node, context: {cluster: kiln-node, user: kiln, namespace: default}}]
current-context: kiln-node
K
)
}

write_configs() {
  mkdir -p "$CONF"/{containerd/certs.d,cni,kubelet}
  cat >"$CONF/containerd/config.toml" <<T
# containerd for the kiln node: root (images, snapshots) in the cache so images survive down/up; state,
# socket and runc state in the run folder. Only settings that differ from the defaults are listed.
version = 2
root = "$KILN_CACHE/node/containerd"
state = "$RUN_DIR/run/containerd"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
                    "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$CTR_SOCK"
[plugins."io.containerd.internal.v1.opt"]
  path = "$KILN_CACHE/node/containerd-opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/kiln/pause:3.4"   # built from Kubernetes' pause.c by scripts/images.sh
  disable_apparmor = true
  # Root on these machines may lack CAP_SYS_RESOURCE, so nothing may lower oom_score_adj below its own:
  # without this every sandbox (oomScoreAdj -998) dies in runc init ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true          # pod netns under the run folder, not /var/run/netns
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$NODE_ROOT/usr/sbin/runc"
        Root = "$RUN_DIR/run/runc"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$NODE_ROOT/usr/lib/cni"
    conf_dir = "$CONF/cni"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    # an empty hosts folder: no mirrors, no credentials
    config_path = "$CONF/containerd/certs.d"
T
  cat >"$CONF/cni/10-kiln.conflist" <<J
{
  "cniVersion": "0.4.0",
  "name": "kiln",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "isDefaultGateway": false, "ipMasq": false,
     "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "$STATE/cni/networks",
              "ranges": [[{"subnet": "$POD_CIDR", "gateway": "$NODE_IP"}]],
              "routes": [{"dst": "$SERVICE_CIDR"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}
  ]
}
J
  echo "nameserver 127.0.0.1" >"$CONF/resolv.conf"   # dnsPolicy Default pods: no real resolver reachable
  cat >"$CONF/kubelet/config.yaml" <<Y
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# Only the API server (client certificate from write_certs) may use the kubelet's API: pods on the bridge
# can reach this port, so anonymous requests are refused.
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: "$STATE/pki/kubelet-ca.crt"}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
failSwapOn: false
resolvConf: "$CONF/resolv.conf"
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
podCIDR: $POD_CIDR
serializeImagePulls: false
maxPods: 60
evictionHard: {memory.available: 200Mi, nodefs.available: 3%, imagefs.available: 3%}
imageGCHighThresholdPercent: 98
imageGCLowThresholdPercent: 95
rotateCertificates: false
serverTLSBootstrap: false
Y
}

# ------------------------------------------------------------------------------------------- start
host_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    # The bridge exists before the kubelet: its gateway address is the node IP (kubelet refuses loopback).
    ip link add "$BRIDGE" type bridge
    ip addr add "$NODE_IP/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    # An un-DNATed ClusterIP packet stays on the bridge instead of taking the default route.
    ip route add "$SERVICE_CIDR" dev "$BRIDGE" src "$NODE_IP"
  fi
  iptables -N KILN-ISOLATE 2>/dev/null && iptables -A KILN-ISOLATE -i "$BRIDGE" ! -o "$BRIDGE" -j DROP || true
  iptables -C FORWARD -j KILN-ISOLATE 2>/dev/null || iptables -I FORWARD 1 -j KILN-ISOLATE
  [[ "$(sysctl -n net.bridge.bridge-nf-call-iptables)" == 1 ]] || sysctl -qw net.bridge.bridge-nf-call-iptables=1
}

start_containerd() {
  alive containerd && return 0
  mkdir -p "$RUN_DIR/run"
  spawn containerd "$NODE_ROOT/usr/bin/containerd" --config "$CONF/containerd/config.toml"
  wait_until 30 "containerd" "${CTR[@]}" version
}

start_control_plane() {
  local c="$STATE/pki"
  if ! alive etcd; then
    spawn etcd "$K8S_BIN/etcd" --data-dir "$STATE/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "default=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
      --unsafe-no-fsync --quota-backend-bytes $((2 * 1024 ** 3)) --log-level warn
  fi
  if ! alive kube-apiserver; then
    # The API listens on the node IP: the `kubernetes` Service (10.96.0.1:443) reaches it from pods through
    # kube-proxy, and the host reaches it directly. Lease reconciler: the Service gets that endpoint.
    spawn kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
      --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" --cert-dir="$STATE/apiserver-certs" \
      --token-auth-file="$c/tokens.csv" --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
      --service-account-key-file="$c/sa.key" --service-account-signing-key-file="$c/sa.key" \
      --service-account-issuer=https://kubernetes.default.svc \
      --kubelet-client-certificate="$c/kubelet-client.crt" --kubelet-client-key="$c/kubelet-client.key" \
      --kubelet-preferred-address-types=InternalIP \
      --endpoint-reconciler-type=lease --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=false --v=1
  fi
  wait_until 90 "kube-apiserver /readyz" sh -c "curl -sfk -m 2 -H 'Authorization: Bearer $(sed -n 1p "$c/tokens.csv" | cut -d, -f1)' https://$NODE_IP:$API_PORT/readyz | grep -qx ok"
  if ! alive kube-controller-manager; then
    spawn kube-controller-manager "$K8S_BIN/kube-controller-manager" --kubeconfig="$KUBECONFIG_FILE" \
      --controllers=garbagecollector,namespace,job,serviceaccount,serviceaccount-token,deployment,replicaset,endpoint,endpointslice,nodelifecycle,podgc,ttl,persistentvolume-binder,pvc-protection,pv-protection,clusterrole-aggregation,horizontalpodautoscaling \
      --service-account-private-key-file="$c/sa.key" --root-ca-file="$STATE/apiserver-certs/apiserver.crt" \
      --leader-elect=false --port=0 --secure-port=0 --use-service-account-credentials=false \
      --node-monitor-grace-period=40s --v=1
  fi
  if ! alive kube-scheduler; then
    spawn kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig="$KUBECONFIG_FILE" --leader-elect=false \
      --port=0 --secure-port=0 --v=1
  fi
}

start_dns() {
  # Debian has no CoreDNS: dnsmasq on the node IP answers from a hosts file a watcher rewrites from the
  # Service list (SIGHUP reloads it). --no-resolv and no upstream: it never forwards a query.
  # dnsmasq drops to `nobody` and re-reads the hosts file as that user: it lives outside $HOME (0700 here).
  local d="$DNS_DIR"
  mkdir -p "$d"; chmod 755 "$d"; [[ -f "$d/hosts" ]] || : >"$d/hosts"
  if ! alive dnsmasq; then
    spawn dnsmasq "$NODE_ROOT/usr/sbin/dnsmasq" --keep-in-foreground --log-facility=- --no-resolv --no-hosts --no-poll \
      --addn-hosts="$d/hosts" --listen-address="$NODE_IP" --bind-interfaces --port=53 \
      --local=/cluster.local/ --domain-needed --bogus-priv --user=nobody --pid-file=
  fi
  if ! alive dns-watch; then
    spawn dns-watch bash -c '
      while sleep 1; do
        "$0" --kubeconfig "$1" get svc -A -o jsonpath="{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local{\"\\n\"}{end}" \
          2>/dev/null | grep -v "^None " >"$2/hosts.new" || continue
        cmp -s "$2/hosts.new" "$2/hosts" || { mv "$2/hosts.new" "$2/hosts"; kill -HUP "$(cat "$3")"; }
      done' "$KUBECTL" "$KUBECONFIG_FILE" "$d" "$STATE/dnsmasq.pid"
  fi
}

start_node() {
  mkdir -p "$STATE/kubelet"
  if ! alive kubelet; then
    # AWS_EC2_METADATA_DISABLED: kubelet 1.20's in-tree ECR credential provider would otherwise ask the EC2
    # metadata address (169.254.169.254) for credentials at start, a request that must never leave the machine.
    spawn kubelet env AWS_EC2_METADATA_DISABLED=true "$K8S_BIN/kubelet" --config="$CONF/kubelet/config.yaml" \
      --kubeconfig="$STATE/node.kubeconfig" --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" \
      --container-runtime=remote --container-runtime-endpoint="unix://$CTR_SOCK" \
      --image-service-endpoint="unix://$CTR_SOCK" --runtime-request-timeout=5m \
      --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" \
      --pod-infra-container-image=localhost/kiln/pause:3.4 --v=1
  fi
  if ! alive kube-proxy; then
    # --conntrack-*=0: leave the host's conntrack settings alone; node ports only on the node IP.
    spawn kube-proxy "$K8S_BIN/kube-proxy" --kubeconfig="$STATE/proxy.kubeconfig" \
      --hostname-override="$NODE_NAME" --proxy-mode=iptables --cluster-cidr="$POD_CIDR" \
      --bind-address="$NODE_IP" --healthz-bind-address=127.0.0.1:10256 --metrics-bind-address=127.0.0.1:10249 \
      --nodeport-addresses="$NODE_IP/32" \
      --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0 --v=1
  fi
}

node_ready() {
  [[ "$(kc get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

default_sa_ready() { kc -n default get serviceaccount default -o jsonpath='{.secrets[0].name}' 2>/dev/null | grep -q .; }

up() {
  prerequisites
  ensure_parts
  mkdir -p "$STATE" "$LOGS" "$RUN_DIR/run"
  record_host_state
  local t0=$SECONDS
  write_certs
  write_configs
  host_network
  start_containerd
  bash "$HERE/images.sh" import >&2 || die "importing the images into containerd failed (run scripts/images.sh)"
  "${CTR[@]}" images ls -q | grep -qx localhost/kiln/pause:3.4 || die "no pause image in containerd (run scripts/images.sh)"
  start_control_plane
  start_dns
  start_node
  wait_until 90 "node $NODE_NAME Ready" node_ready
  wait_until 60 "the default ServiceAccount's token" default_sa_ready
  # Only this machine's storage: a StorageClass for hostPath PersistentVolumes made by hand or by tests.
  kc apply -f - >/dev/null <<'S'
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: kiln-local
  annotations: {storageclass.kubernetes.io/is-default-class: "true"}
provisioner: kubernetes.io/no-provisioner
volumeBindingMode: Immediate
reclaimPolicy: Retain
S
  log "node $NODE_NAME Ready ($((SECONDS - t0)) s); logs in $LOGS"
  echo "$KUBECONFIG_FILE"
}

# ------------------------------------------------------------------------------------------- stop
stop_pid() {  # stop_pid NAME: SIGTERM, wait, SIGKILL; only the PID we recorded
  local f="$STATE/$1.pid" pid
  [[ -f "$f" ]] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
  fi
  rm -f "$f"
}

our_shims() {  # containerd-shim-runc-v2 processes serving OUR containerd (matched by its socket)
  local p
  for p in /proc/[0-9]*; do
    tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q "containerd-shim-runc-v2 .*-address $CTR_SOCK" && echo "${p#/proc/}"
  done
  return 0
}

down() {
  [[ $(id -u) == 0 ]] || die "needs root"
  [[ -d "$STATE" ]] || { log "not running"; return 0; }
  if alive kube-apiserver && alive kubelet; then
    # Pods first, through the kubelet, so CNI DEL runs (veths, IPs) and the shims exit.
    kc delete namespace --all --wait=false >/dev/null 2>&1 || true
    kc delete pod --all-namespaces --all --grace-period=0 --force >/dev/null 2>&1 || true
    local end=$((SECONDS + 60))
    while ((SECONDS < end)) && [[ -n "$("${CTR[@]}" tasks ls -q 2>/dev/null)" ]]; do sleep 0.5; done
  fi
  stop_pid kubelet
  stop_pid kube-proxy
  if alive containerd; then  # leftovers: through containerd itself (images stay for the next `up`)
    local t c
    for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks kill -s SIGKILL "$t" 2>/dev/null || true; done
    for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete -f "$t" 2>/dev/null || true; done
    for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers rm "$c" 2>/dev/null || true; done
  fi
  stop_pid containerd
  local s
  for s in $(our_shims); do kill -9 "$s" 2>/dev/null || true; done
  stop_pid dns-watch
  stop_pid dnsmasq
  for s in kube-scheduler kube-controller-manager kube-apiserver etcd; do stop_pid "$s"; done
  # Mounts under our folders (netns bind mounts, rootfs overlays, kubelet volumes), deepest first.
  awk -v a="$RUN_DIR/" -v b="$KILN_CACHE/node/" 'index($2,a)==1 || index($2,b)==1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  # iptables: kube-proxy's own cleanup, then every KUBE-/KILN-/CNI- chain and the jumps to them.
  "$K8S_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  local tbl
  for tbl in filter nat mangle; do
    iptables-save -t "$tbl" 2>/dev/null | grep -q . || continue
    iptables-save -t "$tbl" | grep -v -E -- '(KUBE-|KILN-|CNI-)' | iptables-restore -T "$tbl" 2>/dev/null \
      || log "iptables-restore $tbl failed"
  done
  for tbl in filter nat mangle; do  # tables iptables-nft created: dropped again when empty
    if ! grep -qx "nfttable table ip $tbl" "$STATE/host.orig" 2>/dev/null && nft list table ip "$tbl" >/dev/null 2>&1 \
      && ! iptables-save -t "$tbl" | grep -q '^-A'; then nft delete table ip "$tbl" 2>/dev/null || true; fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  # veths the bridge plugin left (their peers died with the pod netns; normally gone already)
  ip -o link show type veth 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | while read -r v; do
    [[ -n "$v" ]] && ip link show "$v" 2>/dev/null | grep -q "master $BRIDGE" && ip link del "$v" 2>/dev/null; done || true
  # cgroups the kubelet made (cgroupfs driver, every v1 hierarchy)
  local h
  for h in /sys/fs/cgroup/*/kubepods; do [[ -d "$h" ]] && find "$h" -depth -type d -exec rmdir {} \; 2>/dev/null; done || true
  if [[ -f "$STATE/host.orig" ]]; then
    grep '^sysctl ' "$STATE/host.orig" | cut -d' ' -f2 | while read -r kv; do sysctl -qw "$kv" 2>/dev/null || true; done
    local d
    for d in "${FIXED_PATHS[@]}"; do grep -qx "existed $d" "$STATE/host.orig" || rm -rf "$d"; done
  fi
  rm -rf "$RUN_DIR" "$DNS_DIR"
  log "down: the cluster is stopped and the host restored"
}

status() {
  local n rc=0
  for n in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy dnsmasq dns-watch; do
    if alive "$n"; then printf '%-24s running (pid %s)\n' "$n" "$(cat "$STATE/$n.pid")"; else printf '%-24s stopped\n' "$n"; rc=1; fi
  done
  if [[ $rc == 0 ]] && node_ready; then echo "node $NODE_NAME Ready; kubeconfig $KUBECONFIG_FILE"; else echo "node $NODE_NAME not Ready"; rc=1; fi
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export KUBECONFIG=$KUBECONFIG_FILE" ;;
  *) echo "usage: scripts/cluster.sh up|down|status|env" >&2; exit 2 ;;
esac
