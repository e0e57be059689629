"""`spec.canary` on the real control plane (the test plays the kubelet): a second Deployment behind the same
Service, the traffic split, CanaryReady, promotion without restarting the canary's pods, rollback, and the
Gateway API HTTPRoute where the cluster serves one."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import kubelet
import pytest
from kubelet import eventually
from test_modeldeployment_live import md, wait_md
from test_trainingjob_live import API

pytestmark = [pytest.mark.live]

V1, V2 = "1" * 64, "2" * 64
STABLE = {"uri": "pvc://models/v1/model.onnx", "sha256": V1}
CANARY = {"uri": "pvc://models/v2/model.onnx", "sha256": V2}
TRACK = "kiln.dev/track"


def create_md(api: Any, ns: str, name: str, **spec: Any) -> None:
    api.call("POST", api.path(API, "ModelDeployment", ns), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": name},
        "spec": {"model": STABLE, "replicas": 4, **spec}})


def dep(api: Any, ns: str, name: str) -> dict[str, Any] | None:
    return api.get("apps/v1", "Deployment", ns, name)


def replicas(api: Any, ns: str, name: str, stable: int, canary: int | None) -> dict[str, Any]:
    """Wait until the two Deployments ask for `stable` and `canary` replicas (None: no canary Deployment)."""
    def check() -> dict[str, Any] | None:
        s, c = dep(api, ns, f"{name}-server"), dep(api, ns, f"{name}-canary")
        got = ((s or {}).get("spec", {}).get("replicas"), None if c is None else c["spec"]["replicas"])
        return {"stable": s, "canary": c} if got == (stable, canary) else None

    return eventually(check, what=f"{name}: {stable} stable and {canary} canary replicas")


def run_pods(ns: str, name: str, sha: str, count: int) -> None:
    """Play the kubelet until `count` server pods of the model with digest `sha` run (the ReplicaSet makes them one by one)."""
    def running() -> bool:
        live = [p for p in kubelet.pods(ns, f"kiln.dev/modeldeployment={name}")
                if p["metadata"]["annotations"].get("kiln.dev/model-sha256") == sha and not p["metadata"].get("deletionTimestamp")]
        for pod in live:
            if (pod.get("status") or {}).get("phase") != "Running":
                kubelet.run(pod)
        return len(live) >= count

    eventually(running, what=f"{count} running pods of {name} for {sha[:8]}")


def conds(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj["status"]["conditions"]}


def canary_is(api: Any, ns: str, name: str, status: str, reason: str | None = None, percent: int | None = None) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = md(api, ns, name)
        c = conds(obj).get("CanaryReady") if (obj.get("status") or {}).get("conditions") else None
        ok = c and c["status"] == status and (reason is None or c["reason"] == reason)
        ok = ok and (percent is None or (obj["status"].get("canary") or {}).get("trafficPercent") == percent)
        ok = ok and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
        return obj if ok else None

    try:
        return eventually(check, what=f"{name} CanaryReady={status}/{reason} at {percent}%")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstatus now: {md(api, ns, name).get('status')}") from None


def test_canary_split_percent_change_and_rollback(api: Any, operator: Any, namespace: str) -> None:
    create_md(api, namespace, "split", canary={"model": CANARY, "trafficPercent": 25})
    both = replicas(api, namespace, "split", 4, 1)  # the stable keeps every replica until the canary serves
    svc = eventually(lambda: api.get("v1", "Service", namespace, "split"), what="Service")
    assert TRACK not in svc["spec"]["selector"], "one Service in front of both tracks"
    canary_pod = both["canary"]["spec"]["template"]
    assert canary_pod["metadata"]["labels"][TRACK] == "canary" and canary_pod["metadata"]["annotations"]["kiln.dev/model-sha256"] == V2
    assert both["stable"]["spec"]["template"]["metadata"]["labels"][TRACK] == "stable"
    assert "/kiln/pvc/models/v2/model.onnx" in canary_pod["spec"]["containers"][0]["args"]
    assert all(both["canary"]["spec"]["template"]["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
    st = canary_is(api, namespace, "split", "False")["status"]
    assert st["phase"] == "Deploying" and conds(md(api, namespace, "split"))["Ready"]["status"] == "False"
    run_pods(namespace, "split", V1, 4)
    run_pods(namespace, "split", V2, 1)
    both = replicas(api, namespace, "split", 3, 1)
    obj = canary_is(api, namespace, "split", "True", "CanaryAvailable", percent=25)
    st = wait_md(api, namespace, "split", "Ready")["status"]
    assert st["model"]["sha256"] == V1 and st["canary"]["model"] == {"uri": CANARY["uri"], "sha256": V2, "format": "onnx"}
    assert st["canary"]["readyReplicas"] == 1 and st["canary"]["routing"] == "ReplicaRatio"
    assert "25%" in conds(obj)["CanaryReady"]["message"]

    # 50 %: two of each; the canary's pods keep their template (only the replica count changes). The stable gives
    # up its third replica only once the second canary pod is ready: the capacity never drops below 4 pods.
    template = copy.deepcopy(both["canary"]["spec"]["template"])
    api.patch(API, "ModelDeployment", namespace, "split", {"spec": {"canary": {"trafficPercent": 50}}})
    both = replicas(api, namespace, "split", 3, 2)
    assert both["canary"]["spec"]["template"] == template
    run_pods(namespace, "split", V2, 2)
    replicas(api, namespace, "split", 2, 2)
    canary_is(api, namespace, "split", "True", percent=50)

    # Rollback: spec.canary goes, spec.model stays: the canary Deployment is deleted at once.
    api.patch(API, "ModelDeployment", namespace, "split", {"spec": {"canary": None}})
    replicas(api, namespace, "split", 4, None)
    obj = canary_is(api, namespace, "split", "False", "NoCanary")
    assert "canary" not in obj["status"]
    run_pods(namespace, "split", V1, 4)
    st = wait_md(api, namespace, "split", "Ready")["status"]
    assert st["model"]["sha256"] == V1
    events = api.list_objects("v1", "Event", namespace)
    assert any(e.get("reason") == "CanaryRemoved" for e in events)


def test_promotion_hands_off_without_restarting_the_canary_pods(api: Any, operator: Any, namespace: str) -> None:
    create_md(api, namespace, "promo", replicas=2, canary={"model": CANARY, "trafficPercent": 50})
    replicas(api, namespace, "promo", 2, 1)
    run_pods(namespace, "promo", V1, 2)
    run_pods(namespace, "promo", V2, 1)
    replicas(api, namespace, "promo", 1, 1)
    canary_is(api, namespace, "promo", "True", percent=50)
    before = dep(api, namespace, "promo-canary")
    assert before is not None
    canary_pods = {p["metadata"]["uid"] for p in kubelet.pods(namespace, f"kiln.dev/modeldeployment=promo,{TRACK}=canary")}
    assert len(canary_pods) == 1

    # Promote: the canary's model becomes spec.model, spec.canary goes.
    api.patch(API, "ModelDeployment", namespace, "promo", {"spec": {"model": CANARY, "canary": None}})
    stable = eventually(lambda: (lambda d: d if d["spec"]["template"]["metadata"]["annotations"]["kiln.dev/model-sha256"] == V2 else None)(
        dep(api, namespace, "promo-server")), what="the stable Deployment rolls to the promoted model")
    assert stable["spec"]["replicas"] == 2
    obj = canary_is(api, namespace, "promo", "False", "Promoting")
    assert obj["status"]["phase"] == "Deploying" and obj["status"]["model"]["sha256"] == V1
    during = dep(api, namespace, "promo-canary")
    assert during is not None, "the canary serves while the stable Deployment rolls out"
    assert during["metadata"]["generation"] == before["metadata"]["generation"]
    assert during["spec"]["template"] == before["spec"]["template"]
    live_canary = {p["metadata"]["uid"] for p in kubelet.pods(namespace, f"kiln.dev/modeldeployment=promo,{TRACK}=canary")
                   if not p["metadata"].get("deletionTimestamp")}
    assert live_canary == canary_pods, "no canary pod restarted or was replaced"

    def rolled_out() -> dict[str, Any] | None:
        # Play the kubelet for the stable Deployment's new pods (the canary's pod already runs V2).
        for pod in kubelet.pods(namespace, f"kiln.dev/modeldeployment=promo,{TRACK}=stable"):
            if pod["metadata"]["annotations"]["kiln.dev/model-sha256"] == V2 and (pod.get("status") or {}).get("phase") != "Running":
                kubelet.run(pod)
        obj = md(api, namespace, "promo")
        return obj if obj["status"].get("phase") == "Ready" and obj["status"]["model"]["sha256"] == V2 else None

    obj = eventually(rolled_out, 60, what="promotion finished")
    assert dep(api, namespace, "promo-canary") is None, "the canary Deployment goes once the stable one serves its model"
    assert conds(obj)["CanaryReady"]["reason"] == "NoCanary" and "canary" not in obj["status"]
    assert any(e.get("reason") == "Promoted" for e in api.list_objects("v1", "Event", namespace))


def test_rolling_back_a_full_canary_waits_for_a_stable_pod(api: Any, operator: Any, namespace: str) -> None:
    create_md(api, namespace, "full", replicas=2, canary={"model": CANARY, "trafficPercent": 100})
    replicas(api, namespace, "full", 2, 2)
    run_pods(namespace, "full", V2, 2)
    replicas(api, namespace, "full", 0, 2)
    canary_is(api, namespace, "full", "True", percent=100)
    obj = wait_md(api, namespace, "full", "Ready")  # once the stable Deployment has scaled to 0
    assert conds(obj)["Available"]["status"] == "True" and obj["status"]["readyReplicas"] == 0
    api.patch(API, "ModelDeployment", namespace, "full", {"spec": {"canary": None}})
    both = replicas(api, namespace, "full", 2, 2)
    obj = canary_is(api, namespace, "full", "False", "RollingBack")
    assert both["canary"] is not None, "no outage: the canary serves until a stable pod is ready"
    run_pods(namespace, "full", V1, 1)
    eventually(lambda: dep(api, namespace, "full-canary") is None, what="the canary deleted once a stable pod serves")
    run_pods(namespace, "full", V1, 2)
    st = wait_md(api, namespace, "full", "Ready")["status"]
    assert st["model"]["sha256"] == V1 and "canary" not in st


def test_canary_following_a_trainingjob_waits_for_it(api: Any, operator: Any, namespace: str) -> None:
    create_md(api, namespace, "wait", replicas=2, canary={"model": {"trainingJob": "next"}, "trafficPercent": 10})
    obj = canary_is(api, namespace, "wait", "False", "TrainingJobNotFound")
    assert obj["status"]["reason"] in ("Deploying", "CanaryTrainingJobNotFound")
    assert dep(api, namespace, "wait-canary") is None and replicas(api, namespace, "wait", 2, None)
    run_pods(namespace, "wait", V1, 2)
    obj = eventually(lambda: (lambda o: o if o["status"].get("reason") == "CanaryTrainingJobNotFound" else None)(md(api, namespace, "wait")),
                     what="the canary's missing TrainingJob is the reason")
    assert obj["status"]["phase"] == "Deploying" and conds(obj)["Ready"]["status"] == "False"


HTTPROUTE_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    # *.k8s.io groups need an approval annotation; this is the upstream CRDs' own.
    "metadata": {"name": "httproutes.gateway.networking.k8s.io",
                 "annotations": {"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"}},
    "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
             "names": {"kind": "HTTPRoute", "listKind": "HTTPRouteList", "plural": "httproutes", "singular": "httproute"},
             # Trimmed: the upstream CRD's CEL rules need a newer API server than 1.20; the fields Kiln sets are typed.
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "properties": {"spec": {"type": "object", "properties": {
                     "parentRefs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                         "group": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                         "namespace": {"type": "string"}, "sectionName": {"type": "string"}}}},
                     "hostnames": {"type": "array", "items": {"type": "string"}},
                     "rules": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {
                         "backendRefs": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                             "name": {"type": "string"}, "port": {"type": "integer"},
                             "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}}}}}}}}},
                     "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}},
                 "subresources": {"status": {}}}]},
}


@pytest.fixture
def gateway_api(api: Any, control_plane: Any, tmp_path: Path, solo_operator: Any) -> Any:
    """A trimmed HTTPRoute CRD, then an operator of its own (it reads what the API serves at startup)."""
    from kiln.kube import ApiError

    try:
        api.call("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", HTTPROUTE_CRD)
    except ApiError as exc:
        assert exc.status == 409, exc  # already there (an earlier test of this session)
    eventually(lambda: "gateway.networking.k8s.io/v1" in api.api_versions(), 60, what="HTTPRoute served")
    op, ns = solo_operator
    op.start()
    yield ns
    op.stop()
    with contextlib.suppress(ApiError):
        api.call("DELETE", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/httproutes.gateway.networking.k8s.io")


def route(api: Any, ns: str, name: str) -> dict[str, Any] | None:
    return api.get("gateway.networking.k8s.io/v1", "HTTPRoute", ns, name)


def weights(api: Any, ns: str, name: str, want: dict[str, int]) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        r = route(api, ns, name)
        got = {b["name"]: b["weight"] for b in r["spec"]["rules"][0]["backendRefs"]} if r else None
        return r if got == want else None

    return eventually(check, what=f"HTTPRoute {name} weights {want}")


def test_a_gateway_route_weighs_per_track_services(api: Any, gateway_api: str) -> None:
    ns = gateway_api
    gateway = {"name": "public", "namespace": "infra", "hostnames": ["models.example.com"]}
    create_md(api, ns, "gw", service={"gateway": gateway}, canary={"model": CANARY, "trafficPercent": 30})
    # Before the canary has a ready pod the route gives it nothing (a backend without endpoints fails requests).
    r = weights(api, ns, "gw", {"gw-stable": 100, "gw-canary": 0})
    assert r["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public", "namespace": "infra"}]
    assert r["spec"]["hostnames"] == ["models.example.com"] and r["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    for track in ("stable", "canary"):
        svc = eventually(lambda t=track: api.get("v1", "Service", ns, f"gw-{t}"), what=f"{track} Service")
        assert svc["spec"]["selector"][TRACK] == track
    replicas(api, ns, "gw", 4, 1)
    run_pods(ns, "gw", V1, 4)
    run_pods(ns, "gw", V2, 1)
    replicas(api, ns, "gw", 3, 1)
    weights(api, ns, "gw", {"gw-stable": 70, "gw-canary": 30})
    obj = canary_is(api, ns, "gw", "True", percent=30)
    assert obj["status"]["canary"]["routing"] == "HTTPRoute"
    api.patch(API, "ModelDeployment", ns, "gw", {"spec": {"canary": {"trafficPercent": 5}}})
    weights(api, ns, "gw", {"gw-stable": 95, "gw-canary": 5})
    canary_is(api, ns, "gw", "True", percent=5)
    # Rollback: the canary's Deployment and Service go, the route sends everything to the stable track.
    api.patch(API, "ModelDeployment", ns, "gw", {"spec": {"canary": None}})
    weights(api, ns, "gw", {"gw-stable": 100})
    eventually(lambda: dep(api, ns, "gw-canary") is None and api.get("v1", "Service", ns, "gw-canary") is None,
               what="the canary's Deployment and Service deleted")
    # Without spec.service.gateway, no route and no per-track Services.
    api.patch(API, "ModelDeployment", ns, "gw", {"spec": {"service": {"gateway": None}}})
    eventually(lambda: route(api, ns, "gw") is None and api.get("v1", "Service", ns, "gw-stable") is None, what="route removed")
    assert api.get("v1", "Service", ns, "gw") is not None


def test_a_route_left_while_the_operator_was_down_is_removed_when_it_starts(api: Any, gateway_api: str,
                                                                           solo_operator: Any) -> None:
    """spec.service.gateway removed while the operator was stopped: the new operator, which never applied
    that route, still deletes it (it used to key the delete on what it had applied since its start)."""
    op, ns = solo_operator
    create_md(api, ns, "gwr", service={"gateway": {"name": "public"}})
    r = eventually(lambda: route(api, ns, "gwr"), what="HTTPRoute gwr")
    assert r["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    op.stop()
    api.patch(API, "ModelDeployment", ns, "gwr", {"spec": {"service": {"gateway": None}}})
    assert route(api, ns, "gwr") is not None, "nothing deletes it while the operator is down"
    op.start()
    eventually(lambda: route(api, ns, "gwr") is None, what="the leftover HTTPRoute deleted after the restart")
    assert api.get("v1", "Service", ns, "gwr") is not None
