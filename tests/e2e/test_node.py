"""Kiln end to end on a real node: real trainer and server pods from Kiln's own images, the operator as a
pod installed by helm, real failures with their real reasons, and an uninstall that leaves nothing.

The tests run in file order and share the quickstart namespace: the rollout starts from the model the
quickstart deployed, and the uninstall test comes last.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support import compiled
from support.node import IMAGES, RELEASE_NS, ROOT, TOOLS, UID, Kube, Volumes, eventually

from kiln.local import heldout_rows, infer

DIGITS_CSV = ROOT / "examples" / "digits" / "digits.csv"
CLUSTER_QUICKSTART = ROOT / "examples" / "cluster" / "digits.yaml"
TJ, MD = "trainingjob", "modeldeployment"
pytestmark = [pytest.mark.e2e]


def quickstart_docs() -> tuple[dict[str, Any], dict[str, Any]]:
    """The cluster quickstart, exactly as shipped (a TrainingJob and its ModelDeployment)."""
    tj, md = yaml.safe_load_all(CLUSTER_QUICKSTART.read_text())
    return tj, md


def heldout(tj: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    x, y = heldout_rows(tj["spec"], DIGITS_CSV)
    return x.astype("float32"), y


def infer_body(rows: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                                   "data": rows.reshape(-1).tolist()}]}).encode()


def accuracy(url: str, model: str, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of the served model, 64 rows per V2 request (the client of `kiln run --once`)."""
    with urllib.request.urlopen(f"{url}/v2/models/{model}", timeout=10) as r:
        meta = json.loads(r.read())
    preds = [infer(url, model, x[i:i + 64], meta).argmax(axis=1) for i in range(0, len(x), 64)]
    return float((np.concatenate(preds) == y).mean())


@dataclass
class Quickstart:
    namespace: str
    models: Path
    tj: dict[str, Any]
    watched: list[str] = field(default_factory=list)
    """`kubectl get tj digits --watch` lines seen while it trained."""


def digits_claims(volumes: Volumes, namespace: str) -> tuple[Path, Path]:
    """The quickstart's two claims, with digits.csv on kiln-data."""
    data = volumes.claim(namespace, "kiln-data")
    volumes.seed(data, DIGITS_CSV, "digits.csv")
    return data, volumes.claim(namespace, "kiln-models")


def training(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "kiln.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name, "namespace": namespace},
            "spec": spec}


