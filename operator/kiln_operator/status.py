"""Pure derivation of a TrainingJob's status from its Job and Pods.

Why pure: the rules that turn Kubernetes states into `phase`/`reason`/`message` are the product (users
of other operators suffer jobs stuck "Running" while their pod cannot pull its image). Keeping them
free of I/O lets unit tests cover every branch, and the handlers only fetch and patch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

START_FAILURES = {
    "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
    "CreateContainerConfigError", "CreateContainerError", "RegistryUnavailable",
}
RESULT_KEYS = ("metrics", "modelUri", "onnxSha256", "parityMaxAbsDiff", "inputs", "outputs", "formats")
TERMINAL = ("Succeeded", "Failed")
HELD_BACK_MESSAGE = ("suspended: the Job is created when spec.runPolicy.suspend is set to false "
                     "(this API server has no Job suspend, so Kiln holds the Job back)")
WARNING_REASONS = START_FAILURES | {"CrashLoopBackOff", "WaitingForGPU", "Unschedulable", "Restarting"}


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def fmt_time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass
class Derived:
    """What the operator should write and do for one TrainingJob."""

    status: dict[str, Any] = field(default_factory=dict)
    """Status fields to merge-patch (only those the operator owns; `progress` stays the trainer's)."""
    delete_job: bool = False
    """The Job must go (pod could not start within startTimeoutSeconds)."""
    event: tuple[str, str, str] | None = None
    """(type, reason, message) of the transition, when phase or reason changed."""


def set_condition(conditions: list[dict[str, Any]], type_: str, status: str, reason: str, message: str,
                  now: datetime, generation: int | None = None) -> list[dict[str, Any]]:
    """Conditions with one set; lastTransitionTime moves only when the status flips."""
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    cond: dict[str, Any] = {"type": type_, "status": status, "reason": reason, "message": message[:1024]}
    unchanged = old is not None and old.get("status") == status and old.get("lastTransitionTime")
    cond["lastTransitionTime"] = old["lastTransitionTime"] if unchanged and old else fmt_time(now)
    if generation is not None:
        cond["observedGeneration"] = generation
    out.append(cond)
    order = {"Created": 0, "Running": 1, "Restarting": 2, "Succeeded": 3, "Failed": 4}
    return sorted(out, key=lambda c: (order.get(c["type"], 9), c["type"]))


def _statuses(pod: dict[str, Any]) -> list[dict[str, Any]]:
    st = pod.get("status") or {}
    return list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or [])


