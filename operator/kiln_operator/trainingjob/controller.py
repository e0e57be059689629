"""TrainingJob controller: renders the trainer's Job and follows it to success or a precise failure.

Level-triggered, from watch events only: every TrainingJob, Job or Pod event (and a periodic resync)
runs one `reconcile` per TrainingJob. With no Job yet, it creates the children (idempotently: fixed
names, 409 means "already there"); afterwards it re-derives the status from the in-memory caches (no
API reads) and patches it only when it changed. Spec edits are found by `metadata.generation` against
`status.observedGeneration` and compared with the spec the Job recorded at creation.

Why no Kopf change handlers (on.create/on.update/on.resume): they keep their progress and diff base
in annotations, two extra PATCHes per resource, and need no less code than this. No finalizer either:
children go by ownerReference garbage collection, so deleting a TrainingJob never hangs.

`TrainingJobController` holds the state (watch caches, what was written) and its methods are the
handlers; `register` attaches them to a Kopf registry.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import kopf

from kiln import API_VERSION, GROUP, VERSION, kube
from kiln.kube import ApiError
from kiln.policy import REASON as POLICY_VIOLATION
from kiln.policy import describe
from kiln.spec import TrainingJobSpec
from kiln_operator import metrics, names, policycheck
from kiln_operator.conditions import fmt_time, now_utc, set_condition, stamp
from kiln_operator.podstatus import pod_phase
from kiln_operator.runtime import Cache, Coalescer, Key, StatusWriter, Ticker, log, owned_by, post_event, snapshot
from kiln_operator.settings import OperatorSettings
from kiln_operator.templating import RenderError
from kiln_operator.trainingjob import trials
from kiln_operator.trainingjob.render import build_deployment, build_trainingjob
from kiln_operator.trainingjob.status import HELD_BACK_MESSAGE, TERMINAL, conditions_for, derive, job_finished, recorded_spec
from kiln_operator.trainingjob.tuner import Tuner

PLURAL = "trainingjobs"
Outcome = tuple[dict[str, Any], bool] | ApiError
"""What creating one child gave: (the object, created now?) or the API's error."""


def slim_job(body: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    template_annotations = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"),
                     "labels": {k: v for k, v in (meta.get("labels") or {}).items() if k == names.LABEL_TRIAL},
                     "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or [])),
                     "deletionTimestamp": meta.get("deletionTimestamp")},
        "spec": {k: spec.get(k) for k in ("suspend", "backoffLimit", "completions", "parallelism", "completionMode")},
        "status": copy.deepcopy(dict(body.get("status") or {})),
        # The TrainingJob spec this Job was made from: what a later edit is compared with.
        "specDocument": template_annotations.get(names.ANNOTATION_SPEC),
    }