@pytest.fixture(scope="module")
def quickstart(kube: Kube, chart: dict[str, str], volumes: Volumes) -> Iterator[Quickstart]:
    namespace = kube.create_namespace(f"e2e-quick-{uuid.uuid4().hex[:4]}")
    _, models = digits_claims(volumes, namespace)
    tj, _ = quickstart_docs()
    # What a user watching `kubectl get tj` sees, every update of it (a list watch: it may start first).
    watch = subprocess.Popen([*kube_argv(kube), "-n", namespace, "get", "tj", "--field-selector=metadata.name=digits", "--watch", "--no-headers",
                              "-o", "custom-columns=PHASE:.status.phase,PROGRESS:.status.progress.percent"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    q = Quickstart(namespace, models, tj)

    def read() -> None:
        assert watch.stdout is not None
        for line in watch.stdout:
            q.watched.append(line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    kube.apply(CLUSTER_QUICKSTART.read_text(), namespace=namespace)
    try:
        eventually(lambda: kube.status(TJ, "digits", namespace).get("phase") in ("Succeeded", "Failed"), 600,
                   "the quickstart TrainingJob to finish")
        yield q
    finally:
        watch.terminate()
        watch.wait(10)
        kube.run("delete", "namespace", namespace, "--wait=false", check=False)


def kube_argv(kube: Kube) -> list[str]:
    return [str(TOOLS / "kubectl"), "--kubeconfig", str(kube.kubeconfig)]


def test_quickstart_trains_for_real_and_reports_progress(kube: Kube, quickstart: Quickstart) -> None:
    status = kube.status(TJ, "digits", quickstart.namespace)
    assert status["phase"] == "Succeeded", (status, kube.run("logs", "-l", "kiln.dev/trainingjob=digits", "--tail=40",
                                                             namespace=quickstart.namespace, check=False).stdout)
    eventually(lambda: any(line.startswith("Succeeded") for line in quickstart.watched), 30, "the watch to see Succeeded")
    running = [int(p) for phase, p in (line.split() for line in quickstart.watched if len(line.split()) == 2)
               if phase == "Running" and p.isdigit()]
    assert any(0 < p < 100 for p in running), quickstart.watched
    assert running == sorted(running), f"progress went backwards: {running}"
    result = status["result"]
    assert result["modelUri"].startswith("pvc://kiln-models/digits")
    assert result["metrics"]["val_accuracy"] >= 0.9
    assert result["parityMaxAbsDiff"] <= 1e-4
    # The model really is on the volume, written by the trainer's non-root user.
    model = quickstart.models / result["modelUri"].removeprefix("pvc://kiln-models/")
    assert model.is_file() and model.stat().st_uid == UID, model
    # The trainer pod ran under the restricted profile: non-root, read-only root, no capabilities.
    pod = kube.items("pods", quickstart.namespace, "kiln.dev/trainingjob=digits")[0]
    restricted(pod)


def restricted(pod: dict[str, Any]) -> None:
    """The pod as it ran: every container non-root, read-only root filesystem, all capabilities dropped."""
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), c["name"]
        assert c["image"].startswith("localhost/") and c["imagePullPolicy"] == "IfNotPresent", c["image"]
    statuses = pod["status"].get("containerStatuses") or []
    assert statuses and all(s["imageID"] for s in statuses), "the containers really ran"


CLIENT = r"""
import json, socket, sys, urllib.request
name = sys.argv[1]
rows = json.load(open("/rows/rows.json"))
ip = socket.gethostbyname(name)            # resolv.conf search path from the kubelet + the cluster DNS
url = "http://%s/v2/models/digits" % name
meta = json.load(urllib.request.urlopen(url, timeout=10))
x, y = rows["x"], rows["y"]
right = 0
for i in range(0, len(x), 64):
    batch = x[i:i + 64]
    body = {"inputs": [{"name": meta["inputs"][0]["name"], "shape": [len(batch), len(batch[0])], "datatype": "FP32",
                        "data": [v for r in batch for v in r]}]}
    req = urllib.request.Request(url + "/infer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    out = json.load(urllib.request.urlopen(req, timeout=30))["outputs"][0]
    k = out["shape"][1]
    for j, label in enumerate(y[i:i + 64]):
        scores = out["data"][j * k:(j + 1) * k]
        right += scores.index(max(scores)) == label
routes = [l.split()[1] for l in open("/proc/net/route").read().splitlines()[1:]]
print(json.dumps({"ip": ip, "accuracy": right / len(x), "default_route": "00000000" in routes}))
"""


def test_quickstart_serves_through_the_service(kube: Kube, quickstart: Quickstart) -> None:
    ns = quickstart.namespace
    md = eventually(lambda: (s := kube.status(MD, "digits", ns)).get("phase") == "Ready" and s, 300,
                    "ModelDeployment digits Ready")
    assert md["readyReplicas"] >= 1 and md["model"]["trainingJob"] == "digits"
    pods = kube.items("pods", ns, "kiln.dev/modeldeployment=digits")
    assert pods and all(c["status"] == "True" for p in pods for c in p["status"]["conditions"] if c["type"] == "Ready")
    for p in pods:
        restricted(p)
        # The image runs its request path compiled (images/server/build_compiled.py): every module of it.
        log = kube.run("logs", p["metadata"]["name"], "-c", "server", namespace=ns).stdout
        listening = [d for d in map(json.loads, filter(lambda line: line.startswith("{"), log.splitlines()))
                     if d.get("event") == "listening"]
        assert listening and listening[0]["compiled"] == sorted(compiled.build_script().MODULES), log[-2000:]
    svc = kube.get("service", "digits", ns)
    assert svc is not None
    cluster_ip, port = svc["spec"]["clusterIP"], svc["spec"]["ports"][0]["port"]
    x, y = heldout(quickstart.tj)
    # From this machine through the ClusterIP (kube-proxy's iptables rules)...
    score = eventually(lambda: accuracy(f"http://{cluster_ip}:{port}", "digits", x, y), 30, "the ClusterIP to answer")
    assert score >= 0.95, score
    # ...and from a pod, by the Service's DNS name.
    kube.run("create", "configmap", "heldout", "--from-file=rows.json=/dev/stdin", namespace=ns,
             input=json.dumps({"x": x.tolist(), "y": y.astype(int).tolist()}))
    kube.apply(client_pod("dns-client", "digits", ns), namespace=ns)
    eventually(lambda: kube.status("pod", "dns-client", ns).get("phase") in ("Succeeded", "Failed"), 120, "the client pod")
    out = kube.run("logs", "dns-client", namespace=ns).stdout
    assert kube.status("pod", "dns-client", ns)["phase"] == "Succeeded", out
    seen = json.loads(out.strip().splitlines()[-1])
    assert seen["ip"] == cluster_ip
    assert seen["accuracy"] >= 0.95, seen
    assert seen["default_route"] is False, "pods must have no default route"


def client_pod(name: str, service: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "client", "image": IMAGES["server"], "imagePullPolicy": "IfNotPresent",
                                     "command": ["python", "-c", CLIENT, service],
                                     "securityContext": {"readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}},
                                     "volumeMounts": [{"name": "rows", "mountPath": "/rows"}]}],
                     "volumes": [{"name": "rows", "configMap": {"name": "heldout"}}]}}


