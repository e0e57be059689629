"""`spec.canary`, pure: the replica split, the tracks' labels and selectors, the HTTPRoute, and the status."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kubernetes_validate
import pytest
from kiln_operator import names
from kiln_operator.modeldeployment.follow import canary_view, follows, resolve_followed
from kiln_operator.modeldeployment.render import ModelRef, Resolution, build_modeldeployment, revision, serves, split_replicas
from kiln_operator.modeldeployment.status import CanaryState, derive_md_status
from kiln_operator.settings import Features, OperatorSettings
from kiln_operator.templating import RenderError

from kiln.schema import ManifestError, validate

pytestmark = [pytest.mark.unit]

ROUTED = OperatorSettings(features=Features(hpa_v2=True))
NO_ROUTE = OperatorSettings(features=Features(hpa_v2=True, http_route=""))
STABLE = ModelRef("pvc://models/v1/model.onnx", "1" * 64, "v1")
CANARY = ModelRef("pvc://models/v2/model.onnx", "2" * 64, "v2")
NOW = datetime(2026, 1, 1, tzinfo=UTC)
GATEWAY = {"name": "public", "namespace": "gateways", "sectionName": "https", "hostnames": ["models.example.com"]}


def md(percent: int = 20, **spec: Any) -> dict[str, Any]:
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment",
           "metadata": {"name": "srv", "namespace": "ml", "uid": "5678", "generation": 2},
           "spec": {"model": {"trainingJob": "v1"}, "canary": {"model": {"trainingJob": "v2"}, "trafficPercent": percent}, **spec}}
    return validate(doc)


def kinds(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


@pytest.mark.parametrize(("total", "percent", "want"), [
    (10, 0, (10, 0)), (10, 10, (9, 1)), (10, 25, (7, 3)), (10, 50, (5, 5)), (10, 99, (1, 9)), (10, 100, (0, 10)),
    (4, 1, (3, 1)), (4, 12, (3, 1)), (4, 13, (3, 1)), (4, 38, (2, 2)), (2, 90, (1, 1)), (1, 10, (1, 1)), (1, 100, (0, 1)),
    (0, 50, (0, 0)), (3, 50, (1, 2)),
])
def test_the_replica_split_has_a_granularity_of_one_replica(total: int, percent: int, want: tuple[int, int]) -> None:
    stable, canary = split_replicas(total, percent)
    assert (stable, canary) == want
    if 0 < percent < 100 and total >= 2:
        assert stable + canary == total and stable >= 1 and canary >= 1
        assert abs(100 * canary / total - percent) <= 100 / total, "within one replica's share of the wanted percent"


def test_the_canary_is_a_second_deployment_behind_the_same_service() -> None:
    docs = build_modeldeployment(md(25, replicas=4), NO_ROUTE, STABLE, canary=CANARY)
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    objs = kinds(docs)
    stable, canary = objs[("Deployment", "srv-server")], objs[("Deployment", "srv-canary")]
    assert (stable["spec"]["replicas"], canary["spec"]["replicas"]) == (3, 1)
    svc = objs[("Service", "srv")]
    # The Service selects both tracks; each Deployment's pods carry their track label.
    assert names.LABEL_TRACK not in svc["spec"]["selector"]
    for dep, track in ((stable, "stable"), (canary, "canary")):
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert pod_labels[names.LABEL_TRACK] == track
        assert all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert all(pod_labels.get(k) == v for k, v in dep["spec"]["selector"]["matchLabels"].items())
    # The stable Deployment keeps the selector it always had (immutable); the canary's cannot match stable pods.
    assert stable["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]
    assert canary["spec"]["selector"]["matchLabels"][names.LABEL_TRACK] == "canary"
    canary_args = canary["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "/kiln/pvc/models/v2/model.onnx" in canary_args and canary_args[canary_args.index("--sha256") + 1] == "2" * 64
    assert canary_args[canary_args.index("--revision") + 1] == "2" * 12
    assert canary["spec"]["template"]["metadata"]["annotations"]["kiln.dev/model-sha256"] == "2" * 64
    assert serves(canary, CANARY) and not serves(canary, STABLE) and serves(stable, STABLE)
    assert not any(d["kind"] == "HTTPRoute" for d in docs), "no HTTPRoute without spec.service.gateway"


def test_no_canary_deployment_until_its_model_is_resolved() -> None:
    docs = build_modeldeployment(md(50, replicas=4), NO_ROUTE, STABLE, canary=None)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"] == ["srv-server"]
    assert docs[0]["spec"]["replicas"] == 4


def test_with_autoscaling_the_canary_is_a_share_of_min_replicas() -> None:
    objs = kinds(build_modeldeployment(md(30, autoscaling={"minReplicas": 4, "maxReplicas": 20}), NO_ROUTE, STABLE, canary=CANARY))
    assert "replicas" not in objs[("Deployment", "srv-server")]["spec"], "the HPA scales the stable Deployment"
    assert objs[("HorizontalPodAutoscaler", "srv-server")]["spec"]["scaleTargetRef"]["name"] == "srv-server"
    assert objs[("Deployment", "srv-canary")]["spec"]["replicas"] == 1


def test_with_a_gateway_an_httproute_weighs_per_track_services() -> None:
    service = {"port": 8000, "gateway": GATEWAY, "type": "LoadBalancer"}
    objs = kinds(build_modeldeployment(md(15, replicas=2, service=service), ROUTED, STABLE, canary=CANARY))
    route = objs[("HTTPRoute", "srv")]
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public",
                                            "namespace": "gateways", "sectionName": "https"}]
    assert route["spec"]["hostnames"] == ["models.example.com"]
    assert route["spec"]["rules"][0]["backendRefs"] == [{"name": "srv-stable", "port": 8000, "weight": 85},
                                                        {"name": "srv-canary", "port": 8000, "weight": 15}]
    assert route["metadata"]["ownerReferences"][0]["uid"] == "5678"
    for track in ("stable", "canary"):
        svc = objs[("Service", f"srv-{track}")]
        kubernetes_validate.validate(svc, "1.30.0", strict=True)
        assert svc["spec"]["selector"][names.LABEL_TRACK] == track and svc["spec"]["type"] == "ClusterIP"
        assert svc["spec"]["ports"][0]["port"] == 8000
    assert objs[("Service", "srv")]["spec"]["type"] == "LoadBalancer", "the main Service stays as asked"


def test_the_route_gives_the_canary_no_weight_before_it_serves_and_capacity_weights_while_promoting() -> None:
    spec = {"replicas": 4, "service": {"gateway": {"name": "gw"}}}
    not_yet = kinds(build_modeldeployment(md(40, **spec), ROUTED, STABLE, canary=CANARY, canary_ready=0))
    assert [b["weight"] for b in not_yet[("HTTPRoute", "srv")]["spec"]["rules"][0]["backendRefs"]] == [100, 0]
    assert not_yet[("Deployment", "srv-server")]["spec"]["replicas"] == 4, "the stable keeps every replica until the canary serves"
    assert not_yet[("Deployment", "srv-canary")]["spec"]["replicas"] == 2
    assert not_yet[("HTTPRoute", "srv")]["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw"}]
    promoted = md(40, **spec)
    del promoted["spec"]["canary"]
    handoff = kinds(build_modeldeployment(promoted, ROUTED, CANARY, handoff=(4, 2)))
    assert ("Deployment", "srv-canary") not in handoff, "a canary being handed off is left as it is"
    assert handoff[("HTTPRoute", "srv")]["spec"]["rules"][0]["backendRefs"] == [
        {"name": "srv-stable", "port": 80, "weight": 4}, {"name": "srv-canary", "port": 80, "weight": 2}]
    after = kinds(build_modeldeployment(promoted, ROUTED, CANARY))
    assert after[("HTTPRoute", "srv")]["spec"]["rules"][0]["backendRefs"] == [{"name": "srv-stable", "port": 80, "weight": 100}]
    assert ("Service", "srv-canary") not in after


def test_without_httproutes_served_the_gateway_field_falls_back_to_the_replica_ratio() -> None:
    objs = kinds(build_modeldeployment(md(50, replicas=2, service={"gateway": {"name": "gw"}}), NO_ROUTE, STABLE, canary=CANARY))
    assert not any(k[0] == "HTTPRoute" for k in objs) and ("Service", "srv-stable") not in objs
    assert objs[("Deployment", "srv-canary")]["spec"]["replicas"] == 1


def test_a_bad_canary_uri_names_the_canary_field() -> None:
    with pytest.raises(RenderError) as exc:
        build_modeldeployment(md(10), NO_ROUTE, STABLE, canary=ModelRef("gs://bucket/m.onnx"))
    assert exc.value.field == "spec.canary.model.uri"


def test_revision_is_the_short_digest_or_a_hash_of_the_uri() -> None:
    assert revision(STABLE) == "1" * 12
    assert revision(ModelRef("s3://b/a.onnx")) != revision(ModelRef("s3://b/b.onnx"))
    assert revision(ModelRef("s3://b/a.onnx")).startswith("uri-")


@pytest.mark.parametrize("canary", [
    {"model": {"uri": "s3://b/m.onnx"}},  # no trafficPercent
    {"model": {"uri": "s3://b/m.onnx"}, "trafficPercent": 101},
    {"model": {"uri": "s3://b/m.onnx"}, "trafficPercent": -1},
    {"model": {"uri": "s3://b/m.onnx", "trainingJob": "t"}, "trafficPercent": 10},  # two model forms
    {"model": {}, "trafficPercent": 10},
    {"trafficPercent": 10},
])
def test_nonsense_canaries_are_rejected_by_the_schema(canary: dict[str, Any]) -> None:
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "srv"},
           "spec": {"model": {"uri": "s3://b/a.onnx"}, "canary": canary}}
    with pytest.raises(ManifestError):
        validate(doc)


def test_the_canary_resolves_and_follows_like_spec_model() -> None:
    doc = md(10)
    tjs = [{"metadata": {"name": "v2"}, "status": {"phase": "Succeeded", "result": {"modelUri": CANARY.uri, "onnxSha256": CANARY.sha256}}}]
    view = canary_view(doc)
    assert view is not None and follows(view, tjs[0]) and not follows(doc, tjs[0])
    assert resolve_followed(view, tjs).model == CANARY
    doc["spec"].pop("canary")
    assert canary_view(doc) is None


def _dep(name: str, want: int, ready: int, generation: int = 1) -> dict[str, Any]:
    available = "True" if ready >= want else "False"
    return {"metadata": {"name": name, "generation": generation},
            "spec": {"replicas": want},
            "status": {"observedGeneration": generation, "replicas": want, "updatedReplicas": want, "readyReplicas": ready,
                       "conditions": [{"type": "Available", "status": available}, {"type": "Progressing", "status": "True"}]}}


def _conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_status_reports_both_models_and_canary_ready() -> None:
    doc = md(25, replicas=4)
    resolved = resolve_followed(canary_view(doc) or {}, [
        {"metadata": {"name": "v2"}, "status": {"phase": "Succeeded", "result": {"modelUri": CANARY.uri, "onnxSha256": CANARY.sha256}}}])
    state = CanaryState(resolved, _dep("srv-canary", 1, 0))
    st = derive_md_status(doc, Resolution(STABLE), _dep("srv-server", 3, 3), [], NO_ROUTE, NOW, canary=state).status
    assert _conds(st)["CanaryReady"][0] == "False" and st["phase"] == "Deploying" and st["reason"] == "CanaryDeploying"
    assert _conds(st)["Ready"][0] == "False" and _conds(st)["Reconciling"][0] == "True"
    assert st["canary"]["trafficPercent"] == 0 and st["canary"]["model"] is None
    state = CanaryState(resolved, _dep("srv-canary", 1, 1))
    st = derive_md_status(doc, Resolution(STABLE), _dep("srv-server", 3, 3), [], NO_ROUTE, NOW, canary=state).status
    assert _conds(st)["CanaryReady"] == ("True", "CanaryAvailable") and st["phase"] == "Ready"
    assert st["model"]["sha256"] == "1" * 64 and st["canary"]["model"]["sha256"] == "2" * 64
    assert st["canary"] | {"model": None} == {"model": None, "replicas": 1, "readyReplicas": 1, "trafficPercent": 25, "routing": "ReplicaRatio"}


def test_status_without_a_canary_and_while_promoting() -> None:
    doc = md(25)
    doc["spec"].pop("canary")
    st = derive_md_status(doc, Resolution(STABLE), _dep("srv-server", 1, 1), [], NO_ROUTE, NOW, canary=CanaryState(None)).status
    assert _conds(st)["CanaryReady"] == ("False", "NoCanary") and "canary" not in st and st["phase"] == "Ready"
    promoting = CanaryState(None, _dep("srv-canary", 1, 1), handoff="Promoting")
    derived = derive_md_status(doc, Resolution(CANARY), _dep("srv-server", 1, 0, generation=2), [], NO_ROUTE, NOW, canary=promoting)
    assert _conds(derived.status)["CanaryReady"] == ("False", "Promoting") and not derived.stable_ready
    assert derived.status["phase"] == "Deploying"
    failed = CanaryState(resolve_followed(canary_view(md(5)) or {}, [{"metadata": {"name": "v2"}, "status": {"phase": "Failed"}}]))
    st = derive_md_status(md(5), Resolution(STABLE), _dep("srv-server", 1, 1), [], NO_ROUTE, NOW, canary=failed).status
    assert st["phase"] == "Failed" and st["reason"] == "CanaryTrainingJobFailed" and _conds(st)["Stalled"][0] == "True"


@pytest.mark.parametrize(("replicas", "percent", "ready", "stable"), [
    (10, 50, 0, 10), (10, 50, 1, 9), (10, 50, 3, 7), (10, 50, 5, 5), (10, 50, 9, 5),
    (4, 100, 1, 3), (4, 100, 4, 0), (1, 50, 1, 1), (1, 50, 0, 1),
])
def test_the_stable_gives_up_one_replica_per_ready_canary_pod(replicas: int, percent: int, ready: int, stable: int) -> None:
    """Capacity never drops while canary pods start (or stay Pending): 10 replicas at 50 % with one canary pod
    ready serve on 9 stable + 1 canary, not 5 + 1."""
    objs = kinds(build_modeldeployment(md(percent, replicas=replicas), NO_ROUTE, STABLE, canary=CANARY, canary_ready=ready))
    assert objs[("Deployment", "srv-server")]["spec"]["replicas"] == stable
    want_canary = split_replicas(replicas, percent)[1]
    assert objs[("Deployment", "srv-canary")]["spec"]["replicas"] == want_canary
