"""Pure derivation of a TrainingJob's status from its Job and Pods.

Why pure: the rules that turn Kubernetes states into `phase`/`reason`/`message` are the product (users
of other operators suffer jobs stuck "Running" while their pod cannot pull its image). Keeping them
free of I/O lets unit tests cover every branch, and the controller only feeds and patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml

from kiln.spec import TrainingJobSpec
from kiln_operator.conditions import fmt_time, now_utc, parse_time, set_all
from kiln_operator.podstatus import START_FAILURES, pod_phase, problems, statuses, termination_summary, waits_for_gpu

RESULT_KEYS = ("metrics", "modelUri", "onnxSha256", "parityMaxAbsDiff", "inputs", "outputs", "formats", "topFeatures")
TERMINAL = ("Succeeded", "Failed")
HELD_BACK_MESSAGE = ("suspended: the Job is created when spec.runPolicy.suspend is set to false "
                     "(this API server has no Job suspend, so Kiln holds the Job back)")
WARNING_REASONS = START_FAILURES | {"CrashLoopBackOff", "WaitingForGPU", "Unschedulable", "Restarting"}
LAG_SECONDS = 10
"""How long after a Job condition appears its pods' events may still be on the way."""

Outcome = tuple[str, str, str]
"""(phase, reason, message)."""


@dataclass
class Derived:
    """What the operator should write and do for one TrainingJob."""

    status: dict[str, Any] = field(default_factory=dict)
    """Status fields to merge-patch (only those the operator owns; `progress` stays the trainer's)."""
    delete_job: bool = False
    """The Job must go (pod could not start within startTimeoutSeconds)."""
    event: tuple[str, str, str] | None = None
    """(type, reason, message) of the transition, when phase or reason changed."""


def recorded_spec(job: dict[str, Any]) -> dict[str, Any] | None:
    """The spec stored on the (slim) Job at creation (None for Jobs made without one)."""
    document = job.get("specDocument")
    if not document:
        return None
    try:
        loaded = yaml.safe_load(document)
    except yaml.YAMLError:
        return None
    return loaded.get("spec") if isinstance(loaded, dict) else None


def pod_failure(pod: dict[str, Any], spec: TrainingJobSpec) -> tuple[str, str] | None:
    """(reason, message) of a failed pod: eviction, OOM kill, or a non-zero exit with its message."""
    st = pod.get("status") or {}
    if st.get("reason") == "Evicted":
        return "Evicted", f"pod {pod['metadata']['name']} was evicted: {st.get('message', '')}".strip()
    if st.get("reason") == "DeadlineExceeded":
        return "DeadlineExceeded", st.get("message") or "pod exceeded its deadline"
    for cs in statuses(pod):
        term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")
        if not term or int(term.get("exitCode", 0)) == 0:
            continue
        if term.get("reason") == "OOMKilled":
            limit = spec.resources.memory
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
        for cs in statuses(pod):
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


def _lagging(condition: dict[str, Any], now: datetime) -> bool:
    """True shortly after a Job condition appeared, while pod events may still be in flight."""
    since = parse_time(condition.get("lastTransitionTime") or condition.get("lastProbeTime"))
    return since is not None and (now - since).total_seconds() < LAG_SECONDS


def _job_condition(job: dict[str, Any], type_: str) -> dict[str, Any] | None:
    conditions: list[dict[str, Any]] = (job.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == type_ and c.get("status") == "True"), None)


def job_finished(job: dict[str, Any]) -> bool:
    """Whether the Job has completed or failed for good."""
    return _job_condition(job, "Complete") is not None or _job_condition(job, "Failed") is not None


def _last_failure(pods: list[dict[str, Any]], spec: TrainingJobSpec) -> tuple[str, str] | None:
    failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    failed_pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    return next((c for c in (pod_failure(p, spec) for p in reversed(failed_pods)) if c), None)


def _succeeded(job: dict[str, Any], complete: dict[str, Any], pods: list[dict[str, Any]], now: datetime,
               new: dict[str, Any]) -> Outcome | None:
    """The Succeeded outcome (result and completion time into `new`), or None to wait for the pod's summary."""
    result = _result_from(pods)
    if result is None and _lagging(complete, now) and not any(pod_phase(p) == "Succeeded" for p in pods):
        return None  # the pod watch has not caught up with the Job yet: its summary is coming
    message = "training finished" if result else "training finished but the trainer reported no result summary"
    if result is not None:
        new["result"] = result
    new["completionTime"] = (job.get("status") or {}).get("completionTime") or fmt_time(now)
    return "Succeeded", "Succeeded", message