class Load:
    """A client that keeps sending requests through the Service, a new connection each, and counts failures."""

    def __init__(self, url: str, body: bytes) -> None:
        self.url, self.body = url, body
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + 600   # bounded even if the test never stops it
        while not self.stop.is_set() and time.monotonic() < deadline:
            req = urllib.request.Request(self.url, data=self.body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    json.loads(r.read())["outputs"]
                self.ok += 1
            except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
                self.failures.append(f"{time.strftime('%T')} {exc!r}")

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(30)


def train_variant(kube: Kube, quickstart: Quickstart, name: str, seed: int, epochs: int) -> dict[str, Any]:
    """Train another model of the quickstart (its own seed, epochs and output) and return its Succeeded status."""
    ns = quickstart.namespace
    spec = json.loads(json.dumps(quickstart.tj["spec"]))
    spec["training"].update(seed=seed, epochs=epochs)
    spec["output"]["uri"] = f"pvc://kiln-models/{name}"
    kube.apply(training(ns, name, spec))
    status = wait_finished(kube, ns, name, 600)
    assert status["phase"] == "Succeeded", status
    return status


def test_second_trainingjob_rolls_out_with_zero_failed_requests(kube: Kube, quickstart: Quickstart) -> None:
    ns = quickstart.namespace
    eventually(lambda: kube.status(MD, "digits", ns).get("phase") == "Ready", 300, "ModelDeployment digits Ready")
    v2 = train_variant(kube, quickstart, "digits-v2", seed=2, epochs=15)
    old_pods = {p["metadata"]["name"] for p in kube.items("pods", ns, "kiln.dev/modeldeployment=digits")}
    svc = kube.get("service", "digits", ns)
    assert svc is not None
    url = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}/v2/models/digits/infer"
    x, _ = heldout(quickstart.tj)
    with Load(url, infer_body(x[:8])) as load:
        eventually(lambda: load.ok >= 5, 30, "the client to be sending")
        kube.run("patch", MD, "digits", "--type=merge", "-p", json.dumps({"spec": {"model": {"trainingJob": "digits-v2"}}}),
                 namespace=ns)

        def rolled() -> bool:
            s = kube.status(MD, "digits", ns)
            pods = kube.items("pods", ns, "kiln.dev/modeldeployment=digits")
            return (s.get("phase") == "Ready" and s.get("model", {}).get("trainingJob") == "digits-v2"
                    and bool(pods) and not {p["metadata"]["name"] for p in pods} & old_pods)

        eventually(rolled, 300, "the rollout to digits-v2 (old pods gone)")
        before = load.ok
        eventually(lambda: load.ok >= before + 20, 30, "requests answered by the new model")
    assert load.failures == [], f"{len(load.failures)} failed of {load.ok + len(load.failures)}: {load.failures[:5]}"
    assert load.ok >= 50
    assert kube.status(MD, "digits", ns)["model"]["sha256"] == v2["result"]["onnxSha256"]


