"""What a pod's status says is wrong with it: one set of start-failure reasons and one reader of
container and scheduling states, for both resources (each words the message for its own users)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

START_FAILURES = frozenset({
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RegistryUnavailable",
})
"""Waiting reasons of a container that cannot start: they never cure themselves quickly."""


@dataclass(frozen=True)
class PodProblem:
    """One thing wrong with a pod, in the order the pod reports them."""

    reason: str
    """A START_FAILURES reason, `CrashLoopBackOff`, `Exited` (a non-zero exit not yet in back-off) or `Unschedulable`."""
    pod: str
    container: str = ""
    detail: str = ""
    """The waiting message (or image), the termination detail, or the scheduler's message."""
    exit_code: Any = "?"
    restarts: int = 0
    term: dict[str, Any] = field(default_factory=dict)
    """The container's (last) termination state, for callers that word it their own way."""


def statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    """Init containers first, then the app containers."""
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def pod_phase(pod: dict[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def termination_summary(message: str | None) -> dict[str, Any] | None:
    """A Kiln container's JSON termination message, or None when it is not JSON."""
    if not message:
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def termination_detail(term: dict[str, Any]) -> str:
    """The most useful line of a termination: Kiln's JSON `error`, else the message, else the reason."""
    return str((termination_summary(term.get("message")) or {}).get("error") or term.get("message") or term.get("reason") or "")


def problems(pod: dict[str, Any]) -> Iterator[PodProblem]:
    """Every problem the pod's status shows: per container in order, then scheduling."""
    st = pod.get("status") or {}
    name = pod["metadata"]["name"]
    for cs in statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
        common = {"pod": name, "container": cs.get("name", ""), "restarts": int(cs.get("restartCount") or 0), "term": term,
                  "exit_code": term.get("exitCode", "?")}
        if waiting.get("reason") in START_FAILURES:
            yield PodProblem(waiting["reason"], detail=waiting.get("message") or cs.get("image") or "", **common)
        elif waiting.get("reason") == "CrashLoopBackOff":
            yield PodProblem("CrashLoopBackOff", detail=termination_detail(term), **common)
        elif term and int(term.get("exitCode", 0)) != 0:
            yield PodProblem("Exited", detail=termination_detail(term), **common)
    for cond in st.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            yield PodProblem("Unschedulable", name, detail=cond.get("message") or "")


def waits_for_gpu(problem: PodProblem, gpus: int) -> bool:
    """An unschedulable pod that asked for GPUs (or that the scheduler says lacks them)."""
    return problem.reason == "Unschedulable" and (gpus > 0 or "nvidia.com/gpu" in problem.detail)
