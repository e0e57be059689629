"""A small kstatus: the documented rules by which Flux (kstatus) and `kubectl wait` judge a resource,
and a recorder that applies them to every status the operator writes in the live tests.

The rules (kubernetes-sigs/cli-utils pkg/kstatus/status/generic.go, in this order):
deletionTimestamp -> Terminating; status.observedGeneration present and behind metadata.generation
-> InProgress; Reconciling=True -> InProgress; Stalled=True -> Failed; and, as Flux reads a Ready
condition, Ready=False -> InProgress; otherwise Current.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from typing import Any

import kubernetes

CONDITION_FIELDS = ("type", "status", "reason", "message", "lastTransitionTime")
EXPECTED = {
    "TrainingJob": {"Pending": "InProgress", "Running": "InProgress", "Suspended": "InProgress",
                    "Succeeded": "Current", "Failed": "Failed"},
    "ModelDeployment": {"WaitingForModel": "InProgress", "Deploying": "InProgress", "Ready": "Current", "Failed": "Failed"},
}
"""The kstatus result each phase must give once the status has caught up with the generation."""
REQUIRED = {
    "TrainingJob": ("Created", "Running", "Succeeded", "Failed", "Ready", "Reconciling", "Stalled"),
    "ModelDeployment": ("Ready", "ModelResolved", "Available", "Reconciling", "Stalled"),
}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def compute(obj: dict[str, Any]) -> tuple[str, str]:
    """(status, message) by the kstatus rules."""
    meta, status = obj.get("metadata") or {}, obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating", "resource scheduled for deletion"
    observed, generation = status.get("observedGeneration"), meta.get("generation")
    if observed is not None and generation is not None and observed != generation:
        return "InProgress", f"observedGeneration {observed} behind generation {generation}"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return "InProgress", cond.get("reason", "")
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return "Failed", cond.get("reason", "")
    ready = condition(obj, "Ready")
    if ready is not None and ready.get("status") != "True":
        return "InProgress", ready.get("reason", "")
    return "Current", "resource is current"


def violations(obj: dict[str, Any]) -> list[str]:
    """What is wrong with one status the operator wrote (empty: it follows the conventions)."""
    kind, meta, status = obj.get("kind", ""), obj.get("metadata") or {}, obj.get("status") or {}
    if not status.get("phase"):
        return []  # not written by the operator (yet): nothing to judge
    where = f"{kind} {meta.get('namespace')}/{meta.get('name')}@{meta.get('resourceVersion')} phase={status.get('phase')}"
    out = []
    if "observedGeneration" not in status:
        out.append(f"{where}: no status.observedGeneration")
    types = [c.get("type") for c in status.get("conditions") or []]
    if len(types) != len(set(types)):
        out.append(f"{where}: duplicate condition types {types}")
    missing = [t for t in REQUIRED.get(kind, ()) if t not in types]
    if missing:
        out.append(f"{where}: conditions missing {missing}")
    for cond in status.get("conditions") or []:
        absent = [f for f in CONDITION_FIELDS if not cond.get(f) and f != "message"]
        if absent or "message" not in cond:
            out.append(f"{where}: condition {cond.get('type')} lacks {absent or ['message']}")
        if (cond.get("observedGeneration") or 0) > (meta.get("generation") or 0):
            out.append(f"{where}: condition {cond.get('type')} observedGeneration ahead of generation")
    result, why = compute(obj)
    expected = EXPECTED.get(kind, {}).get(status["phase"])
    if status.get("observedGeneration") == meta.get("generation") and expected and result != expected and result != "Terminating":
        out.append(f"{where}: kstatus says {result} ({why}), expected {expected} for this phase")
    return out


class StatusRecorder:
    """Watches TrainingJobs and ModelDeployments cluster-wide and keeps every version it sees.

    A watch delivers each write as its own event, so every status the operator writes is recorded
    (and checked by `check`, at the end of the test that made it).
    """

    PLURALS = {"trainingjobs": "TrainingJob", "modeldeployments": "ModelDeployment"}

    def __init__(self, api_client: Any) -> None:
        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.seen: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._watch, args=(p,), daemon=True, name=f"record-{p}") for p in self.PLURALS]

    def start(self) -> StatusRecorder:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self, plural: str) -> None:
        version = ""
        while not self.stopped.is_set():
            try:
                stream = kubernetes.watch.Watch().stream(self.api.list_cluster_custom_object, "kiln.dev", "v1alpha1", plural,
                                                         resource_version=version or None, timeout_seconds=30)
                for event in stream:
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    obj.setdefault("kind", self.PLURALS[plural])
                    with self.lock:
                        self.seen[obj["metadata"]["namespace"]].append(obj)
            except kubernetes.client.exceptions.ApiException as exc:
                if exc.status == 410:
                    version = ""
                time.sleep(0.2)
            except Exception:  # the API server restarts in some tests: watch again
                time.sleep(0.5)

    def objects(self, namespace: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.seen.get(namespace, []))

    def check(self, namespace: str) -> list[str]:
        """Every violation in the statuses recorded for `namespace`."""
        return [v for obj in self.objects(namespace) for v in violations(obj)]
