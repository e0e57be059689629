"""Pure bookkeeping of parallel trials (`spec.tuning.parallelism` > 1): which mode, what each trial's
pods say, which trials to start next, and `status.tuning` with the best so far.

Why pure: like status.py, the rules are what users see (a failed trial's reason, the best pick) and
unit tests cover them without a cluster; the controller only feeds caches in and creates Jobs.

Each trial pod ends with a JSON termination message (kiln_trainer.tuning.run_trial): `{trial,
parameters, metrics, score}`, or `{trial, parameters, error, field}` when the trial's training failed
for its own values (the pod then exits 0 so an Indexed Job goes on). A pod that fails (OOM, a crash)
is read like the training Job's pods (status.pod_failure), once its Job has given up on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kiln import tuning
from kiln.spec import TrainingJobSpec, Tuning
from kiln_operator import names
from kiln_operator.podstatus import statuses, termination_summary
from kiln_operator.runtime import owned_by
from kiln_operator.settings import OperatorSettings
from kiln_operator.trainingjob.render import INDEXED_TRIALS, JOB_PER_TRIAL, build_trainingjob, build_trial_jobs, trial_plan
from kiln_operator.trainingjob.status import job_finished, pod_failure

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"


def parallel(spec: TrainingJobSpec) -> bool:
    """Whether the TrainingJob's search runs its trials as pods of their own (else in the trainer pod)."""
    return spec.tuning is not None and spec.tuning.parallelism > 1 and not spec.command


def mode(settings: OperatorSettings) -> str:
    """IndexedJob where the API server has Indexed Jobs on by default (or the admin says so), else JobPerTrial."""
    if settings.trial_mode == "indexed":
        return INDEXED_TRIALS
    if settings.trial_mode == "jobs":
        return JOB_PER_TRIAL
    return INDEXED_TRIALS if settings.features.indexed_trials else JOB_PER_TRIAL


def mode_reason(chosen: str, settings: OperatorSettings) -> str:
    """Why this mode, for the TuningStarted event."""
    version = settings.features.server_version or "unknown"
    if settings.trial_mode != "auto":
        return f"set by the operator's trial mode {settings.trial_mode!r}"
    if chosen == INDEXED_TRIALS:
        return f"the API server ({version}) has Indexed Jobs"
    return f"the API server ({version}) has no Indexed Jobs on by default (1.22+)"