def changed_fields(old: Any, new: Any, prefix: str = "spec") -> list[str]:
    """Dotted paths of the leaves that differ between two specs, e.g. ['spec.training.epochs']."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_fields(old.get(k), new.get(k), f"{prefix}.{k}")
        return out
    return [] if old == new else [prefix]


def slim_pod(body: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"), "creationTimestamp": meta.get("creationTimestamp"),
                     "deletionTimestamp": meta.get("deletionTimestamp"),
                     "labels": {k: v for k, v in (meta.get("labels") or {}).items() if k == names.LABEL_TRIAL},
                     "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("batch.kubernetes.io")},
                     "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or []))},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


class TrainingJobController:
    """The TrainingJob handlers and the state they share (one instance per operator)."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.features = settings.features
        self.writer = StatusWriter(API_VERSION, "TrainingJob")
        self.trainingjobs, self.jobs, self.pods = Cache(), Cache(), Cache()
        self.reconciled: dict[Key, float] = {}
        """When each TrainingJob was last reconciled: the periodic resync skips those seen recently."""
        self.created: dict[Key, float] = {}
        """When this process created each TrainingJob's Job: until its watch event arrives, it is not 'missing'."""
        self.ticker = Ticker(settings.reconcile_interval, self.reconcile_all)
        self.coalescer = Coalescer(self.reconcile_key)
        self.tuner = Tuner(self)

    def wanted(self, namespace: str | None, **_: Any) -> bool:
        return self.settings.handles(namespace)

    # -------------------------------------------------------------------------------- lifecycle
    async def start_resync(self, **_: Any) -> None:
        self.ticker.start()
        self.coalescer.start()

    async def stop_resync(self, **_: Any) -> None:
        await self.ticker.stop()
        await self.coalescer.stop()

    async def reconcile_all(self) -> None:
        horizon = time.monotonic() - self.settings.reconcile_interval
        for key in self.trainingjobs:
            if self.reconciled.get(key, 0.0) > horizon:
                continue
            for body in self.trainingjobs.get(key):
                try:
                    await self.reconcile(key, body)
                except (ApiError, kopf.TemporaryError) as exc:
                    log.warning("resync of %s/%s failed: %s", key[0], key[1], exc)

    async def reconcile_key(self, key: Key) -> None:
        for body in self.trainingjobs.get(key):
            await self.reconcile(key, body)

    # -------------------------------------------------------------------------------- watch events
    async def job_event(self, type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", annotations.get(names.ANNOTATION_TRAININGJOB, ""))
        self.jobs.update(type, key, slim_job(body))
        self.coalescer.mark(key)

    async def pod_event(self, type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", annotations.get(names.ANNOTATION_TRAININGJOB, ""))
        self.pods.update(type, key, slim_pod(body))
        self.coalescer.mark(key)

    async def trainingjob_event(self, type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            self.trainingjobs.items.pop(key, None)
            self.writer.forget(key)
            self.reconciled.pop(key, None)
            self.created.pop(key, None)
            return
        self.trainingjobs.items[key] = {"": snapshot(body)}
        try:
            await self.reconcile(key, self.trainingjobs.items[key][""])
        except (ApiError, kopf.TemporaryError) as exc:
            # Not raised to Kopf: event handlers are not retried. The periodic resync tries again.
            self.reconciled.pop(key, None)
            log.warning("reconcile of %s/%s failed (retried by the resync): %s", key[0], key[1], exc)

    # -------------------------------------------------------------------------------- reconcile
    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """TrainingJobs by phase and the reconcile queue, for /metrics (read at scrape time, no API calls)."""
        phases = dict.fromkeys(("Pending", "Running", "Succeeded", "Failed", "Suspended"), 0)
        for key in list(self.trainingjobs.items):
            for body in list((self.trainingjobs.items.get(key) or {}).values()):
                phase = self.writer.view(key, body)["status"].get("phase") or "Pending"
                phases[phase] = phases.get(phase, 0) + 1
        out: list[tuple[str, dict[str, str], float]] = [("kiln_operator_trainingjobs", {"phase": p}, n) for p, n in phases.items()]
        out.append(("kiln_operator_queue_depth", {"kind": "TrainingJob"}, len(self.coalescer.dirty) + len(self.coalescer.running)))
        return out

    async def reconcile(self, key: Key, body: dict[str, Any]) -> None:
        with metrics.reconciling("TrainingJob"):
            await self._reconcile(key, body)

    async def _reconcile(self, key: Key, body: dict[str, Any]) -> None:
        async with self.writer.locks[key]:
            self.reconciled[key] = time.monotonic()
            tj = self.writer.view(key, body)
            uid = tj["metadata"].get("uid")
            status = tj["status"]
            job = next((j for j in self.jobs.get(key) if owned_by(j, uid) and not trials.is_trial(j)), None)
            job_name = status.get("jobName")
            if status.get("phase") not in TERMINAL and job is None:
                # A search that has started stays with the tuner, whatever the spec says now: the tuner runs it
                # with the spec recorded on its first trial Job and flags the edit (SpecChangeIgnored).
                searching = any(owned_by(j, uid) and trials.is_trial(j) for j in self.jobs.get(key))
                if not job_name and (searching or trials.parallel(TrainingJobSpec.from_dict(tj.get("spec")))):
                    await self.tuner.reconcile(key, tj)
                    return
                if not job_name:
                    await self.ensure_children(key, tj)
                    return
                if time.monotonic() - self.created.get(key, -1e9) < 30:
                    return  # created moments ago: its watch event is on the way and reconciles again
                job = await self._job_not_seen_yet(key, job_name, uid)
            if job is not None:
                self.created.pop(key, None)
            generation, observed = tj["metadata"].get("generation"), status.get("observedGeneration")
            if job_name and generation and observed and generation != observed:
                await self.spec_changed(key, tj, job)
                tj = self.writer.view(key, body)
            await self._follow(key, body, tj, job)

    async def _job_not_seen_yet(self, key: Key, job_name: str, uid: str | None) -> dict[str, Any] | None:
        """The watch may simply not have delivered the Job yet: ask before calling it deleted."""
        live = await kube.api().get("batch/v1", "Job", key[0], job_name)
        if live is None or not owned_by(live, uid):
            return None
        job = slim_job(live)
        self.jobs.update("ADDED", key, job)
        return job

    async def _job_pods(self, key: Key, job: dict[str, Any] | None) -> list[dict[str, Any]]:
        job_uid = job["metadata"]["uid"] if job else None
        job_pods = [p for p in self.pods.get(key) if job_uid and owned_by(p, job_uid)]
        if job and job_finished(job) and not any(pod_phase(p) in ("Succeeded", "Failed") for p in job_pods):
            # The Job says it finished but its finished pod has not reached the watch cache yet (an
            # operator restart refills caches stream by stream): read the pods, for the real reason.
            await self.refill_pods(key)
            job_pods = [p for p in self.pods.get(key) if owned_by(p, job_uid)]
        return job_pods

    async def refill_pods(self, key: Key) -> None:
        """List the TrainingJob's pods into the cache (a finished Job's pod missing there: an operator restart)."""
        listed = await kube.api().list_objects("v1", "Pod", key[0], f"{names.LABEL_TRAININGJOB}={names.label_value(key[1])}")
        for pod in listed:
            self.pods.update("ADDED", key, slim_pod(pod))

    async def _follow(self, key: Key, body: dict[str, Any], tj: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Derive the status from the Job and its pods, write it, and deploy the model once it succeeded."""
        job_pods = await self._job_pods(key, job)
        held_back = TrainingJobSpec.from_dict(tj.get("spec")).run_policy.suspend and not self.features.job_suspend \
            and not tj["status"].get("jobName")
        derived = derive(tj, job, job_pods, held_back=held_back)
        if derived.delete_job and job:
            await kube.api().delete("batch/v1", "Job", key[0], job["metadata"]["name"])
        await self.writer.patch(key, derived.status, tj)
        if derived.event:
            await post_event(tj, *derived.event)
        status = self.writer.view(key, body)["status"]
        if status.get("phase") == "Succeeded" and (tj.get("spec") or {}).get("deploy") and not status.get("deployment"):
            await self.create_deployment(key, tj)

    async def create_deployment(self, key: Key, tj: dict[str, Any]) -> None:
        md = build_deployment(tj)
        try:
            _, made = await kube.api().create(md)
        except ApiError as exc:
            message = f"could not create ModelDeployment {md['metadata']['name']}: {kube.error_message(exc)}"
            await post_event(tj, "Warning", "DeployFailed", message)
            raise kopf.TemporaryError(kube.error_message(exc), delay=10) from exc
        await self.writer.patch(key, {"deployment": md["metadata"]["name"]})
        if made:
            await post_event(tj, "Normal", "Deploying", f"created ModelDeployment {md['metadata']['name']}")

    async def fail(self, key: Key, tj: dict[str, Any], reason: str, message: str) -> None:
        """Mark the TrainingJob Failed (the caller holds its lock)."""
        now = now_utc()
        generation = tj["metadata"].get("generation")
        conditions = conditions_for(tj["status"].get("conditions") or [], "Failed", reason, message, now, generation,
                                    created=bool(tj["status"].get("jobName")))
        await self.writer.patch(key, {"phase": "Failed", "reason": reason, "message": message, "conditions": conditions,
                                      "completionTime": fmt_time(now), "observedGeneration": generation}, tj)
        await post_event(tj, "Warning", reason, message)

    # -------------------------------------------------------------------------------- children
    async def ensure_children(self, key: Key, tj: dict[str, Any], source: dict[str, Any] | None = None,
                              tuning_best: int | None = None) -> None:
        """Create the ServiceAccount, Role, RoleBinding (and workers' Service) and the Job (caller holds the lock).

        After a parallel search, `source` is the TrainingJob as its trials ran (their recorded spec) and
        `tuning_best` the trial the Job trains for export."""
        if TrainingJobSpec.from_dict(tj.get("spec")).run_policy.suspend and not self.features.job_suspend:
            # No Job suspend on this API server: hold the Job back until the user resumes.
            if tj["status"].get("phase") != "Suspended":
                generation = tj["metadata"].get("generation")
                conditions = conditions_for(tj["status"].get("conditions") or [], "Suspended", "Suspended", HELD_BACK_MESSAGE,
                                            now_utc(), generation, created=False)
                await self.writer.patch(key, {"phase": "Suspended", "reason": "Suspended", "message": HELD_BACK_MESSAGE,
                                              "conditions": conditions, "observedGeneration": generation}, tj)
                await post_event(tj, "Normal", "Suspended", "the Job is held back while spec.runPolicy.suspend is true")
            return
        violations = await policycheck.check("TrainingJob", tj, self.settings.tenant_policy())
        if violations:
            await self.fail(key, tj, POLICY_VIOLATION, describe(violations))
            return
        try:
            children = build_trainingjob(source or tj, self.settings, tuning_best)
        except RenderError as exc:
            await self.fail(key, tj, "InvalidSpec", str(exc))
            return
        created = await self.create_children(key, tj, children)
        if created is None:
            return
        job_name, job_created = "", False
        for obj, made in created:
            if obj["kind"] == "Job":
                job_name, job_created = obj["metadata"]["name"], made
                self.created[key] = time.monotonic()
        await self.record_created(key, tj, job_name)
        if job_created:
            log.info("%s/%s: created Job %s", key[0], key[1], job_name)
            await post_event(tj, "Normal", "JobCreated", f"created Job {job_name}")

    async def create_children(self, key: Key, tj: dict[str, Any],
                              children: list[dict[str, Any]]) -> list[tuple[dict[str, Any], bool]] | None:
        """Create `children` in stages; [(object, created now?)] once all are ours, else None (failed or retried)."""
        outcomes = await create_in_stages(children, tj["metadata"].get("uid"))
        out: list[tuple[dict[str, Any], bool]] = []
        for obj, outcome in zip(children, outcomes, strict=True):
            if isinstance(outcome, ApiError) and outcome.status == 0:
                continue  # not attempted: an earlier stage failed and is reported below
            if isinstance(outcome, ApiError):
                message = f"could not create {obj['kind']} {obj['metadata']['name']}: {kube.error_message(outcome)}"
                if outcome.status in (400, 422):
                    await self.fail(key, tj, "JobCreationFailed", message)
                    return None
                await post_event(tj, "Warning", "CreateFailed", message)
                raise kopf.TemporaryError(message, delay=5) from outcome
            existing, made = outcome
            if not made and not owned_by(existing, tj["metadata"].get("uid")):
                if namesake_of_deleted(existing, key[1]):
                    # A namesake from a deleted TrainingJob that garbage collection has not removed yet.
                    raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} belongs to a deleted "
                                              f"TrainingJob {key[1]}; waiting for garbage collection", delay=3)
                await self.fail(key, tj, "OwnershipConflict", f"{obj['kind']} {obj['metadata']['name']} already exists and "
                                "is not owned by this TrainingJob; nothing else was created (rename the TrainingJob or "
                                "delete that object)")
                return None
            out.append((obj, made))
        return out

    async def record_created(self, key: Key, tj: dict[str, Any], job_name: str) -> None:
        status, spec = tj["status"], TrainingJobSpec.from_dict(tj.get("spec"))
        now = now_utc()
        generation = tj["metadata"].get("generation")
        conditions = set_condition(status.get("conditions") or [], "Created", "True", "JobCreated",
                                   f"created Job {job_name}", now, generation)
        update: dict[str, Any] = {"jobName": job_name, "observedGeneration": generation, "conditions": conditions}
        if not status.get("phase") or status.get("phase") == "Suspended":
            message = f"Job {job_name} created, waiting for pods"
            update.update(phase="Pending", reason="JobCreated", message=message,
                          conditions=conditions_for(conditions, "Pending", "JobCreated", message, now, generation, created=True))
        if not status.get("progress") and not spec.command:
            update["progress"] = {"epoch": 0, "epochs": spec.training.epochs, "percent": 0}
        await self.writer.patch(key, {k: v for k, v in update.items() if status.get(k) != v}, tj)

    # -------------------------------------------------------------------------------- spec edits
    async def spec_changed(self, key: Key, tj: dict[str, Any], job: dict[str, Any] | None, apply_suspend: bool = True) -> None:
        """A spec edit after the Job exists: suspend/resume is applied, anything else is flagged (caller holds the lock).

        `apply_suspend=False` (trial Jobs): a suspend edit is accepted but not patched onto the Job; the
        tuner reads it and starts no new trials."""
        spec, status = tj.get("spec") or {}, tj["status"]
        generation = tj["metadata"].get("generation")
        original = recorded_spec(job) if job else None
        fields = changed_fields(original, spec) if original is not None else ["spec"]
        # Every condition is now observed at the new generation, or `kubectl wait` would wait forever.
        conditions = stamp(status.get("conditions") or [], generation)
        update: dict[str, Any] = {"observedGeneration": generation, "conditions": conditions}
        if all(f.startswith("spec.runPolicy.suspend") for f in fields) and job is not None and status.get("phase") not in TERMINAL:
            if apply_suspend:
                await self._apply_suspend(key, tj, job)
            ignored = next((c for c in conditions if c.get("type") == "SpecChangeIgnored"), None)
            if ignored is not None and ignored.get("status") == "True":
                update["conditions"] = set_condition(conditions, "SpecChangeIgnored", "False", "SpecMatchesJob",
                                                     "the spec is back to what the Job runs with", now_utc(), generation)
            await self.writer.patch(key, update, tj)
            return
        # During a parallel search there is no training Job yet: the Job the spec was recorded on is a trial's.
        job_name = status.get("jobName") or (job or {}).get("metadata", {}).get("name")
        message = (f"{', '.join(fields)} changed after Job {job_name} was created; the change is not "
                   "applied to the running job. Delete and re-create the TrainingJob to train with it.")
        update["conditions"] = set_condition(conditions, "SpecChangeIgnored", "True", "SpecChangeIgnored",
                                             message, now_utc(), generation)
        await self.writer.patch(key, update, tj)
        await post_event(tj, "Warning", "SpecChangeIgnored", message)

    async def _apply_suspend(self, key: Key, tj: dict[str, Any], job: dict[str, Any]) -> None:
        spec = TrainingJobSpec.from_dict(tj.get("spec"))
        suspend = spec.run_policy.suspend
        queued = bool(spec.scheduling.queue_name)  # a queue (Kueue) owns resuming
        if self.features.job_suspend and bool((job.get("spec") or {}).get("suspend")) != suspend and (suspend or not queued):
            await kube.api().patch("batch/v1", "Job", key[0], job["metadata"]["name"], {"spec": {"suspend": suspend}})
            await post_event(tj, "Normal", "Suspended" if suspend else "Resumed", f"Job {job['metadata']['name']} suspend={suspend}")


def namesake_of_deleted(existing: dict[str, Any], name: str) -> bool:
    """Whether a child that is not ours was made for an earlier TrainingJob of the same name (so GC removes it)."""
    refs = (existing.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("kind") == "TrainingJob" and r.get("name") == name and r.get("controller") for r in refs)


async def create_in_stages(children: list[dict[str, Any]], uid: str | None) -> list[Outcome]:
    """Create the children in three round trips; a child not attempted (an earlier stage failed) gets ApiError(status=0).

    Each stage starts only once every child of the stages before is ours: a pre-existing ServiceAccount
    or Role of the same name that this TrainingJob does not own never gets a RoleBinding, and a
    pre-existing RoleBinding not ours (it could bind the trainer's account to anything) never gets a
    Job. That costs a third round trip per TrainingJob (the Job waits for the RoleBinding's answer).

    A RoleBinding may only be created once its Role exists (RBAC checks that the creator holds what the
    binding grants), and the Job goes second so that its pods find their ServiceAccount and no training
    starts when the trainer's identity could not be made. (Creating the Job in the first round trip was
    faster under a burst, but an operator killed between the two requests left a Job whose pods failed
    for want of their ServiceAccount, and the Job controller's backoff then delayed them for minutes.)
    """
    async def create_child(obj: dict[str, Any]) -> Outcome:
        try:
            return await kube.api().create(obj, decode=False)
        except ApiError as exc:
            return exc

    order = {"RoleBinding": 1, "Job": 2}
    stages = [[i for i, obj in enumerate(children) if order.get(obj["kind"], 0) == n] for n in range(3)]
    outcomes: list[Outcome] = [ApiError(status=0)] * len(children)
    for stage in stages:
        for i, outcome in zip(stage, await asyncio.gather(*(create_child(children[i]) for i in stage)), strict=True):
            outcomes[i] = outcome
        if any(isinstance(outcomes[i], ApiError) or not _ours(outcomes[i], uid) for i in stage):
            break
    return outcomes


def _ours(outcome: Outcome, uid: str | None) -> bool:
    """Created now, or an existing object owned by the TrainingJob with `uid`."""
    return isinstance(outcome, tuple) and (outcome[1] or owned_by(outcome[0], uid))


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> TrainingJobController:
    """Attach a TrainingJob controller's handlers to `registry`."""
    c = TrainingJobController(settings)
    metrics.STATE.set_source("TrainingJob", c.metric_samples)
    selector = {names.LABEL_TRAININGJOB: kopf.PRESENT}
    kopf.on.startup(id="trainingjob-resync", registry=registry)(c.start_resync)
    kopf.on.cleanup(id="trainingjob-resync-stop", registry=registry)(c.stop_resync)
    kopf.on.event("batch", "v1", "jobs", labels=selector, id="job-event", when=c.wanted, registry=registry)(c.job_event)
    kopf.on.event("", "v1", "pods", labels=selector, id="pod-event", when=c.wanted, registry=registry)(c.pod_event)
    kopf.on.event(GROUP, VERSION, PLURAL, id="trainingjob-event", when=c.wanted, registry=registry)(c.trainingjob_event)
    return c
