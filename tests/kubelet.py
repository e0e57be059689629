"""The test's kubelet: no kubelet runs on the test control plane, so tests set Pod status themselves.

Everything else (the Job controller counting failures, deadlines, garbage collection) is the real
kube-controller-manager reacting to these patches.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from kiln import kube

T = TypeVar("T")


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def eventually(fn: Callable[[], T | None], timeout: float = 30, interval: float = 0.2, what: str = "condition",
               retry: tuple[type[Exception], ...] = (AssertionError,)) -> T:
    """Poll `fn` until it returns something truthy (bounded); the last value is in the error.

    Exceptions in `retry` count as "not yet" (their text becomes the last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except retry as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def pods(namespace: str, selector: str) -> list[dict[str, Any]]:
    items = kube.blocking().list_objects("v1", "Pod", namespace, selector)
    return sorted(items, key=lambda p: p["metadata"]["creationTimestamp"] + p["metadata"]["name"])


def wait_pods(namespace: str, selector: str, count: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
    return eventually(lambda: (lambda ps: ps if len(ps) >= count else None)(pods(namespace, selector)),
                      timeout, what=f"{count} pod(s) {selector}")


def _container(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def _status(pod: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    return kube.blocking().call("PATCH", kube.path("v1", "Pod", pod["metadata"]["namespace"], pod["metadata"]["name"], "status"),
                     {"status": body}, content_type="application/merge-patch+json")


def _cs(pod: dict[str, Any], state: dict[str, Any], *, ready: bool = False, restarts: int = 0,
        last: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    c = _container(pod)
    cs = {"name": c["name"], "image": c["image"], "imageID": "", "ready": ready, "restartCount": restarts, "state": state}
    if last:
        cs["lastState"] = last
    return [cs]


def run(pod: dict[str, Any]) -> dict[str, Any]:
    """Scheduled, image pulled, container running."""
    t = now()
    return _status(pod, {
        "phase": "Running", "startTime": t, "hostIP": "10.0.0.1", "podIP": "10.1.0.5",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                       {"type": "Ready", "status": "True", "lastTransitionTime": t}],
        "containerStatuses": _cs(pod, {"running": {"startedAt": t}}, ready=True),
    })


def terminate(pod: dict[str, Any], exit_code: int, reason: str, message: str = "") -> dict[str, Any]:
    t = now()
    phase = "Succeeded" if exit_code == 0 else "Failed"
    return _status(pod, {
        "phase": phase, "startTime": t,
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                       {"type": "Ready", "status": "False", "lastTransitionTime": t}],
        "containerStatuses": _cs(pod, {"terminated": {"exitCode": exit_code, "reason": reason, "message": message,
                                                      "startedAt": t, "finishedAt": t}}),
    })


def succeed(pod: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Exit 0 with the trainer's JSON summary as termination message."""
    return terminate(pod, 0, "Completed", json.dumps(summary))


def fail(pod: dict[str, Any], exit_code: int = 1, message: str = "") -> dict[str, Any]:
    return terminate(pod, exit_code, "Error", message)


def oom(pod: dict[str, Any]) -> dict[str, Any]:
    return terminate(pod, 137, "OOMKilled")


def waiting(pod: dict[str, Any], reason: str, message: str) -> dict[str, Any]:
    """Scheduled but the container cannot start (ImagePullBackOff, ...)."""
    t = now()
    return _status(pod, {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t}],
        "containerStatuses": _cs(pod, {"waiting": {"reason": reason, "message": message}}),
    })


def crash_loop(pod: dict[str, Any], exit_code: int, message: str, restarts: int = 3) -> dict[str, Any]:
    t = now()
    return _status(pod, {
        "phase": "Running", "startTime": t,
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t}],
        "containerStatuses": _cs(pod, {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                                 restarts=restarts,
                                 last={"terminated": {"exitCode": exit_code, "reason": "Error", "message": message,
                                                      "startedAt": t, "finishedAt": t}}),
    })


def unschedulable(pod: dict[str, Any], message: str) -> dict[str, Any]:
    """What the scheduler writes when no node fits."""
    return _status(pod, {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                        "lastTransitionTime": now()}],
    })


def evict(pod: dict[str, Any]) -> dict[str, Any]:
    return _status(pod, {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."})


def heartbeat(pod: dict[str, Any]) -> dict[str, Any]:
    """A periodic status report of a running pod (a fresh probe time), as a kubelet sends while it runs.

    The 1.20 Job controller checks activeDeadlineSeconds when it syncs the Job, which a pod update
    triggers; without a kubelet nothing else would.
    """
    t = now()
    return _status(pod, {"conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                                        {"type": "Ready", "status": "True", "lastProbeTime": t, "lastTransitionTime": t}]})