def _infer_counts(pod_ip: str) -> dict[str, float]:
    """A server pod's 200 answers to inference, by the `revision` label of its metrics (scraped by pod IP)."""
    with urllib.request.urlopen(f"http://{pod_ip}:8080/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kiln_requests_total{") and 'code="200"' in line and '/infer"' in line:
            rev = line.split('revision="', 1)[1].split('"', 1)[0]
            out[rev] = out.get(rev, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def test_canary_serves_two_models_behind_one_service_and_promotes_without_failures(kube: Kube, quickstart: Quickstart) -> None:
    ns = quickstart.namespace
    eventually(lambda: kube.status(MD, "digits", ns).get("phase") == "Ready", 300, "ModelDeployment digits Ready")
    canary_tj = train_variant(kube, quickstart, "digits-canary", seed=3, epochs=10)
    stable_sha = kube.status(MD, "digits", ns)["model"]["sha256"]
    canary_sha = canary_tj["result"]["onnxSha256"]
    assert stable_sha != canary_sha
    kube.run("patch", MD, "digits", "--type=merge", "-p", json.dumps(
        {"spec": {"replicas": 2, "canary": {"model": {"trainingJob": "digits-canary"}, "trafficPercent": 50}}}), namespace=ns)

    def canary_ready() -> dict[str, Any] | None:
        s = kube.status(MD, "digits", ns)
        cond = next((c for c in s.get("conditions") or [] if c["type"] == "CanaryReady"), {})
        return s if cond.get("status") == "True" and s.get("phase") == "Ready" and s.get("readyReplicas") == 1 else None

    st = eventually(canary_ready, 300, "the canary ready next to the stable model")
    assert st["canary"]["model"]["sha256"] == canary_sha and st["canary"]["trafficPercent"] == 50 and st["model"]["sha256"] == stable_sha
    pods = {p["metadata"]["labels"]["kiln.dev/track"]: p for p in kube.items("pods", ns, "kiln.dev/modeldeployment=digits")
            if not p["metadata"].get("deletionTimestamp") and p["status"].get("podIP")}
    assert set(pods) == {"stable", "canary"}
    before = {t: sum(_infer_counts(p["status"]["podIP"]).values()) for t, p in pods.items()}
    svc = kube.get("service", "digits", ns)
    assert svc is not None
    url = f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}/v2/models/digits/infer"
    x, _ = heldout(quickstart.tj)
    for i in range(60):  # a new connection each: kube-proxy picks a pod per connection
        req = urllib.request.Request(url, data=infer_body(x[i:i + 1]), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200
    counts = {t: _infer_counts(p["status"]["podIP"]) for t, p in pods.items()}
    # Each track's metrics carry its own model's revision, and requests through the one Service reached both.
    assert set(counts["stable"]) == {stable_sha[:12]} and set(counts["canary"]) == {canary_sha[:12]}, counts
    reached = {t: sum(c.values()) - before[t] for t, c in counts.items()}
    assert sum(reached.values()) == 60 and reached["stable"] >= 5 and reached["canary"] >= 5, reached

    # Promotion under load: the canary pod keeps serving (never restarted) until the stable Deployment has its model.
    canary_pod = pods["canary"]["metadata"]["uid"]
    replaced: list[str] = []
    with Load(url, infer_body(x[:8])) as load:
        eventually(lambda: load.ok >= 5, 30, "the client to be sending")
        kube.run("patch", MD, "digits", "--type=merge", "-p", json.dumps(
            {"spec": {"model": {"trainingJob": "digits-canary"}, "canary": None}}), namespace=ns)

        def promoted() -> bool:
            s = kube.status(MD, "digits", ns)
            for p in kube.items("pods", ns, "kiln.dev/modeldeployment=digits,kiln.dev/track=canary"):
                if p["metadata"]["uid"] != canary_pod or any(c.get("restartCount") for c in p["status"].get("containerStatuses") or []):
                    replaced.append(p["metadata"]["name"])
            return (s.get("phase") == "Ready" and s.get("model", {}).get("sha256") == canary_sha and "canary" not in s
                    and kube.get("deployment", "digits-canary", ns) is None)

        eventually(promoted, 300, "the promotion to finish (canary Deployment gone)")
        done = load.ok
        eventually(lambda: load.ok >= done + 20, 30, "requests answered after the promotion")
    assert load.failures == [], f"{len(load.failures)} failed of {load.ok + len(load.failures)}: {load.failures[:5]}"
    assert replaced == [], f"canary pods replaced or restarted during the promotion: {replaced}"


def wait_finished(kube: Kube, ns: str, name: str, timeout: float = 300) -> dict[str, Any]:
    return eventually(lambda: (s := kube.status(TJ, name, ns)).get("phase") in ("Succeeded", "Failed") and s, timeout,
                      f"TrainingJob {name} to finish")


def test_image_that_does_not_exist_fails_with_imagepullbackoff(kube: Kube, namespace: str) -> None:
    kube.apply(training(namespace, "nopull", {
        "image": "localhost/kiln/does-not-exist:v1", "command": ["true"], "runPolicy": {"startTimeoutSeconds": 20}}))
    eventually(lambda: kube.status(TJ, "nopull", namespace).get("reason") == "ImagePullBackOff", 120,
               "reason ImagePullBackOff while pending")
    status = wait_finished(kube, namespace, "nopull", 120)
    assert status["phase"] == "Failed" and status["reason"] == "ImagePullBackOff", status
    assert "localhost/kiln/does-not-exist:v1" in status["message"]


def test_memory_limit_the_trainer_exceeds_is_oomkilled(kube: Kube, namespace: str, volumes: Volumes) -> None:
    digits_claims(volumes, namespace)
    tj, _ = quickstart_docs()
    spec = {**tj["spec"], "resources": {"memory": "80Mi"}, "runPolicy": {"backoffLimit": 0}}
    kube.apply(training(namespace, "oom", spec))
    status = wait_finished(kube, namespace, "oom")
    assert status["phase"] == "Failed" and status["reason"] == "OOMKilled", status
    pod = kube.items("pods", namespace, "kiln.dev/trainingjob=oom")[0]
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled" and term["exitCode"] == 137, term


def test_dataset_that_does_not_exist_fails_with_the_trainers_message(kube: Kube, namespace: str, volumes: Volumes) -> None:
    digits_claims(volumes, namespace)
    tj, _ = quickstart_docs()
    spec = {**tj["spec"], "dataset": {**tj["spec"]["dataset"], "uri": "pvc://kiln-data/no-such-file.csv"},
            "runPolicy": {"backoffLimit": 0}}
    kube.apply(training(namespace, "nodata", spec))
    status = wait_finished(kube, namespace, "nodata")
    assert status["phase"] == "Failed", status
    assert "no-such-file.csv" in status["message"], status


def operator_pods(kube: Kube) -> list[dict[str, Any]]:
    return [p for p in kube.items("pods", RELEASE_NS, "app.kubernetes.io/name=kiln") if not p["metadata"].get("deletionTimestamp")]


def test_operator_pod_deleted_mid_training_converges(kube: Kube, namespace: str, volumes: Volumes) -> None:
    digits_claims(volumes, namespace)
    tj, _ = quickstart_docs()
    training_spec = {k: v for k, v in tj["spec"]["training"].items() if k != "earlyStopping"}
    spec = {**tj["spec"], "training": {**training_spec, "epochs": 120}}
    kube.apply(training(namespace, "survivor", spec))
    eventually(lambda: (kube.status(TJ, "survivor", namespace).get("progress") or {}).get("percent", 0) > 0, 300,
               "training under way")
    jobs = kube.items("jobs", namespace, "kiln.dev/trainingjob=survivor")
    assert len(jobs) == 1
    (old,) = operator_pods(kube)
    kube.run("delete", "pod", old["metadata"]["name"], "--wait=false", namespace=RELEASE_NS)
    new = eventually(lambda: [p for p in operator_pods(kube) if p["metadata"]["name"] != old["metadata"]["name"]
                              and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))],
                     180, "a replacement operator pod Ready")
    assert len(new) == 1
    restricted(new[0])  # the chart's operator pod runs under the same profile as the pods it renders
    status = wait_finished(kube, namespace, "survivor", 600)
    assert status["phase"] == "Succeeded", status
    after = kube.items("jobs", namespace, "kiln.dev/trainingjob=survivor")
    assert [j["metadata"]["uid"] for j in after] == [jobs[0]["metadata"]["uid"]], "no second Job"
    assert status["progress"]["percent"] == 100


