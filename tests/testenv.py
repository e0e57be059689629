"""A real Kubernetes control plane for tests: etcd + kube-apiserver + kube-controller-manager on 127.0.0.1.

The binaries come from `scripts/controlplane.sh` (built from Debian's source package and cached).
No kubelet runs: Pods stay Pending until a test plays the kubelet by patching `pods/status`.

Run by hand:  python tests/testenv.py --kubeconfig /tmp/kiln.kubeconfig [--rbac]
It prints `ready` once the API answers and runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "kiln-test-admin-token"
CONTROLLERS = "garbagecollector,namespace,job,serviceaccount,serviceaccount-token,deployment,replicaset"


def ensure_binaries() -> Path:
    """Build (first time) or find the cached control-plane binaries."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "controlplane.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip().splitlines()[-1]
    return Path(out)


def ensure_tools() -> Path:
    """kubectl and helm from the project's own installer (cached)."""
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "tools.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout.strip().splitlines()[-1]
    return Path(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ControlPlane:
    """One etcd, kube-apiserver and kube-controller-manager, started and stopped together."""

    workdir: Path
    rbac: bool = False
    """Authorization mode RBAC instead of AlwaysAllow (to prove Kiln's RBAC rules)."""
    bin_dir: Path = field(default_factory=ensure_binaries)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_port: int = 0
    etcd_port: int = 0

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def _log(self, name: str) -> int:
        return os.open(self.workdir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _spawn(self, name: str, argv: list[str]) -> None:
        fd = self._log(name)
        try:
            self.procs[name] = subprocess.Popen(argv, stdout=fd, stderr=fd, stdin=subprocess.DEVNULL,
                                                start_new_session=True)
        finally:
            os.close(fd)

    def start(self, timeout: float = 120) -> ControlPlane:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "certs").mkdir(exist_ok=True)
        sa_key = self.workdir / "sa.key"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        (self.workdir / "tokens.csv").write_text(f'{ADMIN_TOKEN},kiln-admin,kiln-admin,"system:masters"\n')
        self.etcd_port = self.etcd_port or free_port()
        self.api_port = self.api_port or free_port()
        self._write_kubeconfig(self.kubeconfig, ADMIN_TOKEN)
        self.start_etcd()
        self.start_apiserver()
        self.wait_ready(timeout)
        self.start_controller_manager()
        return self

    def start_etcd(self) -> None:
        peer = free_port()
        self._spawn("etcd", [
            str(self.bin_dir / "etcd"), "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"default=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn",
        ])

    def start_apiserver(self) -> None:
        self._spawn("kube-apiserver", [
            str(self.bin_dir / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}",
            f"--cert-dir={self.workdir / 'certs'}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            f"--authorization-mode={'RBAC' if self.rbac else 'AlwaysAllow'}",
            f"--service-account-key-file={self.workdir / 'sa.key'}",
            f"--service-account-signing-key-file={self.workdir / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--endpoint-reconciler-type=none", "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true", "--watch-cache=true", "--v=1",
        ])

    def start_controller_manager(self) -> None:
        self._spawn("kube-controller-manager", [
            str(self.bin_dir / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", f"--controllers={CONTROLLERS}",
            f"--service-account-private-key-file={self.workdir / 'sa.key'}",
            f"--root-ca-file={self.workdir / 'certs' / 'apiserver.crt'}",
            "--leader-elect=false", "--port=0", "--secure-port=0", "--use-service-account-credentials=false",
            "--concurrent-deployment-syncs=10", "--concurrent-replicaset-syncs=10", "--v=1",
        ])

    def _write_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> None:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: kiln-test\n  cluster:\n    server: {self.server}\n    insecure-skip-tls-verify: true\n"
            f"users:\n- name: user\n  user:\n    token: {token}\n"
            f"contexts:\n- name: kiln-test\n  context:\n    cluster: kiln-test\n    user: user\n    namespace: {namespace}\n"
            "current-context: kiln-test\n"
        )

    def kubeconfig_for_token(self, token: str, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with another bearer token (e.g. a ServiceAccount's)."""
        self._write_kubeconfig(path, token, namespace)
        return path

    def wait_ready(self, timeout: float = 120) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir / (name + '.log')}")
            try:
                req = urllib.request.Request(self.server + "/readyz",
                                             headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
                with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s: {last}")

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def restart_apiserver(self, with_etcd: bool = False) -> None:
        """Stop and start kube-apiserver (and etcd), same ports and data: a control-plane outage."""
        self.stop_process("kube-apiserver")
        if with_etcd:
            self.stop_process("etcd")
            self.start_etcd()
        self.start_apiserver()
        self.wait_ready()

    def stop(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self.stop_process(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True, help="where to write the kubeconfig once ready")
    parser.add_argument("--rbac", action="store_true", help="authorization mode RBAC instead of AlwaysAllow")
    parser.add_argument("--workdir", help="state folder (default: a temporary one, removed at exit)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="kiln-cp-"))
    cp = ControlPlane(workdir, rbac=args.rbac)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        cp.start()
        shutil.copyfile(cp.kubeconfig, args.kubeconfig)
        print("ready", flush=True)
        while not stop.wait(1):
            for name, proc in cp.procs.items():
                if proc.poll() is not None:
                    print(f"{name} exited with {proc.returncode}", file=sys.stderr)
                    stop.set()
    finally:
        cp.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