def _failed(spec: TrainingJobSpec, job: dict[str, Any], failed: dict[str, Any], pods: list[dict[str, Any]],
            now: datetime) -> Outcome | None:
    """The Failed outcome with the most precise reason, or None to wait for the failed pod to arrive."""
    run_policy = spec.run_policy
    cause = _last_failure(pods, spec)
    if cause is None and failed.get("reason") != "DeadlineExceeded" and _lagging(failed, now):
        return None  # the failed pod has not reached us yet; its reason is worth waiting for
    if failed.get("reason") == "DeadlineExceeded":
        return ("Failed", "DeadlineExceeded",
                f"the job ran longer than spec.runPolicy.activeDeadlineSeconds={run_policy.active_deadline_seconds}")
    if run_policy.backoff_limit > 0 or cause is None:
        failed_pods = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
        attempts = int((job.get("status") or {}).get("failed") or len(failed_pods) or 1)
        message = f"failed {attempts} time(s), spec.runPolicy.backoffLimit={run_policy.backoff_limit}"
        if cause:
            message += f"; last failure: {cause[0]}: {cause[1]}"
        elif failed.get("message"):
            message += f": {failed['message']}"
        return "Failed", "BackoffLimitExceeded", message
    return "Failed", cause[0], cause[1]


def _outcome(tj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime,
             held_back: bool, new: dict[str, Any]) -> tuple[Outcome, bool] | None:
    """((phase, reason, message), delete_job), or None when nothing is to be written yet."""
    spec, old = TrainingJobSpec.from_dict(tj.get("spec")), tj.get("status") or {}
    if job is None:
        if held_back:
            return ("Suspended", "Suspended", HELD_BACK_MESSAGE), False
        if old.get("jobName"):
            new["completionTime"] = fmt_time(now)
            return ("Failed", "JobDeleted", f"Job {old['jobName']} was deleted before the training finished"), False
        return None
    if (complete := _job_condition(job, "Complete")) is not None:
        done = _succeeded(job, complete, pods, now, new)
        return (done, False) if done else None
    if (failed := _job_condition(job, "Failed")) is not None:
        new["completionTime"] = fmt_time(now)
        outcome = _failed(spec, job, failed, pods, now)
        return (outcome, False) if outcome else None
    if (job.get("spec") or {}).get("suspend") or _job_condition(job, "Suspended"):
        return ("Suspended", "Suspended", "the Job is suspended (spec.runPolicy.suspend or a queue)"), False
    phase, reason, message, start, delete_job = _active(spec, job, pods, now)
    if start and not old.get("startTime"):
        new["startTime"] = start
    if delete_job:
        new["completionTime"] = fmt_time(now)
    return (phase, reason, message), delete_job


def derive(tj: dict[str, Any], job: dict[str, Any] | None, pods: list[dict[str, Any]], now: datetime | None = None,
           *, held_back: bool = False) -> Derived:
    """The status a TrainingJob should have, given its Job and that Job's Pods.

    `held_back` means the operator deliberately has not created the Job (suspended on an API server
    without Job suspend).
    """
    now = now or now_utc()
    old = tj.get("status") or {}
    if (old.get("phase") or "Pending") in TERMINAL:
        return Derived()
    new: dict[str, Any] = {}
    decided = _outcome(tj, job, pods, now, held_back, new)
    if decided is None:
        return Derived()
    (phase, reason, message), delete_job = decided
    new.update(phase=phase, reason=reason, message=message[:2048])
    if job is not None:
        new["jobName"] = job["metadata"]["name"]
    generation = (tj.get("metadata") or {}).get("generation")
    new["observedGeneration"] = generation
    before = list(old.get("conditions") or [])
    new["conditions"] = conditions_for(before, phase, reason, message, now, generation,
                                       created=bool(new.get("jobName") or old.get("jobName")))
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    event = None
    if (phase, reason) != (old.get("phase"), old.get("reason")):
        kind = "Warning" if phase == "Failed" or reason in WARNING_REASONS else "Normal"
        event = (kind, reason or phase, f"{phase}: {message}" if message else phase)
    return Derived(status=changed, delete_job=delete_job, event=event)


