"""Security by default: restricted Pod Security Standard on every pod Kiln renders; no template injection."""

from __future__ import annotations

import string
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiln_operator.modeldeployment.render import ModelRef, build_modeldeployment
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.trainingjob.render import build_trainingjob

from kiln.schema import validate

pytestmark = [pytest.mark.unit]

NEW = OperatorSettings(features=Features(job_suspend=True, indexed_jobs=True, hpa_v2=True, server_version="v1.30.0"))


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Kubernetes "restricted" Pod Security Standard (v1.30), plus Kiln's read-only root filesystem rule."""
    bad = []
    psc = pod.get("securityContext") or {}
    if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
        bad.append("host namespaces")
    for vol in pod.get("volumes") or []:
        kinds = set(vol) - {"name"}
        if not kinds <= {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected", "downwardAPI", "ephemeral", "csi"}:
            bad.append(f"volume {vol['name']} of type {kinds}")
    if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        bad.append("pod seccompProfile")
    for c in list(pod.get("initContainers") or []) + list(pod.get("containers") or []):
        sc = c.get("securityContext") or {}
        name = c["name"]
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            bad.append(f"{name}: capabilities must drop ALL")
        if set((sc.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: adds capabilities")
        if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
            bad.append(f"{name}: runAsNonRoot")
        if (sc.get("runAsUser") if "runAsUser" in sc else psc.get("runAsUser")) == 0:
            bad.append(f"{name}: runAsUser 0")
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{name}: readOnlyRootFilesystem")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{name}: hostPort")
    return bad


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Job", "Deployment")]


def tj(**spec: Any) -> dict[str, Any]:
    base = {"dataset": {"uri": "pvc://data/d.csv"}, "output": {"uri": "s3://b/out"},
            "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 3}]}}
    base.update(spec)
    return validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "t", "namespace": "n", "uid": "u"},
                     "spec": base})


@pytest.mark.parametrize("spec", [{}, {"workers": 2}, {"resources": {"gpus": 1}}, {"command": ["python", "x.py"]}])
def test_trainer_pods_are_restricted(spec: dict[str, Any]) -> None:
    pods = pod_specs(build_trainingjob(tj(**spec), NEW))
    assert pods and all(restricted_violations(p) == [] for p in pods), [restricted_violations(p) for p in pods]


@pytest.mark.parametrize("uri", ["pvc://models/m.onnx", "s3://bucket/m.onnx", "https://example.org/m.onnx"])
def test_server_pods_are_restricted(uri: str) -> None:
    md = validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "n", "uid": "u"},
                   "spec": {"model": {"uri": uri}}})
    pods = pod_specs(build_modeldeployment(md, NEW, ModelRef(uri)))
    assert pods and all(restricted_violations(p) == [] for p in pods), [restricted_violations(p) for p in pods]


def test_the_checker_can_fail() -> None:
    pod = pod_specs(build_trainingjob(tj(), NEW))[0]
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    found = restricted_violations(pod)
    assert any("allowPrivilegeEscalation" in v for v in found) and any("hostPath" in v for v in found)


TOKENS = [*list(string.printable), "{{", "}}", "{%", "%}", "\n---\n", "&a ", "*a", "!!python/object:os.system", "é", "\u2028", '"', "'", ": "]
NASTY = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=20).map("".join)
DNS = st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=DNS, value=NASTY, arg=NASTY, image=NASTY, label=NASTY, cmd=NASTY)
def test_rendered_values_stay_strings(name: str, value: str, arg: str, image: str, label: str, cmd: str) -> None:
    doc = tj(env=[{"name": "USER_VALUE", "value": value}], command=[cmd], args=[arg], image=image,
             scheduling={"nodeSelector": {"pool": label}})
    doc["metadata"]["name"] = name
    docs = build_trainingjob(doc, NEW)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "Job"]
    job = docs[-1]
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == image and c["args"] == [arg] and c["command"][-1] == cmd
    assert {e["name"]: e.get("value") for e in c["env"]}["USER_VALUE"] == value
    assert pod["nodeSelector"] == {"pool": label}
    assert job["metadata"]["name"] == f"{name}-train"
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(pod) == {"restartPolicy", "serviceAccountName", "automountServiceAccountToken", "enableServiceLinks",
                        "nodeSelector", "securityContext", "containers", "volumes"}
    spec_doc = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"]["kiln.dev/spec"])
    assert spec_doc["spec"]["env"][0]["value"] == value and spec_doc["spec"]["image"] == image


@settings(max_examples=80, deadline=None)
@given(name=DNS, uri_tail=NASTY, model_name=DNS)
def test_modeldeployment_values_stay_strings(name: str, uri_tail: str, model_name: str) -> None:
    md = validate({"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": name, "namespace": "n", "uid": "u"},
                   "spec": {"model": {"uri": "s3://bucket/" + uri_tail}, "modelName": model_name}})
    docs = build_modeldeployment(md, NEW, ModelRef("s3://bucket/" + uri_tail))
    dep = docs[0]
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][3] == "s3://bucket/" + uri_tail
    assert dep["spec"]["template"]["metadata"]["annotations"]["kiln.dev/model-uri"] == "s3://bucket/" + uri_tail
    assert [d["kind"] for d in docs] in (["Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"], ["Deployment", "Service", "NetworkPolicy"])
