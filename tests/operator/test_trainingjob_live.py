"""TrainingJob lifecycles on the real control plane with the real operator; the test plays the kubelet."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import kubelet
import pytest
import yaml
from kubelet import eventually

from kiln.kube import ApiError

pytestmark = [pytest.mark.live]

API = "kiln.dev/v1alpha1"
SELECTOR = "kiln.dev/trainingjob={name}"

BASE: dict[str, Any] = {
    "apiVersion": API,
    "kind": "TrainingJob",
    "metadata": {"name": "tj"},
    "spec": {
        "dataset": {"uri": "pvc://data/train.csv", "labelColumn": "label"},
        "model": {"inputShape": [4], "layers": [{"type": "Dense", "units": 8, "activation": "relu"},
                                                {"type": "Dense", "units": 3, "activation": "softmax"}]},
        "training": {"epochs": 3},
        "output": {"uri": "pvc://models/tj"},
    },
}

SUMMARY = {
    "metrics": {"accuracy": 0.97, "val_accuracy": 0.95, "loss": 0.1},
    "modelUri": "pvc://models/tj/model.onnx",
    "onnxSha256": "a" * 64,
    "parityMaxAbsDiff": 2.5e-7,
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
    "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
}


def manifest(name: str, **spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    doc["metadata"]["name"] = name
    for key, value in spec.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key].update(value)
        else:
            doc["spec"][key] = value
    return doc


def create(api: Any, ns: str, doc: dict[str, Any]) -> dict[str, Any]:
    return api.call("POST", api.path(API, "TrainingJob", ns), doc)


def tj(api: Any, ns: str, name: str) -> dict[str, Any]:
    return api.get(API, "TrainingJob", ns, name)


def wait_phase(api: Any, ns: str, name: str, phase: str, reason: str | None = None, timeout: float = 30) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = tj(api, ns, name)
        st = obj.get("status") or {}
        if st.get("phase") == phase and (reason is None or st.get("reason") == reason):
            return obj
        return None

    try:
        return eventually(check, timeout, what=f"{name} phase={phase} reason={reason}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstatus now: {json.dumps(tj(api, ns, name).get('status'), indent=1)}") from None


def one_pod(ns: str, name: str, count: int = 1) -> dict[str, Any]:
    return kubelet.wait_pods(ns, SELECTOR.format(name=name), count)[-1]


def events(api: Any, ns: str, name: str) -> list[dict[str, Any]]:
    items = api.call("GET", f"/api/v1/namespaces/{ns}/events").get("items") or []
    return [e for e in items if e["involvedObject"].get("name") == name and e["involvedObject"].get("kind") == "TrainingJob"]


def jobs(api: Any, ns: str) -> list[dict[str, Any]]:
    return api.list_objects("batch/v1", "Job", ns)


def test_success_reports_result(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("ok"))
    pod = one_pod(namespace, "ok")
    job = jobs(api, namespace)[0]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "kiln-trainer:test"
    wait_phase(api, namespace, "ok", "Pending")
    kubelet.run(pod)
    running = wait_phase(api, namespace, "ok", "Running")
    assert running["status"]["startTime"]
    kubelet.succeed(pod, SUMMARY)
    done = wait_phase(api, namespace, "ok", "Succeeded")
    st = done["status"]
    assert st["result"]["metrics"]["val_accuracy"] == 0.95
    assert st["result"]["onnxSha256"] == "a" * 64
    assert st["result"]["inputs"][0]["shape"] == [-1, 4]
    assert st["completionTime"] and st["jobName"] == job["metadata"]["name"]
    types = {c["type"]: c["status"] for c in st["conditions"]}
    assert types["Created"] == "True" and types["Succeeded"] == "True" and types["Running"] == "False"
    reasons = eventually(lambda: {e["reason"] for e in events(api, namespace, "ok")} >= {"JobCreated", "Running", "Succeeded"}
                         and {e["reason"] for e in events(api, namespace, "ok")}, what="transition events")
    assert "Succeeded" in reasons


def test_image_pull_failure_times_out_and_deletes_job(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("pull", runPolicy={"startTimeoutSeconds": 3}))
    pod = one_pod(namespace, "pull")
    kubelet.waiting(pod, "ImagePullBackOff", 'Back-off pulling image "kiln-trainer:test"')
    pending = wait_phase(api, namespace, "pull", "Pending", "ImagePullBackOff")
    assert "kiln-trainer:test" in pending["status"]["message"]
    failed = wait_phase(api, namespace, "pull", "Failed", "ImagePullBackOff", timeout=30)
    assert "startTimeoutSeconds=3" in failed["status"]["message"]
    eventually(lambda: not jobs(api, namespace), what="Job deleted after the start timeout")


def test_waiting_for_gpu(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("gpu", resources={"gpus": 2}))
    pod = one_pod(namespace, "gpu")
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["spec"]["tolerations"]
    kubelet.unschedulable(pod, "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.")
    st = wait_phase(api, namespace, "gpu", "Pending", "WaitingForGPU")["status"]
    assert "Insufficient nvidia.com/gpu" in st["message"]


def test_oom_killed(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("oom", resources={"memory": "512Mi"}))
    pod = one_pod(namespace, "oom")
    kubelet.run(pod)
    kubelet.oom(pod)
    st = wait_phase(api, namespace, "oom", "Failed", "OOMKilled")["status"]
    assert "512Mi" in st["message"]


def test_nonzero_exit_carries_termination_message(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("exit"))
    pod = one_pod(namespace, "exit")
    kubelet.run(pod)
    error = "spec.dataset.labelColumn: column 'label' not in train.csv (columns: a, b)"
    kubelet.fail(pod, 2, json.dumps({"error": error, "field": "spec.dataset.labelColumn"}))
    st = wait_phase(api, namespace, "exit", "Failed", "Error")["status"]
    assert "exited with code 2" in st["message"] and error in st["message"]


def test_crash_loop_back_off(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("crash", runPolicy={"restartPolicy": "OnFailure", "backoffLimit": 6}))
    pod = one_pod(namespace, "crash")
    assert pod["spec"]["restartPolicy"] == "OnFailure"
    kubelet.crash_loop(pod, 1, json.dumps({"error": "dataset: cannot read pvc://data/train.csv"}))
    st = wait_phase(api, namespace, "crash", "Running", "CrashLoopBackOff")["status"]
    assert "cannot read pvc://data/train.csv" in st["message"] and "restarts 3" in st["message"]


def test_deadline_exceeded(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("slow", runPolicy={"activeDeadlineSeconds": 2}))
    pod = one_pod(namespace, "slow")
    kubelet.run(pod)

    def failed() -> dict[str, Any] | None:
        obj = tj(api, namespace, "slow")
        if (obj.get("status") or {}).get("reason") == "DeadlineExceeded":
            return obj
        if (obj.get("status") or {}).get("phase") == "Running":
            with contextlib.suppress(ApiError):  # the Job controller may already be deleting the pod
                kubelet.heartbeat(pod)
        return None

    st = eventually(failed, 45, interval=1.0, what="DeadlineExceeded")["status"]
    assert st["phase"] == "Failed"
    assert "activeDeadlineSeconds=2" in st["message"]


def test_backoff_limit_exceeded_after_retries(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("retry", runPolicy={"backoffLimit": 1}))
    first = one_pod(namespace, "retry")
    kubelet.run(first)
    kubelet.fail(first, 1, json.dumps({"error": "worker lost"}))
    second = eventually(lambda: next((p for p in kubelet.pods(namespace, SELECTOR.format(name="retry"))
                                      if p["metadata"]["name"] != first["metadata"]["name"]), None), 60, what="replacement pod")
    kubelet.run(second)
    st = wait_phase(api, namespace, "retry", "Running", "Restarting")["status"]
    assert "attempt 2 of 2" in st["message"] and "worker lost" in st["message"]
    kubelet.fail(second, 1, json.dumps({"error": "worker lost again"}))
    st = wait_phase(api, namespace, "retry", "Failed", "BackoffLimitExceeded", timeout=45)["status"]
    assert "backoffLimit=1" in st["message"] and "worker lost again" in st["message"]


def test_evicted_pod_is_named(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("evict"))
    pod = one_pod(namespace, "evict")
    kubelet.run(pod)
    kubelet.evict(pod)
    st = wait_phase(api, namespace, "evict", "Failed", "Evicted")["status"]
    assert "low on resource" in st["message"]


def test_job_deleted_by_hand(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("gone"))
    one_pod(namespace, "gone")
    job = jobs(api, namespace)[0]
    api.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
    st = wait_phase(api, namespace, "gone", "Failed", "JobDeleted")["status"]
    assert job["metadata"]["name"] in st["message"]


def test_invalid_for_cluster_is_failed_with_reason(api: Any, operator: Any, namespace: str) -> None:
    doc = manifest("nowhere")
    doc["spec"]["output"] = {"uri": "file:///tmp/model"}
    create(api, namespace, doc)
    st = wait_phase(api, namespace, "nowhere", "Failed", "InvalidSpec")["status"]
    assert st["message"].startswith("spec.output.uri:")
    assert not jobs(api, namespace)


def test_spec_change_after_job_is_flagged(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("edit"))
    one_pod(namespace, "edit")
    wait_phase(api, namespace, "edit", "Pending")
    api.patch(API, "TrainingJob", namespace, "edit", {"spec": {"training": {"epochs": 50}}})

    def flagged() -> dict[str, Any] | None:
        conds = {c["type"]: c for c in tj(api, namespace, "edit")["status"].get("conditions", [])}
        return conds.get("SpecChangeIgnored")

    cond = eventually(flagged, what="SpecChangeIgnored condition")
    assert cond["status"] == "True" and "spec.training.epochs" in cond["message"]
    assert eventually(lambda: [e for e in events(api, namespace, "edit") if e["reason"] == "SpecChangeIgnored"])[0]["type"] == "Warning"
    assert len(jobs(api, namespace)) == 1
    job = jobs(api, namespace)[0]
    started_with = yaml.safe_load(job["spec"]["template"]["metadata"]["annotations"]["kiln.dev/spec"])
    assert started_with["spec"]["training"]["epochs"] == 3, "the running job keeps the spec it started with"
    assert job["spec"]["completions"] == 1


def test_suspend_holds_the_job_back_on_old_api_servers(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("later", runPolicy={"suspend": True}))
    st = wait_phase(api, namespace, "later", "Suspended")["status"]
    assert "no Job suspend" in st["message"]
    assert not jobs(api, namespace)
    api.patch(API, "TrainingJob", namespace, "later", {"spec": {"runPolicy": {"suspend": False}}})
    one_pod(namespace, "later")
    wait_phase(api, namespace, "later", "Pending", "PodPending")


def test_delete_cascades_to_every_child(api: Any, operator: Any, namespace: str) -> None:
    create(api, namespace, manifest("bye"))
    one_pod(namespace, "bye")
    kinds = [("batch/v1", "Job"), ("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
             ("rbac.authorization.k8s.io/v1", "RoleBinding")]
    sel = "kiln.dev/trainingjob=bye"
    for kind in kinds:
        assert api.list_objects(*kind, namespace, sel), kind
    meta = tj(api, namespace, "bye")["metadata"]
    assert not meta.get("finalizers")
    assert not [k for k in meta.get("annotations") or {} if "kiln.dev" in k or "kopf" in k], "no bookkeeping patches on the resource"
    api.delete(API, "TrainingJob", namespace, "bye")
    eventually(lambda: tj(api, namespace, "bye") is None, what="TrainingJob gone")
    for kind in kinds:
        eventually(lambda kind=kind: not api.list_objects(*kind, namespace, sel), 60, what=f"{kind} garbage-collected")
    eventually(lambda: not kubelet.pods(namespace, sel), 60, what="pods garbage-collected")


def test_operator_killed_mid_run_makes_no_second_job(api: Any, solo_operator: Any) -> None:
    op, ns = solo_operator
    op.start()
    create(api, ns, manifest("crashy"))
    pod = one_pod(ns, "crashy")
    op.kill()
    kubelet.run(pod)
    # While the operator is down, reality moves on; after the restart the status must catch up.
    op.start()
    wait_phase(api, ns, "crashy", "Running")
    op.kill()
    kubelet.succeed(pod, SUMMARY)
    op.start()
    st = wait_phase(api, ns, "crashy", "Succeeded")["status"]
    assert st["result"]["modelUri"] == SUMMARY["modelUri"]
    assert len(jobs(api, ns)) == 1
    assert len(kubelet.pods(ns, SELECTOR.format(name="crashy"))) == 1


def test_operator_killed_between_children_converges(api: Any, solo_operator: Any) -> None:
    op, ns = solo_operator
    # The TrainingJob exists before any operator: the first one to start must create the children once.
    create(api, ns, manifest("early"))
    op.start()
    eventually(lambda: jobs(api, ns), what="Job created")
    op.kill()
    op.start()
    wait_phase(api, ns, "early", "Pending")
    assert len(jobs(api, ns)) == 1