def conditions_for(conditions: list[dict[str, Any]], phase: str, reason: str, message: str, now: datetime,
                   generation: int | None, created: bool) -> list[dict[str, Any]]:
    """The full condition set for a phase: Kubeflow's Created/Running/Succeeded/Failed, plus Ready and
    kstatus' Reconciling/Stalled, every one present (False where not true) from the first write.

    A terminal failure is Stalled=True (kstatus and Flux then say Failed, not InProgress forever);
    Ready is True only once Succeeded; Reconciling is True while the run is pending or running.
    """
    reason = reason or phase
    done = phase in TERMINAL
    had_created = next((c for c in conditions if c.get("type") == "Created" and c.get("status") == "True"), None)
    wanted: list[tuple[str, str, str, str]] = []
    if created and not had_created:
        wanted.append(("Created", "True", "JobCreated", "the Job was created"))
    elif not created and not had_created:
        wanted.append(("Created", "False", reason, message))
    if phase == "Running":
        wanted.append(("Running", "True", reason, message))
        if reason == "Restarting":
            wanted.append(("Restarting", "True", reason, message))
    else:
        wanted.append(("Running", "False", "Finished" if done else reason, "the job finished" if done else message))
    wanted += [
        ("Succeeded", "True" if phase == "Succeeded" else "False", reason, message),
        ("Failed", "True" if phase == "Failed" else "False", reason, message),
        ("Ready", "True" if phase == "Succeeded" else "False", reason, message),
        ("Reconciling", "True" if phase in ("Pending", "Running") else "False", reason, message),
        ("Stalled", "True" if phase == "Failed" else "False", reason, message),
    ]
    out = set_all(conditions, wanted, now, generation)
    return [c for c in out if not (c["type"] == "Restarting" and phase != "Running")]


def _pod_trouble(pod: dict[str, Any], gpus: int, start_timeout: int, now: datetime) -> tuple[str, str, str, bool] | None:
    """(phase, reason, message, delete_job) for a live pod that cannot start, keeps crashing or waits for a node."""
    created = parse_time(pod["metadata"].get("creationTimestamp")) or now
    for problem in problems(pod):
        if problem.reason in START_FAILURES:
            detail = f"pod {problem.pod}: {problem.reason}: {problem.detail}".rstrip(": ")
            if (now - created).total_seconds() >= start_timeout:
                return ("Failed", problem.reason, f"{detail}; the pod could not start within "
                        f"spec.runPolicy.startTimeoutSeconds={start_timeout}, the Job was deleted", True)
            return "Pending", problem.reason, f"{detail} (fails after {start_timeout}s)", False
        if problem.reason == "CrashLoopBackOff":
            return ("Running", "CrashLoopBackOff", (f"pod {problem.pod}: container {problem.container} keeps crashing "
                    f"(restarts {problem.restarts}, last exit code {problem.exit_code}): {problem.detail}").rstrip(": "), False)
        if problem.reason == "Unschedulable":
            if waits_for_gpu(problem, gpus):
                return "Pending", "WaitingForGPU", f"no node has {gpus} free nvidia.com/gpu: {problem.detail}".rstrip(": "), False
            return "Pending", "Unschedulable", f"pod {problem.pod}: {problem.detail}", False
    return None


def _active(spec: TrainingJobSpec, job: dict[str, Any], pods: list[dict[str, Any]],
            now: datetime) -> tuple[str, str, str, str | None, bool]:
    """(phase, reason, message, startTime, delete_job) of a Job that has neither completed nor failed."""
    run_policy = spec.run_policy
    gpus = spec.resources.gpus
    start_timeout = run_policy.start_timeout_seconds
    live = [p for p in pods if (p.get("status") or {}).get("phase") in (None, "Pending", "Running")
            and not (p.get("metadata") or {}).get("deletionTimestamp")]
    live.sort(key=_pod_index)
    for pod in live:
        trouble = _pod_trouble(pod, gpus, start_timeout, now)
        if trouble:
            phase, reason, message, delete_job = trouble
            return phase, reason, message, None, delete_job
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        starts = [t for p in running if (t := (p.get("status") or {}).get("startTime"))]
        start = min(starts) if starts else fmt_time(now)
        failed_before = int((job.get("status") or {}).get("failed") or 0)
        if failed_before:
            cause = _last_failure(pods, spec)
            msg = f"attempt {failed_before + 1} of {run_policy.backoff_limit + 1}"
            if cause:
                msg += f" after {cause[0]}: {cause[1]}"
            return "Running", "Restarting", msg, start, False
        return "Running", "Running", f"{len(running)}/{spec.workers} worker(s) running", start, False
    if live:
        return "Pending", "PodPending", f"{len(live)} pod(s) created, waiting to start", None, False
    return "Pending", "JobCreated", f"Job {job['metadata']['name']} created, waiting for pods", None, False
