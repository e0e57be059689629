"""The chart's RBAC proven on the real API server (RBAC authorization): the real operator runs as the
chart's ServiceAccount, with the chart's args and env, and the scenarios pass; remove one rule and they fail."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubelet
import pytest
import yaml
from kubelet import eventually
from support.chart import CHART, ROOT, set_args
from support.cluster import KILN, OperatorProcess, make_namespace

# The TrainingJob/ModelDeployment live scenarios are reused from tests/operator.
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from test_modeldeployment_live import ready_pods, wait_md
from test_trainingjob_live import API, SUMMARY, create, manifest, one_pod, wait_phase
from testenv import free_port

pytestmark = [pytest.mark.helm, pytest.mark.live, pytest.mark.rbac]

RBAC_KINDS = ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


class ChartOperator(OperatorProcess):
    """The real `kiln operator` with exactly the args and env of the chart's Deployment (liveness and
    metrics on free ports: the chart's fixed 9090 would collide with another operator on this host)."""

    def __init__(self, deployment: dict[str, Any], kubeconfig: Path, log: Path) -> None:
        super().__init__(kubeconfig, [], log)
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.args = list(container.get("args") or [])
        self.env = {e["name"]: e["value"] for e in container["env"]}

    def start(self) -> ChartOperator:
        self.port, self.metrics_port = free_port(), free_port()
        env = {**os.environ, **self.env, "KILN_LIVENESS": f"http://127.0.0.1:{self.port}/healthz",
               "KILN_METRICS_PORT": str(self.metrics_port), "KILN_METRICS_ADDRESS": "127.0.0.1", "HOME": os.environ.get("HOME", "/tmp")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*KILN, "operator", "--kubeconfig", str(self.kubeconfig), *self.args],
                                         stdout=log, stderr=log, env=env, cwd=ROOT)
        eventually(self._alive, 60, what="operator liveness endpoint")
        return self


def drop_verb(docs: list[dict[str, Any]], group: str, resource: str, verb: str) -> None:
    """Remove one verb on one resource from the rendered (Cluster)Roles, leaving every other grant in place."""
    found = False
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        rules = []
        for rule in doc["rules"]:
            if group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]:
                found = True
                others = [r for r in rule["resources"] if r != resource]
                if others:
                    rules.append({**rule, "resources": others})
                rest = [v for v in rule["verbs"] if v != verb]
                if rest:
                    rules.append({**rule, "resources": [resource], "verbs": rest})
            else:
                rules.append(rule)
        doc["rules"] = rules
    assert found, f"no rule grants {verb} on {group}/{resource}"


