"""Session fixtures: one real control plane, the project's kubectl, namespaces, and the real operator.

Tiers (markers): `unit` needs nothing; `live` starts the control plane once per session; `training`
runs TensorFlow; `server` runs model server processes; `helm` runs the helm binary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kubelet import eventually
from testenv import ROOT, ControlPlane, ensure_tools, free_port

KILN = [sys.executable, "-m", "kiln.cli"]


@pytest.fixture(scope="session")
def tools() -> Path:
    """Folder with the project's own kubectl and helm."""
    return ensure_tools()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    # RBAC authorization: the admin token (system:masters) may do anything, while tests that run the operator
    # or the trainer with a ServiceAccount token prove that Kiln's RBAC rules are needed and sufficient.
    cp = ControlPlane(tmp_path_factory.mktemp("control-plane"), rbac=True)
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane, tools: Path):
    """Run the project's kubectl against the test control plane."""

    def run(*args: str, input: str | None = None, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(tools / "kubectl"), "--kubeconfig", str(control_plane.kubeconfig)]
        if namespace:
            argv += ["-n", namespace]
        proc = subprocess.run(argv + list(args), input=input, text=True, capture_output=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    return run


@pytest.fixture(scope="session")
def api(control_plane: ControlPlane, kubectl: Any) -> Any:
    """kiln_operator.kube configured for the test control plane, with Kiln's CRDs installed."""
    from kiln_operator import kube

    kube.configure(str(control_plane.kubeconfig))
    kubectl("apply", "-f", str(ROOT / "crds"))
    for crd in ("trainingjobs.kiln.dev", "modeldeployments.kiln.dev"):
        def established(crd: str = crd) -> bool:
            obj = kube.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            return any(c["type"] == "Established" and c["status"] == "True" for c in obj.get("status", {}).get("conditions") or [])

        eventually(established, 60, what=f"CRD {crd} established")
    return kube


def make_namespace(api: Any, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    api.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    # Pods are only admitted once the namespace's default ServiceAccount has its token.
    eventually(lambda: (api.get("v1", "ServiceAccount", name, "default") or {}).get("secrets"), 30,
               what=f"default service account token in {name}")
    return name


@pytest.fixture
def namespace(api: Any) -> Iterator[str]:
    """A fresh namespace watched by the session operator."""
    name = make_namespace(api, "kiln-test")
    yield name
    with contextlib.suppress(Exception):
        api.call("DELETE", f"/api/v1/namespaces/{name}")


class OperatorProcess:
    """The real operator (`kiln operator`) as a child process, killable and restartable."""

    def __init__(self, kubeconfig: Path, namespaces: list[str], log: Path, extra: list[str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces
        self.log = log
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> OperatorProcess:
        self.port = free_port()
        argv = [*KILN, "operator", "--kubeconfig", str(self.kubeconfig), "--reconcile-interval", "0.5", "--liveness", f"http://127.0.0.1:{self.port}/healthz"]
        for ns in self.namespaces:
            argv += ["--namespace", ns]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILN_TRAINER_IMAGE": "kiln-trainer:test",
               "KILN_SERVER_IMAGE": "kiln-server:test"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv + self.extra, stdout=log, stderr=log, env=env, cwd=ROOT)
        eventually(self._alive, 60, what="operator liveness endpoint")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"operator exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def operator(control_plane: ControlPlane, api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """One operator for the session, cluster-wide (the chart's default) except the `kiln-solo-*` namespaces,
    which belong to tests that run (and kill) operators of their own."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(control_plane.kubeconfig, [], log, extra=["--all-namespaces", "--exclude-namespace", "kiln-solo-*"]).start()
    # Liveness answers before the watches are established: wait until a canary is actually handled.
    ns = make_namespace(api, "kiln-test-canary")
    api.call("POST", api.path("kiln.dev/v1alpha1", "TrainingJob", ns), {
        "apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "canary"},
        "spec": {"command": ["true"], "runPolicy": {"suspend": True}}})
    eventually(lambda: (api.get("kiln.dev/v1alpha1", "TrainingJob", ns, "canary").get("status") or {}).get("phase"), 120,
               what="the operator to handle a canary TrainingJob")
    api.call("DELETE", f"/api/v1/namespaces/{ns}")
    yield op
    op.stop()


@pytest.fixture
def solo_operator(control_plane: ControlPlane, api: Any, tmp_path: Path) -> Iterator[tuple[OperatorProcess, str]]:
    """An operator of its own on a namespace of its own, for tests that kill and restart it."""
    ns = make_namespace(api, "kiln-solo")
    op = OperatorProcess(control_plane.kubeconfig, [ns], tmp_path / "operator.log")
    yield op, ns
    op.stop()
    with contextlib.suppress(Exception):
        api.call("DELETE", f"/api/v1/namespaces/{ns}")


def wait_for(fn: Any, timeout: float = 30, what: str = "condition") -> Any:
    return eventually(fn, timeout, what=what)


@pytest.fixture
def kiln_cli() -> Any:
    """Run the `kiln` CLI as a process."""

    def run(*args: str, check: bool = False, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(KILN + list(args), text=True, capture_output=True, timeout=timeout, cwd=ROOT, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"kiln {' '.join(args)} failed: {proc.stderr}")
        return proc

    return run


