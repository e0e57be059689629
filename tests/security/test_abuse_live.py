"""Every abuse manifest on the real control plane in RBAC mode, against the real operator running as the
chart's ServiceAccount with the chart's default policy: each is refused with PolicyViolation naming its
field, and nothing is created for it. Then ownership (a planted ServiceAccount), and a profile widening."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubelet import eventually
from support.chart import ROOT

sys.path.insert(0, str(ROOT / "tests" / "chart"))
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from test_chart_rbac_live import Install

pytestmark = [pytest.mark.helm, pytest.mark.live, pytest.mark.rbac]

API = "kiln.dev/v1alpha1"
MANIFESTS = sorted((Path(__file__).parent / "manifests").glob("*.yaml"))
CHILDREN = [("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"),
            ("batch/v1", "Job"), ("apps/v1", "Deployment"), ("v1", "Service"), ("networking.k8s.io/v1", "NetworkPolicy")]


@pytest.fixture
def install(api: Any, kubectl: Any, helm: Any, control_plane: Any, tmp_path: Path) -> Any:
    inst = Install(api, kubectl, helm, control_plane, tmp_path)
    try:
        # The chart's default policy (the RBAC test's claim allow-list emptied again).
        yield inst.up(values={"policy.pvcs.allow": [], "policy.namespaceProfiles": {"batch": {"priorityClasses": {"allow": ["high"]}}},
                              "networkPolicies.trainerEgress": ["10.0.0.1/32:6443"]})
    finally:
        inst.down()


def claim(api: Any, ns: str, name: str, labels: dict[str, str]) -> None:
    api.call("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})


def refused(api: Any, ns: str, doc: dict[str, Any]) -> dict[str, Any] | None:
    obj = api.get(API, doc["kind"], ns, doc["metadata"]["name"])
    st = obj.get("status") or {}
    if doc["kind"] == "TrainingJob":
        return st if st.get("phase") == "Failed" and st.get("reason") == "PolicyViolation" else None
    ready = next((c for c in st.get("conditions") or [] if c.get("type") == "Ready"), {})
    return st if ready.get("status") == "False" and ready.get("reason") == "PolicyViolation" else None


def made_for(api: Any, ns: str, name: str) -> list[str]:
    """Every child kind that exists for `name` (by Kiln's naming: <name>-trainer, <name>-train, <name>-server, <name>)."""
    out = []
    for version, kind in CHILDREN:
        for obj in api.list_objects(version, kind, ns):
            if obj["metadata"]["name"] in (f"{name}-trainer", f"{name}-train", f"{name}-server", name):
                out.append(f"{kind}/{obj['metadata']['name']}")
    return out


def test_every_abuse_is_refused_and_creates_nothing(install: Install, api: Any) -> None:
    ns = install.workload
    mountable = {"kiln.dev/mountable": "true"}
    claim(api, ns, "data", mountable)
    claim(api, ns, "models", mountable)
    claim(api, ns, "postgres-data", {"app": "postgres"})  # exists, but not labelled for Kiln
    docs = [yaml.safe_load(p.read_text()) for p in MANIFESTS]
    for doc in docs:
        api.call("POST", api.path(API, doc["kind"], ns), doc)
    # The control: the same base spec with nothing abusive is admitted (claims by label), a Job is made.
    ok = yaml.safe_load((Path(__file__).parent / "manifests" / "tj-priority-class.yaml").read_text())
    ok["metadata"] = {"name": "plain"}
    ok["spec"].pop("scheduling")
    api.call("POST", api.path(API, "TrainingJob", ns), ok)
    eventually(lambda: api.get("batch/v1", "Job", ns, "plain-train"), 30, what="the plain TrainingJob's Job")
    egress = api.get("networking.k8s.io/v1", "NetworkPolicy", ns, "plain-train")
    assert egress["spec"]["egress"][1]["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "the trainer's egress policy, made by the operator"
    for doc in docs:
        try:
            st = eventually(lambda doc=doc: refused(api, ns, doc), 60, what=f"{doc['metadata']['name']} refused")
        except AssertionError as exc:
            status = api.get(API, doc["kind"], ns, doc["metadata"]["name"]).get("status")
            raise AssertionError(f"{exc}\nstatus: {status}\noperator log:\n{install.log()[-4000:]}") from None
        field = doc["metadata"]["annotations"]["test.kiln.dev/refused-field"]
        assert field in st["message"], (doc["metadata"]["name"], st["message"])
    for doc in docs:
        assert made_for(api, ns, doc["metadata"]["name"]) == [], doc["metadata"]["name"]
    assert "forbidden" not in install.log().lower(), install.log()[-3000:]


def test_planted_service_account_gets_no_binding_and_no_job(install: Install, api: Any) -> None:
    ns = install.workload
    claim(api, ns, "data", {"kiln.dev/mountable": "true"})
    claim(api, ns, "models", {"kiln.dev/mountable": "true"})
    api.call("POST", f"/api/v1/namespaces/{ns}/serviceaccounts",
             {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "victim-trainer"}})
    doc = yaml.safe_load((Path(__file__).parent / "manifests" / "tj-priority-class.yaml").read_text())
    doc["metadata"] = {"name": "victim"}
    doc["spec"].pop("scheduling")
    api.call("POST", api.path(API, "TrainingJob", ns), doc)

    def failed() -> dict[str, Any] | None:
        st = api.get(API, "TrainingJob", ns, "victim").get("status") or {}
        return st if st.get("phase") == "Failed" else None

    st = eventually(failed, 30, what="victim Failed")
    assert st["reason"] == "OwnershipConflict" and "ServiceAccount victim-trainer" in st["message"], st
    assert api.get("rbac.authorization.k8s.io/v1", "RoleBinding", ns, "victim-trainer") is None
    assert api.get("batch/v1", "Job", ns, "victim-train") is None


def test_namespace_profile_widens(install: Install, api: Any) -> None:
    ns = install.workload
    claim(api, ns, "data", {"kiln.dev/mountable": "true"})
    claim(api, ns, "models", {"kiln.dev/mountable": "true"})
    doc = yaml.safe_load((Path(__file__).parent / "manifests" / "tj-priority-class.yaml").read_text())
    doc["metadata"] = {"name": "before"}
    doc["spec"]["scheduling"]["priorityClassName"] = "high"
    api.call("POST", api.path(API, "TrainingJob", ns), doc)
    st = eventually(lambda: refused(api, ns, doc), 30, what="before refused")
    assert "spec.scheduling.priorityClassName" in st["message"]
    api.call("PATCH", f"/api/v1/namespaces/{ns}", {"metadata": {"labels": {"kiln.dev/policy-profile": "batch"}}},
             content_type="application/merge-patch+json")
    doc["metadata"] = {"name": "after"}
    api.call("POST", api.path(API, "TrainingJob", ns), doc)
    job = eventually(lambda: api.get("batch/v1", "Job", ns, "after-train"), 40, what="the widened TrainingJob's Job")
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "high"
