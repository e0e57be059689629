"""ModelDeployment lifecycles on the real control plane: from a TrainingJob to a Ready model server."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubelet
import pytest
from kubelet import eventually
from test_trainingjob_live import API, SUMMARY, create, manifest, one_pod, wait_phase

pytestmark = [pytest.mark.live]

MD_SELECTOR = "kiln.dev/modeldeployment={name}"


def train(api: Any, ns: str, name: str, sha: str = "a" * 64, deploy: dict[str, Any] | None = None) -> dict[str, Any]:
    """A TrainingJob driven to success by the test kubelet, reporting a model with digest `sha`."""
    doc = manifest(name)
    if deploy is not None:
        doc["spec"]["deploy"] = deploy
    create(api, ns, doc)
    pod = one_pod(ns, name)
    kubelet.run(pod)
    summary = copy.deepcopy(SUMMARY)
    summary["modelUri"] = f"pvc://models/{name}/model.onnx"
    summary["onnxSha256"] = sha
    kubelet.succeed(pod, summary)
    return wait_phase(api, ns, name, "Succeeded")


def md(api: Any, ns: str, name: str) -> dict[str, Any]:
    return api.get(API, "ModelDeployment", ns, name)


def wait_md(api: Any, ns: str, name: str, phase: str, reason: str | None = None, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = md(api, ns, name)
        st = (obj or {}).get("status") or {}
        return obj if st.get("phase") == phase and (reason is None or st.get("reason") == reason) else None

    try:
        return eventually(check, timeout, what=f"ModelDeployment {name} {phase}/{reason}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstatus now: {json.dumps((md(api, ns, name) or {}).get('status'), indent=1)}") from None


def deployment(api: Any, ns: str, name: str) -> dict[str, Any]:
    return eventually(lambda: api.get("apps/v1", "Deployment", ns, f"{name}-server"), what="Deployment")


def ready_pods(ns: str, name: str, sha: str) -> None:
    """Play the kubelet: run every server pod of the model with digest `sha`."""
    def pending() -> list[dict[str, Any]] | None:
        ps = [p for p in kubelet.pods(ns, MD_SELECTOR.format(name=name))
              if p["metadata"]["annotations"].get("kiln.dev/model-sha256") == sha and not p["metadata"].get("deletionTimestamp")]
        return ps or None

    for pod in eventually(pending, what=f"server pods for {sha[:8]}"):
        if (pod.get("status") or {}).get("phase") != "Running":
            kubelet.run(pod)


def test_trainingjob_deploys_and_becomes_ready(api: Any, operator: Any, namespace: str) -> None:
    done = train(api, namespace, "iris", deploy={"replicas": 1, "batching": {"maxBatchSize": 16, "maxLatencyMs": 2}})
    assert eventually(lambda: (api.get(API, "TrainingJob", namespace, "iris")["status"]).get("deployment")) == "iris"
    assert done["status"]["result"]["modelUri"] == "pvc://models/iris/model.onnx"
    dep = deployment(api, namespace, "iris")
    pod_spec = dep["spec"]["template"]["spec"]
    server = pod_spec["containers"][0]
    assert server["image"] == "kiln-server:test"
    assert server["args"][:4] == ["--model", "/kiln/pvc/models/iris/model.onnx", "--name", "iris"]
    assert "--max-batch-size" in server["args"] and "--sha256" in server["args"]
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["startupProbe"]["failureThreshold"] >= 100
    assert pod_spec["volumes"][1]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] in (0, "0")
    svc = eventually(lambda: api.get("v1", "Service", namespace, "iris"), what="Service")
    assert svc["spec"]["ports"][0]["port"] == 80
    wait_md(api, namespace, "iris", "Deploying")
    ready_pods(namespace, "iris", "a" * 64)
    st = wait_md(api, namespace, "iris", "Ready")["status"]
    assert st["url"] == f"http://iris.{namespace}.svc.cluster.local/v2/models/iris"
    assert st["model"] == {"uri": "pvc://models/iris/model.onnx", "sha256": "a" * 64, "trainingJob": "iris", "format": "onnx"}
    assert st["readyReplicas"] == 1
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds["Ready"] == "True" and conds["PredictorReady"] == "True" and conds["ModelResolved"] == "True" and conds["Available"] == "True" and conds["Stalled"] == "False" and conds["Reconciling"] == "False"


def test_waits_for_training_then_rolls_out_a_new_model(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("v1"))
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "svc"},
        "spec": {"model": {"trainingJob": "v1"}, "replicas": 2}})
    st = wait_md(api, namespace, "svc", "WaitingForModel", "TrainingJobNotSucceeded")["status"]
    assert "waiting for TrainingJob v1" in st["message"]
    assert api.get("apps/v1", "Deployment", namespace, "svc-server") is None
    pod = one_pod(namespace, "v1")
    kubelet.run(pod)
    summary = {**SUMMARY, "modelUri": "pvc://models/v1/model.onnx", "onnxSha256": "1" * 64}
    kubelet.succeed(pod, summary)
    deployment(api, namespace, "svc")
    ready_pods(namespace, "svc", "1" * 64)
    st = wait_md(api, namespace, "svc", "Ready")["status"]
    assert st["model"]["sha256"] == "1" * 64 and st["readyReplicas"] == 2

    train(api, namespace, "v2", sha="2" * 64)
    api.patch(API, "ModelDeployment", namespace, "svc", {"spec": {"model": {"trainingJob": "v2"}}})
    dep = eventually(lambda: (lambda d: d if d["spec"]["template"]["metadata"]["annotations"]["kiln.dev/model-sha256"] == "2" * 64 else None)(
        api.get("apps/v1", "Deployment", namespace, "svc-server")), what="new pod template")
    assert "/kiln/pvc/models/v2/model.onnx" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    st = wait_md(api, namespace, "svc", "Deploying")["status"]
    assert st["model"]["sha256"] == "1" * 64, "status names the model still being served during the rollout"
    # The rolling update surges one new pod at a time: keep playing the kubelet until the rollout is done.
    def rolled_out() -> dict[str, Any] | None:
        ready_pods(namespace, "svc", "2" * 64)
        obj = md(api, namespace, "svc")
        return obj if obj["status"].get("phase") == "Ready" else None

    st = eventually(rolled_out, 60, interval=0.5, what="rollout to v2")["status"]
    assert st["model"] == {"uri": "pvc://models/v2/model.onnx", "sha256": "2" * 64, "trainingJob": "v2", "format": "onnx"}


def test_drift_is_put_back(api: Any, operator: Any, namespace: str) -> None:
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "drift"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx"}, "replicas": 1, "service": {"port": 8000}}})
    dep = deployment(api, namespace, "drift")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    # A hand edit, as `kubectl edit` would send it (strategic merge by container name).
    api.call("PATCH", api.path("apps/v1", "Deployment", namespace, "drift-server"),
             {"spec": {"replicas": 5, "template": {"spec": {"containers": [{"name": "server", "args": ["--model", "/evil.onnx"]}]}}}},
             content_type="application/strategic-merge-patch+json")
    eventually(lambda: (lambda d: d["spec"]["replicas"] == 1 and d["spec"]["template"]["spec"]["containers"][0]["args"] == args)(
        api.get("apps/v1", "Deployment", namespace, "drift-server")), what="Deployment put back")
    api.patch("v1", "Service", namespace, "drift", {"spec": {"ports": [{"name": "http", "port": 9999, "targetPort": "http"}]}})
    eventually(lambda: api.get("v1", "Service", namespace, "drift")["spec"]["ports"][0]["port"] == 8000, what="Service put back")


def test_failures_have_reasons(api: Any, operator: Any, namespace: str) -> None:
    # A TrainingJob that failed: the deployment fails with its reason.
    create(api, namespace, manifest("bad"))
    pod = one_pod(namespace, "bad")
    kubelet.fail(pod, 2, json.dumps({"error": "spec.dataset.uri: not found"}))
    wait_phase(api, namespace, "bad", "Failed")
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "bad"}, "spec": {"model": {"trainingJob": "bad"}}})
    st = wait_md(api, namespace, "bad", "Failed", "TrainingJobFailed")["status"]
    assert "spec.dataset.uri: not found" in st["message"]
    # A server that cannot load its model crash-loops: the reason carries its termination message.
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "crash"},
        "spec": {"model": {"uri": "pvc://models/none/model.onnx"}, "progressDeadlineSeconds": 600}})
    pod = kubelet.wait_pods(namespace, MD_SELECTOR.format(name="crash"))[0]
    kubelet.crash_loop(pod, 1, "model file /kiln/pvc/models/none/model.onnx not found")
    st = wait_md(api, namespace, "crash", "Deploying", "CrashLoopBackOff")["status"]
    assert "model.onnx not found" in st["message"]
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "False"


def test_progress_deadline_exceeded_fails(api: Any, operator: Any, namespace: str) -> None:
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "stuck"},
        "spec": {"model": {"uri": "s3://bucket/model.onnx", "sha256": "b" * 64}, "progressDeadlineSeconds": 1}})
    dep = deployment(api, namespace, "stuck")
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["python", "-m", "kiln_server.fetch", "s3://bucket/model.onnx", "/models/model.onnx", "--sha256", "b" * 64]
    pod = kubelet.wait_pods(namespace, MD_SELECTOR.format(name="stuck"))[0]
    kubelet.waiting(pod, "ImagePullBackOff", 'Back-off pulling image "kiln-server:test"')
    wait_md(api, namespace, "stuck", "Failed", "ProgressDeadlineExceeded", timeout=60)
    # The Deployment's deadline (1 s) can reach the operator before the pod's waiting state does; the
    # status then gains the pod's reason with the pod event.
    st = eventually(lambda: (lambda s: s if "ImagePullBackOff" in s.get("message", "") else None)(md(api, namespace, "stuck")["status"]),
                    what="the pod's reason in the failure message")
    assert st["reason"] == "ProgressDeadlineExceeded" and st["phase"] == "Failed"


def test_autoscaling_degrades_without_hpa_v2(api: Any, operator: Any, namespace: str) -> None:
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "auto"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx"}, "autoscaling": {"minReplicas": 2, "maxReplicas": 5}}})
    dep = deployment(api, namespace, "auto")
    assert dep["spec"]["replicas"] == 2
    cond = eventually(lambda: {c["type"]: c for c in (md(api, namespace, "auto").get("status") or {}).get("conditions", [])}.get("AutoscalerReady"),
                      what="AutoscalerReady condition")
    assert cond["status"] == "False" and cond["reason"] == "AutoscalingUnavailable" and "v1.20" in cond["message"]


def test_grpc_port_workers_and_grpc_address(api: Any, operator: Any, namespace: str) -> None:
    """gRPC is a named Service port (appProtocol grpc) whose address the status carries; workers follow the CPU request."""
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "rpc"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx", "sha256": "c" * 64}, "replicas": 1,
                 "resources": {"cpu": "2"}, "service": {"grpcPort": 9001}}})
    dep = deployment(api, namespace, "rpc")
    server = dep["spec"]["template"]["spec"]["containers"][0]
    args = server["args"]
    assert args[args.index("--grpc-port") + 1] == "9000" and args[args.index("--workers") + 1] == "2"
    assert {"name": "grpc", "containerPort": 9000, "protocol": "TCP"} in server["ports"]
    svc = eventually(lambda: api.get("v1", "Service", namespace, "rpc"), what="Service")
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert (grpc_port["port"], grpc_port["targetPort"], grpc_port["appProtocol"]) == (9001, "grpc", "grpc")
    ready_pods(namespace, "rpc", "c" * 64)
    st = wait_md(api, namespace, "rpc", "Ready")["status"]
    assert st["grpcAddress"] == f"rpc.{namespace}.svc.cluster.local:9001"
    assert st["url"] == f"http://rpc.{namespace}.svc.cluster.local/v2/models/rpc"

    # An explicit worker count wins over the CPU request; grpcPort 0 turns gRPC off everywhere.
    api.patch(API, "ModelDeployment", namespace, "rpc", {"spec": {"workers": 1, "service": {"grpcPort": 0}}})

    def updated() -> dict[str, Any] | None:
        d = api.get("apps/v1", "Deployment", namespace, "rpc-server")
        a = d["spec"]["template"]["spec"]["containers"][0]["args"]
        return d if "--grpc-port" not in a and a[a.index("--workers") + 1] == "1" else None

    eventually(updated, what="Deployment without gRPC, one worker")
    eventually(lambda: [p["name"] for p in api.get("v1", "Service", namespace, "rpc")["spec"]["ports"]] == ["http"], what="Service without grpc")
    eventually(lambda: "grpcAddress" not in (md(api, namespace, "rpc").get("status") or {}), what="grpcAddress removed")


def test_grpc_port_clashing_with_the_http_port_is_refused(api: Any, operator: Any, namespace: str) -> None:
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "clash"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx"}, "service": {"port": 9000}}})
    st = wait_md(api, namespace, "clash", "Failed", "InvalidSpec")["status"]
    assert "spec.service.grpcPort" in st["message"] and "must differ" in st["message"]
    assert api.get("apps/v1", "Deployment", namespace, "clash-server") is None


def test_gpus_without_a_gpu_server_image_are_refused(api: Any, operator: Any, namespace: str) -> None:
    """The CPU image would hold a GPU it never uses: the status says why nothing is deployed."""
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "gpu"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx"}, "resources": {"gpus": 1}}})
    st = wait_md(api, namespace, "gpu", "Failed", "InvalidSpec")["status"]
    assert "asks for 1 GPU(s) but the operator has no GPU server image" in st["message"]
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "False"
    assert api.get("apps/v1", "Deployment", namespace, "gpu-server") is None


def test_network_policy_follows_spec_edits(api: Any, operator: Any, namespace: str) -> None:
    """An edit to spec.networkPolicy reaches the NetworkPolicy in the same operator run (it is not watched:
    the operator compares what it renders with what it last applied)."""
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "netpol"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx"}, "replicas": 1}})

    def peers() -> list[dict[str, Any]] | None:
        pol = api.get("networking.k8s.io/v1", "NetworkPolicy", namespace, "netpol-server")
        return pol["spec"]["ingress"][0]["from"] if pol else None

    assert eventually(peers, what="NetworkPolicy") == [{"podSelector": {}}]
    api.patch(API, "ModelDeployment", namespace, "netpol",
              {"spec": {"networkPolicy": {"from": [{"podSelector": {"app": "client"}}]}}})
    eventually(lambda: peers() == [{"podSelector": {"matchLabels": {"app": "client"}}}], what="NetworkPolicy updated")
