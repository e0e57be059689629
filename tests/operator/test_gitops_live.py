"""What GitOps tools and kubectl read, on the real control plane with the real operator and the real kubectl:
`kubectl wait --for=condition=...`, the operator's /metrics, and retraining without deleting anything.

(The kstatus rules and Argo CD's Lua health checks are applied to every status written in every live
test by the `namespace` fixture, see tests/conftest.py.)
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import kubelet
import pytest
from kubelet import eventually
from support.kstatus import condition
from test_modeldeployment_live import deployment, md, ready_pods, train, wait_md
from test_trainingjob_live import API, SUMMARY, create, manifest, one_pod, tj, wait_phase

pytestmark = [pytest.mark.live]


def background_wait(tools: Any, control_plane: Any, ns: str, target: str, cond: str, timeout: int) -> subprocess.Popen[str]:
    """`kubectl wait` running while the test drives the resource."""
    argv = [str(tools / "kubectl"), "--kubeconfig", str(control_plane.kubeconfig), "-n", ns, "wait",
            f"--for=condition={cond}", target, f"--timeout={timeout}s"]
    return subprocess.Popen(argv, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished_within(proc: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    out, err = proc.communicate(timeout=seconds)
    return proc.returncode, out + err


def test_kubectl_wait_for_succeeded(api: Any, operator: Any, namespace: str, kubectl: Any, tools: Any, control_plane: Any) -> None:
    create(api, namespace, manifest("w"))
    pod = one_pod(namespace, "w")
    kubelet.run(pod)
    wait_phase(api, namespace, "w", "Running")
    early = kubectl("wait", "--for=condition=Succeeded", "tj/w", "--timeout=2s", namespace=namespace, check=False)
    assert early.returncode != 0 and "timed out" in early.stderr, early
    waiter = background_wait(tools, control_plane, namespace, "tj/w", "Succeeded", 60)
    kubelet.succeed(pod, SUMMARY)
    wait_phase(api, namespace, "w", "Succeeded")
    seen = time.monotonic()
    code, text = finished_within(waiter, 30)
    assert code == 0 and "condition met" in text, text
    assert time.monotonic() - seen < 5, "kubectl wait returned late"
    ready = kubectl("wait", "--for=condition=Ready", "tj/w", "--timeout=5s", namespace=namespace, check=False)
    assert ready.returncode == 0, ready.stderr
    header, row = kubectl("get", "tj", "w", "-o", "wide", namespace=namespace).stdout.splitlines()
    assert header.split()[:4] == ["NAME", "PHASE", "PROGRESS", "GPUS"] and header.split()[-1] == "READY", header
    assert row.split()[1] == "Succeeded" and row.split()[-1] == "True", row
    # A spec edit bumps the generation: the operator marks every condition as observed at it (the edit
    # itself is ignored, the Job is a record), so kubectl wait does not hang on a stale observedGeneration.
    api.patch(API, "TrainingJob", namespace, "w", {"spec": {"training": {"epochs": 9}}})
    obj = eventually(lambda: (lambda o: o if o["status"].get("observedGeneration") == o["metadata"]["generation"] else None)(
        tj(api, namespace, "w")), what="observedGeneration after the edit")
    assert obj["metadata"]["generation"] == 2
    assert all(c.get("observedGeneration") == 2 for c in obj["status"]["conditions"]), obj["status"]["conditions"]
    again = kubectl("wait", "--for=condition=Succeeded", "tj/w", "--timeout=10s", namespace=namespace, check=False)
    assert again.returncode == 0, again.stderr
    failed = kubectl("wait", "--for=condition=Failed", "tj/w", "--timeout=2s", namespace=namespace, check=False)
    assert failed.returncode != 0 and "timed out" in failed.stderr


def test_kubectl_wait_honours_observed_generation(api: Any, kubectl: Any, solo_operator: Any) -> None:
    """This kubectl (scripts/tools.sh) waits while a condition's observedGeneration is behind: shown on a
    namespace no operator watches (kiln-solo-*), with a status written by hand."""
    _, ns = solo_operator  # not started: nothing reconciles this namespace
    create(api, ns, manifest("hand", runPolicy={"suspend": True}))
    api.patch(API, "TrainingJob", ns, "hand", {"spec": {"training": {"epochs": 4}}})  # generation 2
    stale = {"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "m",
             "lastTransitionTime": kubelet.now(), "observedGeneration": 1}
    api.call("PATCH", api.path(API, "TrainingJob", ns, "hand", "status"), {"status": {"conditions": [stale]}},
             content_type="application/merge-patch+json")
    behind = kubectl("wait", "--for=condition=Succeeded", "tj/hand", "--timeout=3s", namespace=ns, check=False)
    assert behind.returncode != 0 and "timed out" in behind.stderr, behind
    api.call("PATCH", api.path(API, "TrainingJob", ns, "hand", "status"),
             {"status": {"conditions": [{**stale, "observedGeneration": 2}]}}, content_type="application/merge-patch+json")
    caught_up = kubectl("wait", "--for=condition=Succeeded", "tj/hand", "--timeout=10s", namespace=ns, check=False)
    assert caught_up.returncode == 0, caught_up.stderr
    version = kubectl("version", "--client", "-o", "json").stdout
    assert '"minor"' in version


def test_kubectl_wait_for_ready_modeldeployment(api: Any, operator: Any, namespace: str, kubectl: Any, tools: Any,
                                                control_plane: Any) -> None:
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "m"},
        "spec": {"model": {"uri": "pvc://models/m/model.onnx", "sha256": "c" * 64}, "replicas": 1}})
    deployment(api, namespace, "m")
    first = eventually(lambda: condition(md(api, namespace, "m"), "Ready"), what="Ready condition from the first write")
    assert first["status"] == "False" and first["reason"]
    early = kubectl("wait", "--for=condition=Ready", "md/m", "--timeout=2s", namespace=namespace, check=False)
    assert early.returncode != 0 and "timed out" in early.stderr
    waiter = background_wait(tools, control_plane, namespace, "md/m", "Ready", 60)
    ready_pods(namespace, "m", "c" * 64)
    wait_md(api, namespace, "m", "Ready")
    seen = time.monotonic()
    code, text = finished_within(waiter, 30)
    assert code == 0 and "condition met" in text, text
    assert time.monotonic() - seen < 5
    header, row = kubectl("get", "md", "m", "-o", "wide", namespace=namespace).stdout.splitlines()
    # Wide columns: ... URL, AVAILABLE, CANARY (empty without a canary). Read AVAILABLE at its header's offset.
    assert header.split()[-3:] == ["URL", "AVAILABLE", "CANARY"], header
    at = header.index("AVAILABLE")
    assert row[at:].split()[0] == "True", (header, row)


def counter(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_move_with_the_work(api: Any, operator: Any, namespace: str) -> None:
    before = operator.metrics()
    assert counter(before, "kiln_operator_leader") == 1
    assert counter(before, "kiln_operator_watch_starts_total", resource="trainingjobs.v1alpha1.kiln.dev") >= 1
    create(api, namespace, manifest("m1"))
    create(api, namespace, manifest("m2"))
    pods = {n: one_pod(namespace, n) for n in ("m1", "m2")}
    kubelet.run(pods["m1"])
    kubelet.succeed(pods["m1"], SUMMARY)
    kubelet.run(pods["m2"])
    kubelet.oom(pods["m2"])
    wait_phase(api, namespace, "m1", "Succeeded")
    wait_phase(api, namespace, "m2", "Failed", "OOMKilled")

    def moved() -> dict[Any, float] | None:
        after = operator.metrics()
        grew = lambda name, **ls: counter(after, name, **ls) - counter(before, name, **ls)  # noqa: E731
        ok = (grew("kiln_operator_reconciles_total", kind="TrainingJob", result="success") >= 4
              and grew("kiln_operator_reconcile_duration_seconds_count", kind="TrainingJob") >= 4
              and grew("kiln_operator_api_requests_total", verb="POST", code="201") >= 2 * 4  # SA, Role, RoleBinding, Job each
              and grew("kiln_operator_api_requests_total", verb="PATCH", code="200") >= 4
              and grew("kiln_operator_status_writes_total", kind="TrainingJob") >= 4
              and grew("kiln_operator_trainingjobs", phase="Succeeded") >= 1
              and grew("kiln_operator_trainingjobs", phase="Failed") >= 1)
        return after if ok else None

    after = eventually(moved, 20, what="operator metrics to count the two runs")
    assert counter(after, "kiln_operator_reconciles_in_flight") >= 0
    assert ("kiln_operator_queue_depth", (("kind", "TrainingJob"),)) in after
    assert counter(after, "kiln_operator_modeldeployments", ready="true") >= 0


def ready_forever(api: Any, ns: str, name: str, statuses: Any, since: int) -> list[dict[str, Any]]:
    """Every recorded version of the ModelDeployment after the `since`-th: all must be Ready=True."""
    versions = [o for o in statuses.objects(ns) if o["kind"] == "ModelDeployment" and o["metadata"]["name"] == name]
    return [o for o in versions[since:] if (condition(o, "Ready") or {}).get("status") != "True"]


def test_retrain_by_label_selector_keeps_serving(api: Any, operator: Any, namespace: str, statuses: Any) -> None:
    labelled = {"metadata": {"labels": {"kiln.dev/model": "iris"}}}
    doc = manifest("iris-1")
    doc["metadata"].update(labelled["metadata"])
    create(api, namespace, doc)
    pod = one_pod(namespace, "iris-1")
    kubelet.run(pod)
    kubelet.succeed(pod, {**SUMMARY, "modelUri": "pvc://models/iris-1/model.onnx", "onnxSha256": "1" * 64})
    wait_phase(api, namespace, "iris-1", "Succeeded")
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "iris"},
        "spec": {"model": {"trainingJobSelector": {"matchLabels": {"kiln.dev/model": "iris"}}}, "replicas": 1}})
    deployment(api, namespace, "iris")
    ready_pods(namespace, "iris", "1" * 64)
    st = wait_md(api, namespace, "iris", "Ready")["status"]
    assert st["model"]["trainingJob"] == "iris-1" and condition({"status": st}, "ModelResolved")["reason"] == "NewestSucceeded"
    mark = len([o for o in statuses.objects(namespace) if o["kind"] == "ModelDeployment"])

    # A second run trains: the first model stays served, Ready=True throughout.
    doc = manifest("iris-2")
    doc["metadata"].update(labelled["metadata"])
    doc["spec"]["output"] = {"uri": "pvc://models/iris-2"}
    create(api, namespace, doc)
    pod2 = one_pod(namespace, "iris-2")
    kubelet.run(pod2)
    wait_phase(api, namespace, "iris-2", "Running")
    unrelated = manifest("other-1")  # no label: never served
    create(api, namespace, unrelated)
    now = md(api, namespace, "iris")
    assert now["status"]["phase"] == "Ready" and now["status"]["model"]["trainingJob"] == "iris-1"
    assert not ready_forever(api, namespace, "iris", statuses, mark)

    kubelet.succeed(pod2, {**SUMMARY, "modelUri": "pvc://models/iris-2/model.onnx", "onnxSha256": "2" * 64})
    wait_phase(api, namespace, "iris-2", "Succeeded")

    def rolled_out() -> dict[str, Any] | None:
        ready_pods(namespace, "iris", "2" * 64)
        obj = md(api, namespace, "iris")
        return obj if obj["status"].get("phase") == "Ready" and obj["status"]["model"]["trainingJob"] == "iris-2" else None

    st = eventually(rolled_out, 60, interval=0.5, what="rollout to iris-2")["status"]
    assert st["model"]["sha256"] == "2" * 64
    during = [o for o in statuses.objects(namespace) if o["kind"] == "ModelDeployment"][mark:]
    assert any((condition(o, "Available") or {}).get("status") == "True" and o["status"]["phase"] == "Deploying" for o in during), \
        "the rollout was reported as Deploying while still Available"


def test_retrain_by_name_serves_the_previous_model(api: Any, operator: Any, namespace: str, statuses: Any) -> None:
    train(api, namespace, "digits", sha="3" * 64)
    api.call("POST", api.path(API, "ModelDeployment", namespace), {
        "apiVersion": API, "kind": "ModelDeployment", "metadata": {"name": "digits"},
        "spec": {"model": {"trainingJob": "digits"}, "replicas": 1}})
    deployment(api, namespace, "digits")
    ready_pods(namespace, "digits", "3" * 64)
    wait_md(api, namespace, "digits", "Ready")
    # Retrain under the same name: delete the finished run, apply the manifest again.
    api.delete(API, "TrainingJob", namespace, "digits")
    eventually(lambda: tj(api, namespace, "digits") is None and not kubelet.pods(namespace, "kiln.dev/trainingjob=digits"),
               what="old run and its pods garbage-collected")
    mark = len([o for o in statuses.objects(namespace) if o["kind"] == "ModelDeployment"])
    doc = manifest("digits")
    doc["spec"]["output"] = {"uri": "pvc://models/digits-2"}
    create(api, namespace, doc)
    pod = one_pod(namespace, "digits")
    kubelet.run(pod)
    wait_phase(api, namespace, "digits", "Running")

    def retraining() -> dict[str, Any] | None:
        obj = md(api, namespace, "digits")
        return obj if (condition(obj, "ModelResolved") or {}).get("reason") == "Retraining" else None

    obj = eventually(retraining, what="ModelResolved=Retraining")
    assert obj["status"]["phase"] == "Ready" and condition(obj, "Ready")["status"] == "True"
    assert "serving the previous model" in condition(obj, "ModelResolved")["message"]
    assert not ready_forever(api, namespace, "digits", statuses, mark)
    kubelet.fail(pod, 1, '{"error": "diverged"}')
    wait_phase(api, namespace, "digits", "Failed")

    def kept() -> dict[str, Any] | None:
        obj = md(api, namespace, "digits")
        return obj if (condition(obj, "ModelResolved") or {}).get("reason") == "TrainingJobFailed" else None

    obj = eventually(kept, what="ModelResolved=False after the failed retrain")
    assert condition(obj, "ModelResolved")["status"] == "False"
    assert obj["status"]["phase"] == "Ready" and obj["status"]["model"]["sha256"] == "3" * 64
    assert not ready_forever(api, namespace, "digits", statuses, mark)