class Install:
    """The chart rendered by `helm template`, applied by the admin except the Deployment, and the real operator
    running as the chart's ServiceAccount."""

    def __init__(self, api: Any, kubectl: Any, helm: Any, control_plane: Any, tmp: Path) -> None:
        self.api, self.kubectl, self.helm, self.cp, self.tmp = api, kubectl, helm, control_plane, tmp
        self.release = f"kr{uuid.uuid4().hex[:6]}"
        self.operator: ChartOperator | None = None
        self.namespaces: list[str] = []
        self.docs: list[dict[str, Any]] = []

    def render(self, values: dict[str, Any]) -> list[dict[str, Any]]:
        out = self.helm("template", self.release, str(CHART), "--namespace", self.system, *set_args(values)).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    def up(self, scope: str = "cluster", drop: tuple[str, str, str] | None = None, peering: bool = False,
           values: dict[str, Any] | None = None) -> Install:
        self.system = make_namespace(self.api, "kiln-system")
        # kiln-solo-*: the cluster-wide session operator of other tests leaves these namespaces alone.
        self.workload = make_namespace(self.api, "kiln-solo-chart")
        self.namespaces = [self.system, self.workload]
        values = {"scope": scope, "watchNamespaces": [self.workload], "operator.reconcileInterval": 0.5,
                  "operator.watchServerTimeout": 60, "operator.watchClientTimeout": 90,
                  "trainer.image": {"repository": "kiln-trainer", "tag": "test"},
                  "server.image": {"repository": "kiln-server", "tag": "test"}, "peering.enabled": peering,
                  # The scenarios' claims (no PVC objects exist here) by name; tests/security runs the defaults.
                  "policy.pvcs.allow": ["data", "models"], **(values or {})}
        self.docs = self.render(values)
        if drop:
            drop_verb(self.docs, *drop)
        crds = [d for d in self.docs if d["kind"] == "CustomResourceDefinition"]
        if crds:  # kopf.dev peering CRDs: cluster-scoped and shared, applied idempotently
            self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(crds))
            for crd in crds:
                self.kubectl("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s")
        rest = [d for d in self.docs if d["kind"] not in ("Deployment", "CustomResourceDefinition")]
        self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rest))
        (self.deployment,) = [d for d in self.docs if d["kind"] == "Deployment"]
        sa = self.deployment["spec"]["template"]["spec"]["serviceAccountName"]
        token = self.token(self.system, sa)
        kubeconfig = self.cp.kubeconfig_for_token(token, self.tmp / "operator.kubeconfig")
        self.operator = ChartOperator(self.deployment, kubeconfig, self.tmp / "operator.log").start()
        return self

    def token(self, namespace: str, account: str) -> str:
        """The ServiceAccount's token from the Secret the serviceaccount-token controller creates (1.20)."""
        def secret() -> str | None:
            sa = self.api.get("v1", "ServiceAccount", namespace, account) or {}
            for ref in sa.get("secrets") or []:
                s = self.api.call("GET", f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                if s.get("type") == "kubernetes.io/service-account-token" and (s.get("data") or {}).get("token"):
                    return base64.b64decode(s["data"]["token"]).decode()
            return None

        return eventually(secret, 30, what=f"token of ServiceAccount {namespace}/{account}")

    def log(self) -> str:
        return self.operator.log.read_text() if self.operator and self.operator.log.exists() else ""

    def events(self) -> str:
        items = self.api.call("GET", f"/api/v1/namespaces/{self.workload}/events").get("items") or []
        return "\n".join(f"{e.get('reason')}: {e.get('message')}" for e in items)

    def down(self) -> None:
        if self.operator:
            self.operator.stop()
        for doc in self.docs:
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                self.kubectl("delete", doc["kind"].lower(), doc["metadata"]["name"], "--ignore-not-found", check=False)
        for ns in self.namespaces:
            with contextlib.suppress(Exception):
                self.api.call("DELETE", f"/api/v1/namespaces/{ns}")


@pytest.fixture
def install(api: Any, kubectl: Any, helm: Any, control_plane: Any, tmp_path: Path) -> Iterator[Install]:
    inst = Install(api, kubectl, helm, control_plane, tmp_path)
    try:
        yield inst
    finally:
        inst.down()


def train_to_success(api: Any, ns: str, name: str, timeout: float = 30) -> dict[str, Any]:
    """The TrainingJob scenario: Job created, pod run and succeeded by the test kubelet, TJ Succeeded with result."""
    create(api, ns, manifest(name))
    pod = eventually(lambda: kubelet.pods(ns, f"kiln.dev/trainingjob={name}"), timeout, what="trainer pod")[-1]
    kubelet.run(pod)
    kubelet.succeed(pod, SUMMARY)
    return wait_phase(api, ns, name, "Succeeded", timeout=timeout)


def serve_uri(api: Any, ns: str, name: str, timeout: float = 30) -> dict[str, Any]:
    """The ModelDeployment scenario: model.uri -> Deployment + Service, the pod run by the test kubelet, Ready."""
    api.call("POST", api.path(API, "ModelDeployment", ns), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": name},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx", "sha256": "c" * 64}, "replicas": 1}})
    eventually(lambda: api.get("apps/v1", "Deployment", ns, f"{name}-server"), timeout, what="server Deployment")
    eventually(lambda: api.get("v1", "Service", ns, name), timeout, what="server Service")
    ready_pods(ns, name, "c" * 64)
    return wait_md(api, ns, name, "Ready", timeout=timeout)


@pytest.mark.parametrize("scope", ["cluster", "namespaced"])
def test_chart_rbac_is_sufficient(install: Install, api: Any, scope: str) -> None:
    inst = install.up(scope=scope)
    kinds = {d["kind"] for d in inst.docs}
    assert "ClusterRole" in kinds and ("Role" in kinds) == (scope == "namespaced")
    ns = inst.workload
    done = train_to_success(api, ns, "ok")["status"]
    assert done["result"]["onnxSha256"] == SUMMARY["onnxSha256"]
    job = api.list_objects("batch/v1", "Job", ns)[0]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "kiln-trainer:test", "trainer image from the chart's env"
    # core/v1 Events: the operator may post them (the JobCreated transition event).
    assert eventually(lambda: "JobCreated: created Job ok-train" in inst.events(), what="events posted by the operator")
    st = serve_uri(api, ns, "srv")["status"]
    assert st["readyReplicas"] == 1 and st["model"]["sha256"] == "c" * 64
    dep = api.get("apps/v1", "Deployment", ns, "srv-server")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "kiln-server:test"
    assert "forbidden" not in inst.log().lower(), inst.log()[-3000:]


