"""Session fixtures: one real control plane, the project's kubectl, namespaces, and the real operator.

Tiers (markers): `unit` needs nothing; `live` starts the control plane once per session; `training`
runs TensorFlow; `server` runs model server processes; `helm` runs the helm binary.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

# First: with KILN_TEST_COMPILED=1 the compiled build must be on sys.path before anything imports kiln_server.
from support import compiled

COMPILED_DIR = compiled.activate()

from kubelet import eventually  # noqa: E402
from support.cluster import KILN, OperatorProcess, make_namespace  # noqa: E402
from support.kstatus import StatusRecorder  # noqa: E402
from support.seaweed import SeaweedFS  # noqa: E402
from testenv import ROOT, ControlPlane, ensure_tools  # noqa: E402


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
    """kiln.kube's blocking client configured for the test control plane, with Kiln's CRDs installed."""
    from kiln import kube

    kube.configure(str(control_plane.kubeconfig))
    client = kube.blocking()
    kubectl("apply", "-f", str(ROOT / "crds"))
    for crd in ("trainingjobs.kiln.dev", "modeldeployments.kiln.dev"):
        def established(crd: str = crd) -> bool:
            obj = client.call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            return any(c["type"] == "Established" and c["status"] == "True" for c in obj.get("status", {}).get("conditions") or [])

        eventually(established, 60, what=f"CRD {crd} established")
    return client


@pytest.fixture(scope="session")
def statuses(api: Any, control_plane: ControlPlane) -> Iterator[StatusRecorder]:
    """Every version of every TrainingJob and ModelDeployment the API server holds during the session."""
    import kubernetes

    recorder = StatusRecorder(kubernetes.config.new_client_from_config(str(control_plane.kubeconfig))).start()
    yield recorder
    recorder.stop()
    dump = os.environ.get("KILN_STATUS_DUMP")
    if dump:  # where the Argo CD health check fixtures (charts/kiln/argocd/*/testdata) were taken from
        Path(dump).write_text(json.dumps(dict(recorder.seen), indent=1))


def check_statuses(statuses: StatusRecorder, namespace: str) -> None:
    """Fail the test whose namespace holds a status that breaks the kstatus conventions, or that
    Argo CD's health check (Lua) judges differently from kstatus."""
    from support.argocd import KSTATUS_TO_HEALTH, health
    from support.kstatus import compute

    problems = statuses.check(namespace)
    for obj in statuses.objects(namespace):
        st = obj.get("status") or {}
        if not st.get("phase") or st.get("observedGeneration") != obj["metadata"].get("generation"):
            continue
        want = "Suspended" if st["phase"] == "Suspended" else KSTATUS_TO_HEALTH.get(compute(obj)[0])
        got = health(obj)
        if want and got["status"] != want:
            problems.append(f"{obj['kind']} {obj['metadata']['name']} phase={st['phase']}: Argo CD health {got}, kstatus wants {want}")
    assert not problems, "statuses breaking the conventions:\n" + "\n".join(problems[:20])


@pytest.fixture
def namespace(api: Any, statuses: StatusRecorder) -> Iterator[str]:
    """A fresh namespace watched by the session operator; every status written in it is checked at the end."""
    name = make_namespace(api, "kiln-test")
    yield name
    try:
        check_statuses(statuses, name)
    finally:
        with contextlib.suppress(Exception):
            api.call("DELETE", f"/api/v1/namespaces/{name}")


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
def solo_operator(control_plane: ControlPlane, api: Any, statuses: StatusRecorder,
                  tmp_path: Path) -> Iterator[tuple[OperatorProcess, str]]:
    """An operator of its own on a namespace of its own, for tests that kill and restart it."""
    ns = make_namespace(api, "kiln-solo")
    op = OperatorProcess(control_plane.kubeconfig, [ns], tmp_path / "operator.log")
    yield op, ns
    op.stop()
    try:
        check_statuses(statuses, ns)
    finally:
        with contextlib.suppress(Exception):
            api.call("DELETE", f"/api/v1/namespaces/{ns}")


@pytest.fixture
def kiln_cli() -> Any:
    """Run the `kiln` CLI as a process."""

    def run(*args: str, check: bool = False, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(KILN + list(args), text=True, capture_output=True, timeout=timeout, cwd=ROOT, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"kiln {' '.join(args)} failed: {proc.stderr}")
        return proc

    return run




@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real S3 server (SeaweedFS on 127.0.0.1, free ports, one identity) for the session."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> SeaweedFS:
    """The session's S3 server with this test's AWS_* variables set, and a fresh bucket `s3.test_bucket`."""
    for key, value in seaweedfs.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    seaweedfs.test_bucket = seaweedfs.bucket(f"{name}-{abs(hash(request.node.nodeid)) % 10**6}")
    return seaweedfs