def termination_summary(message: str | None) -> dict[str, Any] | None:
    """The trainer's JSON termination message, or None when it is not JSON."""
    if not message:
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def pod_failure(pod: dict[str, Any], spec: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a failed pod: eviction, OOM kill, or a non-zero exit with its message."""
    st = pod.get("status") or {}
    if st.get("reason") == "Evicted":
        return "Evicted", f"pod {pod['metadata']['name']} was evicted: {st.get('message', '')}".strip()
    if st.get("reason") == "DeadlineExceeded":
        return "DeadlineExceeded", st.get("message") or "pod exceeded its deadline"
    for cs in _statuses(pod):
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term or int(term.get("exitCode", 0)) == 0:
            continue
        if term.get("reason") == "OOMKilled":
            limit = (spec.get("resources") or {}).get("memory")
            where = f" (memory limit {limit})" if limit else ""
            return "OOMKilled", f"container {cs.get('name')} was killed for running out of memory{where}; raise spec.resources.memory"
        summary = termination_summary(term.get("message"))
        if summary and summary.get("error"):
            detail = str(summary["error"])
        else:
            lines = str(term.get("message") or term.get("reason") or "").strip().splitlines()
            detail = lines[-1] if lines else ""
        return "Error", f"container {cs.get('name')} exited with code {term.get('exitCode')}: {detail}".rstrip(": ")
    if st.get("phase") == "Failed":
        return "Error", st.get("message") or f"pod {pod['metadata']['name']} failed"
    return None


def _result_from(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    for pod in sorted(pods, key=_pod_index):
        if (pod.get("status") or {}).get("phase") != "Succeeded":
            continue
        for cs in _statuses(pod):
            term = (cs.get("state") or {}).get("terminated") or {}
            summary = termination_summary(term.get("message"))
            if summary and "error" not in summary:
                return {k: summary[k] for k in RESULT_KEYS if k in summary}
    return None


def _pod_index(pod: dict[str, Any]) -> tuple[int, str]:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        idx = int(ann.get("batch.kubernetes.io/job-completion-index", 0))
    except ValueError:
        idx = 0
    return idx, (pod.get("metadata") or {}).get("creationTimestamp") or ""


LAG_SECONDS = 10


def _lagging(condition: dict[str, Any], now: datetime) -> bool:
    """True shortly after a Job condition appeared, while pod events may still be in flight."""
    since = parse_time(condition.get("lastTransitionTime") or condition.get("lastProbeTime"))
    return since is not None and (now - since).total_seconds() < LAG_SECONDS


def pod_phase(pod: dict[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_finished(job: dict[str, Any]) -> bool:
    """Whether the Job has completed or failed for good."""
    return _job_condition(job, "Complete") is not None or _job_condition(job, "Failed") is not None


def derive(tj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime | None = None,
           *, held_back: bool = False) -> Derived:
    """The status a TrainingJob should have, given its Job and that Job's Pods.

    `held_back` means the operator deliberately has not created the Job (suspended on an API server
    without Job suspend).
    """
    now = now or now_utc()
    spec = tj.get("spec") or {}
    old = tj.get("status") or {}
    run_policy = spec.get("runPolicy") or {}
    generation = (tj.get("metadata") or {}).get("generation")
    conditions = list(old.get("conditions") or [])
    phase, reason, message = old.get("phase") or "Pending", old.get("reason") or "", old.get("message") or ""
    new: dict[str, Any] = {}
    delete_job = False

    if phase in TERMINAL:
        return Derived()

    if job is None:
        if held_back:
            phase, reason, message = "Suspended", "Suspended", HELD_BACK_MESSAGE
        elif old.get("jobName"):
            phase, reason, message = "Failed", "JobDeleted", f"Job {old['jobName']} was deleted before the training finished"
            new["completionTime"] = fmt_time(now)
        else:
            return Derived()
    elif (complete := _job_condition(job, "Complete")) is not None:
        result = _result_from(pods)
        if result is None and _lagging(complete, now) and not any(pod_phase(p) == "Succeeded" for p in pods):
            return Derived()  # the pod watch has not caught up with the Job yet: its summary is coming
        phase, reason = "Succeeded", "Succeeded"
        message = "training finished" if result else "training finished but the trainer reported no result summary"
        if result is not None:
            new["result"] = result
        new["completionTime"] = (job.get("status") or {}).get("completionTime") or fmt_time(now)
    elif (failed := _job_condition(job, "Failed")) is not None:
        phase = "Failed"
        new["completionTime"] = fmt_time(now)
        failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        failed_pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        cause = next((c for c in (pod_failure(p, spec) for p in reversed(failed_pods)) if c), None)
        if cause is None and failed.get("reason") != "DeadlineExceeded" and _lagging(failed, now):
            return Derived()  # the failed pod has not reached us yet; its reason is worth waiting for
        if failed.get("reason") == "DeadlineExceeded":
            reason = "DeadlineExceeded"
            message = f"the job ran longer than spec.runPolicy.activeDeadlineSeconds={run_policy.get('activeDeadlineSeconds')}"
        elif int(run_policy.get("backoffLimit", 0)) > 0 or cause is None:
            reason = "BackoffLimitExceeded"
            attempts = int((job.get("status") or {}).get("failed") or len(failed_pods) or 1)
            message = f"failed {attempts} time(s), spec.runPolicy.backoffLimit={run_policy.get('backoffLimit', 0)}"
            if cause:
                message += f"; last failure: {cause[0]}: {cause[1]}"
            elif failed.get("message"):
                message += f": {failed['message']}"
        else:
            reason, message = cause
    elif (job.get("spec") or {}).get("suspend") or _job_condition(job, "Suspended"):
        phase, reason, message = "Suspended", "Suspended", "the Job is suspended (spec.runPolicy.suspend or a queue)"
    else:
        phase, reason, message, start, delete_job = _active(spec, job, pods, now, old)
        if start and not old.get("startTime"):
            new["startTime"] = start
        if delete_job:
            new["completionTime"] = fmt_time(now)

    new["phase"] = phase
    new["reason"] = reason
    new["message"] = message[:2048]
    if job is not None:
        new["jobName"] = job["metadata"]["name"]
    conditions = _conditions(conditions, phase, reason, message, now, generation)
    new["conditions"] = conditions

    changed = {k: v for k, v in new.items() if old.get(k) != v}
    event = None
    if (phase, reason) != (old.get("phase"), old.get("reason")):
        kind = "Warning" if phase == "Failed" or reason in WARNING_REASONS else "Normal"
        event = (kind, reason or phase, f"{phase}: {message}" if message else phase)
    return Derived(status=changed, delete_job=delete_job, event=event)


def _conditions(conditions: list[dict[str, Any]], phase: str, reason: str, message: str, now: datetime,
                generation: int | None) -> list[dict[str, Any]]:
    if phase == "Running":
        conditions = set_condition(conditions, "Running", "True", reason or "Running", message, now, generation)
        if reason == "Restarting":
            conditions = set_condition(conditions, "Restarting", "True", reason, message, now, generation)
    elif phase == "Succeeded":
        conditions = set_condition(conditions, "Running", "False", "Finished", "the job finished", now, generation)
        conditions = set_condition(conditions, "Succeeded", "True", reason, message, now, generation)
    elif phase == "Failed":
        if any(c.get("type") == "Running" for c in conditions):
            conditions = set_condition(conditions, "Running", "False", "Finished", "the job finished", now, generation)
        conditions = set_condition(conditions, "Failed", "True", reason, message, now, generation)
    elif phase in ("Pending", "Suspended") and any(c.get("type") == "Running" and c.get("status") == "True" for c in conditions):
        conditions = set_condition(conditions, "Running", "False", reason or phase, message, now, generation)
    return [c for c in conditions if not (c["type"] == "Restarting" and phase != "Running")]


def _active(spec: dict[str, Any], job: dict[str, Any], pods: list[dict[str, Any]], now: datetime,
            old: dict[str, Any]) -> tuple[str, str, str, str | None, bool]:
    """(phase, reason, message, startTime, delete_job) of a Job that has neither completed nor failed."""
    run_policy = spec.get("runPolicy") or {}
    gpus = int((spec.get("resources") or {}).get("gpus") or 0)
    start_timeout = int(run_policy.get("startTimeoutSeconds") or 600)
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    live.sort(key=_pod_index)
    job_status = job.get("status") or {}
    failed_before = int(job_status.get("failed") or 0)

    for pod in live:
        pname = pod["metadata"]["name"]
        created = parse_time(pod["metadata"].get("creationTimestamp")) or now
        for cs in _statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            why = waiting.get("reason")
            if why in START_FAILURES:
                detail = f"pod {pname}: {why}: {waiting.get('message') or cs.get('image') or ''}".rstrip(": ")
                waited = (now - created).total_seconds()
                if waited >= start_timeout:
                    message = (f"{detail}; the pod could not start within spec.runPolicy.startTimeoutSeconds={start_timeout}, "
                               "the Job was deleted")
                    return "Failed", why, message, None, True
                return "Pending", why, f"{detail} (fails after {start_timeout}s)", None, False
            if why == "CrashLoopBackOff":
                term = (cs.get("lastState") or {}).get("terminated") or {}
                summary = termination_summary(term.get("message"))
                detail = (summary or {}).get("error") or term.get("message") or term.get("reason") or ""
                msg = (f"pod {pname}: container {cs.get('name')} keeps crashing (restarts {cs.get('restartCount', 0)}, "
                       f"last exit code {term.get('exitCode', '?')}): {detail}").rstrip(": ")
                return "Running", "CrashLoopBackOff", msg, None, False
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                text = cond.get("message") or ""
                if gpus > 0 or "nvidia.com/gpu" in text:
                    return "Pending", "WaitingForGPU", f"no node has {gpus} free nvidia.com/gpu: {text}".rstrip(": "), None, False
                return "Pending", "Unschedulable", f"pod {pname}: {text}", None, False

    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        starts = [t for p in running if (t := (p.get("status") or {}).get("startTime"))]
        start = min(starts) if starts else fmt_time(now)
        workers = int(spec.get("workers") or 1)
        if failed_before:
            failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
            failed_pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
            cause = next((c for c in (pod_failure(p, spec) for p in reversed(failed_pods)) if c), None)
            msg = f"attempt {failed_before + 1} of {int(run_policy.get('backoffLimit', 0)) + 1}"
            if cause:
                msg += f" after {cause[0]}: {cause[1]}"
            return "Running", "Restarting", msg, start, False
        return "Running", "Running", f"{len(running)}/{workers} worker(s) running", start, False
    if live:
        return "Pending", "PodPending", f"{len(live)} pod(s) created, waiting to start", None, False
    return "Pending", "JobCreated", f"Job {job['metadata']['name']} created, waiting for pods", None, False
