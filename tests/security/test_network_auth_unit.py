"""What the operator renders for a ModelDeployment's NetworkPolicy and bearer-token auth, and how the
policy treats the token Secret."""

from __future__ import annotations

from typing import Any

import pytest
from kiln_operator.modeldeployment.render import ModelRef, build_modeldeployment
from kiln_operator.settings import OperatorSettings

from kiln.policy import Policy, check_modeldeployment
from kiln.schema import validate

pytestmark = [pytest.mark.unit]

SETTINGS = OperatorSettings(server_image="kiln-server:test")


def md(**spec: Any) -> dict[str, Any]:
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
           "spec": {"model": {"uri": "pvc://models/m.onnx"}, **spec}}
    validate(doc)
    return doc


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_default_network_policy_admits_the_same_namespace_on_the_server_port() -> None:
    docs = build_modeldeployment(md(), SETTINGS, ModelRef("pvc://models/m.onnx"))
    np = by_kind(docs, "NetworkPolicy")
    dep = by_kind(docs, "Deployment")
    assert np["spec"]["podSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = np["spec"]["ingress"]
    assert rule == {"ports": [{"protocol": "TCP", "port": 8080}], "from": [{"podSelector": {}}]}
    assert np["metadata"]["ownerReferences"][0]["uid"] == "u"


def test_listed_peers() -> None:
    spec = {"networkPolicy": {"from": [{"namespaceSelector": {"team": "web"}, "podSelector": {"app": "gateway"}},
                                       {"namespaceSelector": {"kubernetes.io/metadata.name": "ingress"}}]}}
    np = by_kind(build_modeldeployment(md(**spec), SETTINGS, ModelRef("pvc://models/m.onnx")), "NetworkPolicy")
    assert np["spec"]["ingress"][0]["from"] == [
        {"namespaceSelector": {"matchLabels": {"team": "web"}}, "podSelector": {"matchLabels": {"app": "gateway"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress"}}}]


def test_network_policies_can_be_turned_off() -> None:
    off = OperatorSettings(network_policies=False)
    assert "NetworkPolicy" not in [d["kind"] for d in build_modeldeployment(md(), off, ModelRef("pvc://models/m.onnx"))]


def test_auth_mounts_the_secret_and_passes_the_file() -> None:
    docs = build_modeldeployment(md(auth={"tokenSecret": "model-tokens", "openMetrics": True}), SETTINGS, ModelRef("pvc://models/m.onnx"))
    pod = by_kind(docs, "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    i = c["args"].index("--auth-token-file")
    assert c["args"][i + 1] == "/etc/kiln/auth/tokens"
    assert c["args"][c["args"].index("--auth-open-routes") + 1] == "health,metrics"
    assert {"name": "auth", "mountPath": "/etc/kiln/auth", "readOnly": True} in c["volumeMounts"]
    vol = next(v for v in pod["volumes"] if v["name"] == "auth")
    assert vol["secret"] == {"secretName": "model-tokens", "items": [{"key": "tokens", "path": "tokens"}], "defaultMode": 0o440}
    # The probes stay on the health routes, which stay open.
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    plain = by_kind(build_modeldeployment(md(), SETTINGS, ModelRef("pvc://models/m.onnx")), "Deployment")
    assert "--auth-token-file" not in plain["spec"]["template"]["spec"]["containers"][0]["args"]


def test_token_secret_needs_no_allow_listing_with_kilns_server_only() -> None:
    policy = Policy(image_prefixes=("registry.example.com/",)).with_own_images("kiln-trainer:test", "kiln-server:test")
    spec = {"model": {"uri": "pvc://models/m.onnx"}, "auth": {"tokenSecret": "db-password"}}
    labels = {("PersistentVolumeClaim", "models"): {"kiln.dev/mountable": "true"}}
    assert check_modeldeployment(spec, policy, labels) == []
    assert check_modeldeployment({**spec, "image": "kiln-server:test"}, policy, labels) == []
    own_image = check_modeldeployment({**spec, "image": "registry.example.com/x/server:1"}, policy, labels)
    assert [v.field for v in own_image] == ["spec.auth.tokenSecret"], "a tenant's image could read the Secret"


def tj(workers: int = 1) -> dict[str, Any]:
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "t", "namespace": "ns", "uid": "u"},
           "spec": {"dataset": {"uri": "pvc://data/d.csv", "labelColumn": "y"}, "workers": workers,
                    "model": {"inputShape": [2], "layers": [{"type": "Dense", "units": 2, "activation": "softmax"}]},
                    "output": {"uri": "s3://bucket/out"}}}
    validate(doc)
    return doc


def test_trainer_egress_policy_only_when_endpoints_are_listed() -> None:
    from kiln_operator.trainingjob.render import build_trainingjob

    assert "NetworkPolicy" not in [d["kind"] for d in build_trainingjob(tj(), OperatorSettings())]
    listed = OperatorSettings(trainer_egress=["10.0.0.1/32:6443", "10.0.0.9/32:9000"])
    docs = build_trainingjob(tj(), listed)
    kinds = [d["kind"] for d in docs]
    assert kinds.index("NetworkPolicy") < kinds.index("Job"), "in place before any trainer pod starts"
    np = by_kind(docs, "NetworkPolicy")
    assert np["spec"]["podSelector"]["matchLabels"] == {"kiln.dev/trainingjob": "t"}
    assert np["spec"]["policyTypes"] == ["Ingress", "Egress"] and np["spec"]["ingress"] == []
    assert np["spec"]["egress"] == [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {"to": [{"ipBlock": {"cidr": "10.0.0.1/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]},
        {"to": [{"ipBlock": {"cidr": "10.0.0.9/32"}}], "ports": [{"protocol": "TCP", "port": 9000}]}]
    workers = by_kind(build_trainingjob(tj(workers=2), listed), "NetworkPolicy")
    peer = {"podSelector": {"matchLabels": {"kiln.dev/trainingjob": "t"}}}
    assert workers["spec"]["egress"][-1] == {"to": [peer], "ports": [{"protocol": "TCP", "port": 2222}]}
    assert workers["spec"]["ingress"] == [{"from": [peer], "ports": [{"protocol": "TCP", "port": 2222}]}]


def test_trainer_egress_entries_are_checked() -> None:
    from kiln_operator.templating import RenderError
    from kiln_operator.trainingjob.render import build_trainingjob

    with pytest.raises(RenderError, match="use CIDR:PORT"):
        build_trainingjob(tj(), OperatorSettings(trainer_egress=["10.0.0.1/32"]))