WRITE_RESULT = ["sh", "-c", 'echo \'{"metrics": {"accuracy": 1.0}}\' > "$KILN_OUTPUT_DIR/result.json"']
"""The smallest bring-your-own trainer that honours the contract (kiln_trainer.byo: a result.json in $KILN_OUTPUT_DIR)."""


def test_standby_pod_takes_over_after_the_active_pod_is_killed(kube: Kube, chart: dict[str, str], namespace: str) -> None:
    """The chart's standby (peering.enabled + standby.enabled) on the real node: the active operator pod is
    killed (grace period 0) while TrainingJobs are being created; the standby pod takes over within the
    peering lifetime, every TrainingJob gets exactly one Job and succeeds. The chart goes back to one replica."""
    lifetime = 15
    release, release_ns = chart["release"], chart["namespace"]
    kube.helm("upgrade", release, str(ROOT / "charts" / "kiln"), "-n", release_ns, "--reuse-values", "--wait", "--timeout", "3m",
              "--set", "peering.enabled=true", "--set", "standby.enabled=true", "--set", f"peering.lifetime={lifetime}")

    def role_pods(role: str) -> list[dict[str, Any]]:
        return [p for p in operator_pods(kube) if p["metadata"]["labels"].get("kiln.dev/operator-role") == role
                and any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]

    (active,) = eventually(lambda: role_pods("active"), 180, "the active operator pod Ready")
    (standby,) = eventually(lambda: role_pods("standby"), 180, "the standby operator pod Ready")
    def peering() -> list[str]:
        """The standby's Kopf peering decisions, oldest first."""
        out = kube.run("logs", standby["metadata"]["name"], namespace=release_ns).stdout
        return [line for line in out.splitlines() if "peering: " in line and ("Pausing" in line or "Resuming" in line)]

    # Both pods start together after the upgrade: a standby up before the active pod's first keep-alive
    # resumes, then pauses in favour of it. What counts is that it ends up paused while the active lives.
    paused = eventually(lambda: (lines := peering()) and "Pausing" in lines[-1] and lines, lifetime + 60,
                        "the standby paused in favour of the active pod")
    resumed_before = sum("Resuming" in line for line in paused)
    names = [f"ha-{i:02d}" for i in range(12)]
    try:
        killed = 0.0
        for i, name in enumerate(names):
            kube.apply(training(namespace, name, {"command": WRITE_RESULT}))
            if i == 4:
                kube.run("delete", "pod", active["metadata"]["name"], "--grace-period=0", "--force", "--wait=false",
                         namespace=release_ns, check=False)
                killed = time.monotonic()
            time.sleep(0.5)
        eventually(lambda: sum("Resuming" in line for line in peering()) > resumed_before, lifetime + 60, "the standby pod to resume")
        print(f"\nstandby pod took over {time.monotonic() - killed:.1f} s after the active pod was killed (lifetime {lifetime} s)")
        for name in names:
            status = wait_finished(kube, namespace, name, 300)
            assert status["phase"] == "Succeeded", (name, status)
            assert len(kube.items("jobs", namespace, f"kiln.dev/trainingjob={name}")) == 1, name
    finally:
        kube.helm("upgrade", release, str(ROOT / "charts" / "kiln"), "-n", release_ns, "--reuse-values", "--wait", "--timeout", "3m",
                  "--set", "peering.enabled=false", "--set", "standby.enabled=false")


