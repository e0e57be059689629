"""The policy as a pure function: every abuse manifest refused by the defaults at its field, nothing
refused that the defaults allow, profiles widen, the chart's defaults are the module's, and random specs
never render a pod outside the policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kiln_operator.modeldeployment.render import ModelRef, build_modeldeployment
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.trainingjob.render import build_trainingjob
from support.chart import CHART

from kiln.policy import (
    CONTROL_PLANE_KEYS,
    POLICY_SCHEMA,
    Policy,
    PolicyError,
    check_modeldeployment,
    check_trainingjob,
    load_policy,
    load_policy_file,
    lookups,
)
from kiln.schema import validate

pytestmark = [pytest.mark.unit]

MANIFESTS = sorted((Path(__file__).parent / "manifests").glob("*.yaml"))
OWN = ("kiln-trainer:test", "kiln-server:test")
MOUNTABLE = {"kiln.dev/mountable": "true"}
LABELS = {("PersistentVolumeClaim", "data"): MOUNTABLE, ("PersistentVolumeClaim", "models"): MOUNTABLE,
          ("PersistentVolumeClaim", "postgres-data"): {"app": "postgres"}}
"""What the live test creates: Kiln's two claims labelled mountable, the database's claim not."""
SETTINGS = OperatorSettings(trainer_image=OWN[0], server_image=OWN[1],
                            features=Features(job_suspend=True, indexed_jobs=True, hpa_v2=True, server_version="v1.30.0"))


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def check(doc: dict[str, Any], policy: Policy) -> list[str]:
    fn = check_trainingjob if doc["kind"] == "TrainingJob" else check_modeldeployment
    return [v.field for v in fn(doc["spec"], policy.with_own_images(*OWN), LABELS)]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_every_abuse_is_refused_by_default_at_its_field(path: Path) -> None:
    doc = load(path)
    validate(doc)  # a valid manifest: the schema lets it through, only the policy stops it
    fields = check(doc, Policy())
    assert doc["metadata"]["annotations"]["test.kiln.dev/refused-field"] in fields, fields


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_the_open_policy_refuses_none(path: Path) -> None:
    from support.cluster import OPEN_POLICY

    assert check(load(path), load_policy(OPEN_POLICY)) == []


def test_a_plain_spec_passes_the_defaults() -> None:
    tj = load(Path(__file__).parent / "manifests" / "tj-priority-class.yaml")
    tj["spec"].pop("scheduling")
    assert check(tj, Policy()) == []
    assert check({"kind": "ModelDeployment", "spec": {"model": {"uri": "pvc://models/m.onnx"}}}, Policy()) == []
    assert check({"kind": "ModelDeployment", "spec": {"model": {"trainingJob": "x"}, "image": OWN[1]}}, Policy()) == []


def test_allow_lists_globs_prefixes_and_selectors() -> None:
    policy = load_policy({"serviceAccounts": {"allow": ["team-*"]}, "images": {"allowedPrefixes": ["registry.example.com/ml/"]},
                          "secrets": {"selector": {"kiln.dev/tenant-secret": "true"}}}).with_own_images(*OWN)
    spec = {"serviceAccountName": "team-a", "image": "registry.example.com/ml/trainer:1",
            "env": [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s1", "key": "k"}}}]}
    assert lookups("TrainingJob", spec, policy) == {("Secret", "s1")}
    assert check_trainingjob(spec, policy, {("Secret", "s1"): {"kiln.dev/tenant-secret": "true"}}) == []
    refused = check_trainingjob({**spec, "serviceAccountName": "admin", "image": "registry.example.com/mlx/evil"}, policy,
                                {("Secret", "s1"): {"other": "x"}})
    assert [v.field for v in refused] == ["spec.serviceAccountName", "spec.image", "spec.env[0].valueFrom.secretKeyRef.name"]
    assert "its labels match no policy selector" in str(refused[2])
    assert "does not exist" in str(check_trainingjob(spec, policy, {})[0])


def test_profiles_widen_and_only_widen() -> None:
    policy = load_policy({"namespaceProfiles": {"gpu": {"priorityClasses": {"allow": ["high"]}, "serviceTypes": ["LoadBalancer"],
                                                        "pvcs": {"selector": {"team": "gpu"}}}}})
    spec = {"scheduling": {"priorityClassName": "high"}, "dataset": {"uri": "pvc://shared/x"}}
    labels = {("PersistentVolumeClaim", "shared"): {"team": "gpu"}}
    assert [v.field for v in check_trainingjob(spec, policy, labels)] == ["spec.scheduling.priorityClassName", "spec.dataset.uri"]
    wide = policy.for_profile("gpu")
    assert check_trainingjob(spec, wide, labels) == []
    assert check_trainingjob(spec, wide, {("PersistentVolumeClaim", "shared"): MOUNTABLE}) == [], "the base selector still admits"
    assert wide.service_types == ("ClusterIP", "LoadBalancer")
    assert policy.for_profile("nope") is policy and policy.for_profile(None) is policy


@pytest.mark.parametrize(("doc", "where"), [
    ({"images": {"allowedPrefix": []}}, "policy.images"),
    ({"serviceTypes": ["ExternalName"]}, "policy.serviceTypes.0"),
    ({"modelFetch": {"maxBytes": 0}}, "policy.modelFetch.maxBytes"),
    ({"namespaceProfiles": {"Bad_Name": {}}}, "policy.namespaceProfiles"),
    ({"namespaceProfiles": {"a": {"namespaceProfiles": {}}}}, "policy.namespaceProfiles.a"),
])
def test_invalid_policies_are_refused_with_the_path(doc: dict[str, Any], where: str) -> None:
    with pytest.raises(PolicyError, match=f"invalid policy at {where}"):
        load_policy(doc)


def test_chart_defaults_are_the_safe_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert load_policy(values["policy"]) == Policy()
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["properties"]["policy"] == POLICY_SCHEMA, "regenerate: values.schema.json holds kiln.policy.POLICY_SCHEMA"


def test_policy_file_unwraps_chart_values(tmp_path: Path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text("policy:\n  serviceTypes: [ClusterIP, NodePort]\n")
    assert load_policy_file(f).service_types == ("ClusterIP", "NodePort")
    f.write_text("- not a mapping\n")
    with pytest.raises(PolicyError, match="expected a mapping"):
        load_policy_file(f)


def test_kiln_render_refuses_with_the_field(kiln_cli: Any, tmp_path: Path) -> None:
    path = Path(__file__).parent / "manifests" / "tj-priority-class.yaml"
    refused = kiln_cli("render", str(path))
    assert refused.returncode == 1
    assert "PolicyViolation: spec.scheduling.priorityClassName" in refused.stderr and not refused.stdout
    policy = tmp_path / "policy.yaml"
    policy.write_text("policy:\n  namespaceProfiles:\n    batch:\n      priorityClasses: {allow: [system-node-critical]}\n")
    assert kiln_cli("render", str(path), "--policy", str(policy)).returncode == 1, "a profile applies only when asked"
    ok = kiln_cli("render", str(path), "--policy", str(policy), "--profile", "batch")
    assert ok.returncode == 0, ok.stderr
    assert "priorityClassName: system-node-critical" in ok.stdout
    assert "kiln.dev/mountable=true (the operator checks" in ok.stderr, "claims admitted by label are named"
    policy.write_text("policy: {pvcs: {allow: 3}}\n")
    bad = kiln_cli("render", str(path), "--policy", str(policy))
    assert bad.returncode == 2 and "invalid policy at policy.pvcs.allow" in bad.stderr


# ------------------------------------------------------------------------------------ property test
NAMES = st.sampled_from(["data", "models", "postgres-data", "db", "default", "admin", "team-a", "x"])
CLAIMS = st.sampled_from(["data", "models", "data", "models", "postgres-data", "db"])
"""Mostly the mountable claims, so that many random specs pass and their pods get checked."""
IMAGES = st.sampled_from([None, OWN[0], OWN[1], "docker.io/evil/x:1", "registry.example.com/ml/t:1", "kiln-trainer:other"])
TOLERATION = st.fixed_dictionaries({"operator": st.sampled_from(["Exists", "Equal"])},
                                   optional={"key": st.sampled_from([*CONTROL_PLANE_KEYS, "gpu", "spot"]), "effect": st.just("NoSchedule")})
SCHEDULING = st.fixed_dictionaries({}, optional={
    "priorityClassName": st.sampled_from(["high", "system-node-critical", "low"]),
    "tolerations": st.lists(TOLERATION, max_size=3),
    "nodeSelector": st.dictionaries(st.sampled_from([*CONTROL_PLANE_KEYS, "zone", "gpu"]), st.just("x"), max_size=2)})
ENV = st.lists(st.one_of(
    st.just({"name": "P", "value": "1"}),
    st.builds(lambda n: {"name": "S", "valueFrom": {"secretKeyRef": {"name": n, "key": "k"}}}, NAMES),
    st.just({"name": "P", "value": "1"})), max_size=3)
POLICIES = st.builds(lambda sa, sec, pvc, pre, pc, cp, types: load_policy({
    "serviceAccounts": {"allow": sa}, "secrets": {"allow": sec}, "pvcs": {"allow": pvc}, "images": {"allowedPrefixes": pre},
    "priorityClasses": {"allow": pc}, "scheduling": {"allowControlPlane": cp}, "serviceTypes": types}).with_own_images(*OWN),
    st.lists(NAMES, max_size=2, unique=True), st.lists(NAMES, max_size=2, unique=True), st.lists(NAMES, max_size=2, unique=True),
    st.lists(st.sampled_from(["registry.example.com/ml/", "docker.io/"]), max_size=1, unique=True),
    st.lists(st.sampled_from(["high", "low"]), max_size=2, unique=True), st.booleans(),
    st.lists(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), min_size=1, max_size=3, unique=True))


def pod_within(pod: dict[str, Any], policy: Policy) -> list[str]:
    """Independent of kiln.policy: what the rendered pod itself uses, held against the policy."""
    bad = []
    account = pod.get("serviceAccountName")
    if account and not account.endswith("-trainer") and account not in policy.service_accounts:
        bad.append(f"account {account}")
    for c in pod["containers"] + list(pod.get("initContainers") or []):
        if c["image"] not in OWN and not any(c["image"].startswith(p) for p in policy.image_prefixes):
            bad.append(f"image {c['image']}")
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref["name"] not in policy.secrets:
                bad.append(f"secret {ref['name']}")
    for v in pod.get("volumes") or []:
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and claim not in policy.pvcs and LABELS.get(("PersistentVolumeClaim", claim)) != MOUNTABLE:
            bad.append(f"claim {claim}")
    pc = pod.get("priorityClassName")
    if pc and pc not in policy.priority_classes:
        bad.append(f"priority {pc}")
    if not policy.allow_control_plane:
        if any(t.get("key") in CONTROL_PLANE_KEYS or (not t.get("key") and t["operator"] == "Exists") for t in pod.get("tolerations") or []):
            bad.append("control-plane toleration")
        if set(pod.get("nodeSelector") or {}) & set(CONTROL_PLANE_KEYS):
            bad.append("control-plane nodeSelector")
    return bad


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=POLICIES, account=st.one_of(st.none(), NAMES), image=IMAGES, env=ENV, data=CLAIMS, out=CLAIMS, scheduling=SCHEDULING)
def test_random_trainingjobs_never_render_a_pod_outside_policy(policy: Policy, account: str | None, image: str | None,
                                                                env: list[dict[str, Any]], data: str, out: str,
                                                                scheduling: dict[str, Any]) -> None:
    spec: dict[str, Any] = {"dataset": {"uri": f"pvc://{data}/d.csv", "labelColumn": "y"}, "model": {"inputShape": [2], "layers": [
        {"type": "Dense", "units": 2, "activation": "softmax"}]}, "output": {"uri": f"pvc://{out}/m"}, "env": env, "scheduling": scheduling}
    if account:
        spec["serviceAccountName"] = account
    if image:
        spec["image"] = image
    tj = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec}
    if check_trainingjob(spec, policy, LABELS):
        return  # refused: the operator creates nothing
    (job,) = [d for d in build_trainingjob(tj, SETTINGS) if d["kind"] == "Job"]
    assert pod_within(job["spec"]["template"]["spec"], policy) == []


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=POLICIES, image=IMAGES, claim=CLAIMS, stype=st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]), scheduling=SCHEDULING)
def test_random_modeldeployments_never_render_outside_policy(policy: Policy, image: str | None, claim: str, stype: str,
                                                             scheduling: dict[str, Any]) -> None:
    spec: dict[str, Any] = {"model": {"uri": f"pvc://{claim}/m.onnx"}, "service": {"type": stype}, "scheduling": scheduling}
    if image:
        spec["image"] = image
    md = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "p", "namespace": "ns", "uid": "u"}, "spec": spec}
    if check_modeldeployment(spec, policy, LABELS):
        return
    docs = build_modeldeployment(md, SETTINGS, ModelRef(f"pvc://{claim}/m.onnx"))
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert pod_within(dep["spec"]["template"]["spec"], policy) == []
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    assert svc["spec"].get("type", "ClusterIP") in policy.service_types