def preview(tj: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    """What the operator creates first for a TrainingJob (`kiln render`): for a parallel search the trial
    Jobs that start at once (the training Job of the best trial follows once they are done)."""
    spec = TrainingJobSpec.from_dict(tj.get("spec"))
    if not parallel(spec) or spec.tuning is None:
        return build_trainingjob(tj, settings)
    plan, _ = trial_plan(tj, validate=True)
    chosen = mode(settings)
    first = list(range(len(plan))) if chosen == INDEXED_TRIALS else list(range(min(spec.tuning.parallelism, len(plan))))
    return build_trial_jobs(tj, settings, chosen, first, support=True)


def is_trial(obj: dict[str, Any]) -> bool:
    """A parallel trial's Job or pod (not the training Job)."""
    return names.LABEL_TRIAL in ((obj.get("metadata") or {}).get("labels") or {})


def pod_trial(pod: dict[str, Any]) -> int | None:
    """The trial a pod runs: its Job-per-trial label, else its Indexed Job completion index."""
    meta = pod.get("metadata") or {}
    label = _label(pod)
    value = label if label.isdigit() else str((meta.get("annotations") or {}).get(COMPLETION_INDEX, ""))
    return int(value) if value.isdigit() else None


@dataclass
class Progress:
    """Where the search stands: each trial's entry once finished (None before), and what runs now."""

    finished: list[dict[str, Any] | None]
    running: int
    """Trials started and unfinished (a Job per trial), or with a live pod (the Indexed Job)."""
    started: set[int]
    """Trials whose Job exists (Job per trial) or, for the Indexed Job, every trial once it exists."""

    @property
    def done(self) -> bool:
        return all(entry is not None for entry in self.finished)

    def entries(self) -> list[dict[str, Any]]:
        return [entry for entry in self.finished if entry is not None]


def _report(pod: dict[str, Any]) -> dict[str, Any] | None:
    for cs in statuses(pod):
        term = (cs.get("state") or {}).get("terminated") or {}
        summary = termination_summary(term.get("message"))
        if summary is not None:
            return summary
    return None


def _entry(index: int, params: dict[str, Any], metric: str, pod: dict[str, Any]) -> dict[str, Any]:
    """A succeeded pod's trial entry: its metrics and score, or Failed with the reason it reported."""
    base = {"trial": index, "parameters": params}
    report = _report(pod)
    if report is None:
        return {**base, "phase": "Failed", "reason": "NoReport",
                "message": f"pod {pod['metadata']['name']} exited 0 without the trial's JSON report"}
    if report.get("error"):
        field = f"{report['field']}: " if report.get("field") else ""
        return {**base, "phase": "Failed", "reason": "TrialFailed", "message": f"{field}{report['error']}"[:1024]}
    metrics: dict[str, Any] = report["metrics"] if isinstance(report.get("metrics"), dict) else {}
    score = metrics.get(metric)
    if not isinstance(score, int | float) or not math.isfinite(score):
        return {**base, "metrics": metrics, "phase": "Failed", "reason": "NoMetric",
                "message": f"the trial reported no finite {metric} (got {score!r})"}
    return {**base, "metrics": metrics, "score": float(score), "phase": "Succeeded"}


def _failed_entry(index: int, params: dict[str, Any], pods: list[dict[str, Any]], spec: TrainingJobSpec,
                  job: dict[str, Any]) -> dict[str, Any]:
    failed = sorted((p for p in pods if (p.get("status") or {}).get("phase") == "Failed"),
                    key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    cause = next((c for c in (pod_failure(p, spec) for p in reversed(failed)) if c), None)
    if cause is None:
        conditions: list[dict[str, Any]] = (job.get("status") or {}).get("conditions") or []
        condition: dict[str, Any] = next((c for c in conditions if c.get("type") == "Failed"), {})
        cause = (str(condition.get("reason") or "BackoffLimitExceeded"),
                 str(condition.get("message") or f"Job {job['metadata']['name']} failed"))
    return {"trial": index, "parameters": params, "phase": "Failed", "reason": cause[0], "message": cause[1][:1024]}


def progress(plan: list[dict[str, Any]], metric: str, spec: TrainingJobSpec, jobs: list[dict[str, Any]],
             pods: list[dict[str, Any]], recorded: list[dict[str, Any]] | None = None) -> Progress:
    """Each trial's outcome from its Job(s) and pods (caches); a trial is finished once a pod of it
    succeeded, or its Job failed for good (the Indexed Job: every trial without a success).

    `recorded` (status.tuning.trials as written before) keeps a finished trial finished once its Job is
    gone (spec.runPolicy.ttlSecondsAfterFinished, or deleted by hand), or once the pod of its finished
    Job is deleted: it is never run again, nor counted as running."""
    known = {int(t["trial"]): t for t in recorded or [] if isinstance(t.get("trial"), int) and 0 <= t["trial"] < len(plan)}
    by_trial: dict[int, list[dict[str, Any]]] = {}
    for pod in pods:
        index = pod_trial(pod)
        if index is not None and any(owned_by(pod, j["metadata"]["uid"]) for j in jobs):
            by_trial.setdefault(index, []).append(pod)
    job_of: dict[int, dict[str, Any]] = {}
    for job in jobs:
        label = _label(job)
        indices = [int(label)] if label.isdigit() else range(len(plan))
        job_of.update({i: job for i in indices if 0 <= i < len(plan)})
    finished: list[dict[str, Any] | None] = []
    running = 0
    for i, params in enumerate(plan):
        mine = by_trial.get(i, [])
        ok = next((p for p in mine if (p.get("status") or {}).get("phase") == "Succeeded"), None)
        trial_job = job_of.get(i)
        if ok is not None:
            finished.append(_entry(i, params, metric, ok))
        elif i in known and (trial_job is None or not _label(trial_job).isdigit() or job_finished(trial_job)):
            # its Job (or, Indexed, its pods) went after it finished, or its finished Job lost its pod
            finished.append(known[i])
        elif trial_job is not None and job_finished(trial_job) and _job_failed(trial_job):
            finished.append(_failed_entry(i, params, mine, spec, trial_job))
        else:
            finished.append(None)
            running += trial_job is not None and (str(i) == _label(trial_job) or any(_live(p) for p in mine))
    return Progress(finished, running, set(job_of) | set(known))


def _label(obj: dict[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(names.LABEL_TRIAL, ""))


def _live(pod: dict[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    return (pod.get("status") or {}).get("phase") in (None, "Pending", "Running") and not meta.get("deletionTimestamp")


def _job_failed(job: dict[str, Any]) -> bool:
    return any(c.get("type") == "Failed" and c.get("status") == "True" for c in (job.get("status") or {}).get("conditions") or [])


def to_start(state: Progress, total: int, parallelism: int) -> list[int]:
    """Job per trial: the next trials in order, so that at most `parallelism` are started and unfinished."""
    active = sum(1 for i in state.started if state.finished[i] is None)
    waiting = [i for i in range(total) if i not in state.started]
    return waiting[:max(parallelism - active, 0)]


def status(spec: Tuning, chosen: str, seed: int, state: Progress) -> dict[str, Any]:
    """`status.tuning`: every finished trial in order and the best so far (its index is its trial number)."""
    entries = state.entries()
    out = tuning.summarize(spec, entries)
    failed = sum(1 for e in entries if e.get("phase") == "Failed")
    out.update(mode=chosen, seed=seed, total=len(state.finished), running=state.running, failed=failed)
    return out


def message(summary: dict[str, Any], parallelism: int) -> str:
    """The TrainingJob's status message while the trials run."""
    done = len(summary["trials"])
    text = (f"tuning: {done}/{summary['total']} trials finished ({summary['failed']} failed), {summary['running']} running, "
            f"at most {parallelism} at once ({summary['mode']})")
    if "best" in summary:
        text += f"; best so far: trial {summary['best']} {summary['metric']}={summary['bestScore']:.4g}"
    return text


def failure(summary: dict[str, Any]) -> str:
    """Why the search failed: every trial failed; the first few reasons."""
    reasons = "; ".join(f"trial {e['trial']}: {e.get('reason')}: {e.get('message')}" for e in summary["trials"][:3])
    return f"all {summary['total']} trials failed: {reasons}"[:2048]