@pytest.mark.last
def test_uninstall_leaves_nothing_behind(kube: Kube, chart: dict[str, str]) -> None:
    """Last: helm uninstall and CRD deletion take every Kiln object with them, in every namespace."""
    kube.helm("uninstall", chart["release"], "-n", chart["namespace"], "--wait", "--timeout", "2m")
    kube.run("delete", "crd", "trainingjobs.kiln.dev", "modeldeployments.kiln.dev", "--wait=true", timeout=180)

    def leftovers() -> list[str]:
        found = []
        for kind in ("pods", "jobs", "deployments", "replicasets", "services", "serviceaccounts", "roles", "rolebindings",
                     "configmaps", "secrets", "horizontalpodautoscalers"):
            for item in kube.items(kind):
                meta = item["metadata"]
                labels = meta.get("labels") or {}
                if (labels.get("app.kubernetes.io/part-of") == "kiln" or labels.get("app.kubernetes.io/managed-by") == "kiln-operator"
                        or any(k.startswith("kiln.dev/") for k in labels) or (meta["namespace"] == RELEASE_NS and kind == "pods")):
                    found.append(f"{kind} {meta['namespace']}/{meta['name']}")
        for kind in ("clusterroles", "clusterrolebindings"):
            found += [f"{kind} {i['metadata']['name']}" for i in kube.items(kind) if "kiln" in i["metadata"]["name"]]
        found += [f"crd {i['metadata']['name']}" for i in kube.items("crd") if i["metadata"]["name"].endswith("kiln.dev")]
        return found

    eventually(lambda: not leftovers(), 180, "every Kiln object to be gone")
    assert leftovers() == []
    # The tests' namespaces go too, claims included (nothing holds a finalizer on a node that works).
    ours = [n["metadata"]["name"] for n in kube.items("namespaces") if n["metadata"]["name"].startswith("e2e-")]
    if ours:
        kube.run("delete", "namespace", *ours, "--wait=false")
    eventually(lambda: not [n for n in kube.items("namespaces") if n["metadata"]["name"].startswith("e2e-")], 180,
               "the tests' namespaces to be deleted")