# (API group, resource, verb) removed from the chart's rules -> evidence expected in the operator log or events.
REMOVALS = {
    "jobs-create": (("batch", "jobs", "create"), "train", 'cannot create resource "jobs"'),
    "roles-create": (("rbac.authorization.k8s.io", "roles", "create"), "train", 'cannot create resource "roles"'),
    # RBAC escalation rules: the operator may only grant the trainer (get+patch on its TrainingJob's status) what it
    # holds itself, so without either verb even the trainer's Role cannot be created.
    "trainingjobs-status-patch": (("kiln.dev", "trainingjobs/status", "patch"), "train",
                                  "attempting to grant RBAC permissions not currently held"),
    "trainingjobs-status-get": (("kiln.dev", "trainingjobs/status", "get"), "train",
                                "attempting to grant RBAC permissions not currently held"),
    "deployments-patch": (("apps", "deployments", "patch"), "serve", 'deployments.apps "nope-server" is forbidden'),
    "deployments-create": (("apps", "deployments", "create"), "serve", 'deployments.apps "nope-server" is forbidden'),
    "services-patch": (("", "services", "patch"), "serve", 'services "nope" is forbidden'),
}


@pytest.mark.parametrize("name", sorted(REMOVALS))
def test_removing_a_rule_breaks_the_scenario(install: Install, api: Any, name: str) -> None:
    drop, scenario, evidence = REMOVALS[name]
    inst = install.up(drop=drop)
    role = next(d for d in inst.docs if d["kind"] == "ClusterRole" and not d["metadata"]["name"].endswith("-observer"))
    assert not any(drop[0] in r["apiGroups"] and drop[1] in r["resources"] and drop[2] in r["verbs"] for r in role["rules"])
    run = train_to_success if scenario == "train" else serve_uri
    with pytest.raises(AssertionError, match="timed out"):
        run(api, inst.workload, "nope", timeout=15)
    found = eventually(lambda: evidence in inst.log().replace('\\"', '"') or evidence in inst.events(), 15,
                       what=f"'{evidence}' in the operator log or events")
    assert found
    if scenario == "train":
        # No training runs without the trainer's identity: a Job made alongside a failed Role is deleted.
        eventually(lambda: not [j for j in api.list_objects("batch/v1", "Job", inst.workload, "kiln.dev/trainingjob=nope")
                                if not j["metadata"].get("deletionTimestamp")], 15, what="no live Job for 'nope'")


def test_trainer_may_patch_only_its_own_status(install: Install, api: Any, kubectl: Any, tools: Path, control_plane: Any) -> None:
    inst = install.up()
    ns = inst.workload
    for name in ("a", "b"):
        create(api, ns, manifest(name))
        one_pod(ns, name)
    sa = eventually(lambda: api.get("v1", "ServiceAccount", ns, "a-trainer"), what="trainer ServiceAccount of a")
    assert sa["metadata"]["ownerReferences"][0]["name"] == "a"
    kubeconfig = control_plane.kubeconfig_for_token(inst.token(ns, "a-trainer"), inst.tmp / "trainer-a.kubeconfig", ns)
    patch = json.dumps({"status": {"progress": {"epoch": 1, "epochs": 3, "percent": 33}}})

    def as_trainer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(tools / "kubectl"), "--kubeconfig", str(kubeconfig), *args], text=True, capture_output=True, timeout=60)

    own = as_trainer("patch", "trainingjob", "a", "--subresource=status", "--type=merge", "-p", patch)
    assert own.returncode == 0, own.stderr
    assert api.get(API, "TrainingJob", ns, "a")["status"]["progress"]["percent"] == 33
    other = as_trainer("patch", "trainingjob", "b", "--subresource=status", "--type=merge", "-p", patch)
    assert other.returncode != 0 and "Forbidden" in other.stderr and '"trainingjobs/status"' in other.stderr, other.stderr
    spec = as_trainer("patch", "trainingjob", "a", "--type=merge", "-p", json.dumps({"spec": {"training": {"epochs": 99}}}))
    assert spec.returncode != 0 and "Forbidden" in spec.stderr, "the trainer may not edit its spec"
    listing = as_trainer("get", "trainingjobs")
    assert listing.returncode != 0 and "Forbidden" in listing.stderr
    assert (api.get(API, "TrainingJob", ns, "b")["status"].get("progress") or {}).get("percent") != 33


def test_peering_rbac(install: Install, api: Any) -> None:
    inst = install.up(peering=True)
    # An operator serving listed namespaces peers through a KopfPeering in each of them (Kopf's rule).
    (peering,) = [d for d in inst.docs if d["kind"] == "KopfPeering"]
    name, ns = peering["metadata"]["name"], peering["metadata"]["namespace"]
    assert ns == inst.workload
    # Kopf keeps itself alive in the peering object: that needs the kopf.dev rule.
    eventually(lambda: (api.call("GET", f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings/{name}").get("status") or None), 30,
               what="operator keep-alive in the KopfPeering")
    assert train_to_success(api, inst.workload, "peer")["status"]["phase"] == "Succeeded"
    assert "forbidden" not in inst.log().lower(), inst.log()[-3000:]
