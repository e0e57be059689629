"""TrainingJob controller: renders the trainer's Job and follows it to success or a precise failure.

Level-triggered, from watch events only: every TrainingJob, Job or Pod event (and a periodic resync)
runs one `reconcile` per TrainingJob. With no Job yet, it creates the children (idempotently: fixed
names, 409 means "already there"); afterwards it re-derives the status from the in-memory caches (no
API reads) and patches it only when it changed. Spec edits are found by `metadata.generation` against
`status.observedGeneration` and compared with the spec the Job recorded at creation.

Why no Kopf change handlers (on.create/on.update/on.resume): they keep their progress and diff base
in annotations, two extra PATCHes per resource, and need no less code than this. No finalizer either:
children go by ownerReference garbage collection, so deleting a TrainingJob never hangs.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import kopf
import yaml
from kubernetes.client.exceptions import ApiException

from kiln import API_VERSION, GROUP, VERSION
from kiln_operator import aiokube, kube, names
from kiln_operator.handlers.common import Cache, Coalescer, Key, StatusWriter, Ticker, log, owned_by, post_event, snapshot
from kiln_operator.render import RenderError, build_trainingjob
from kiln_operator.settings import OperatorSettings
from kiln_operator.status import HELD_BACK_MESSAGE, TERMINAL, derive, fmt_time, job_finished, now_utc, pod_phase, set_condition

PLURAL = "trainingjobs"


def slim_job(body: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    template_annotations = ((spec.get("template") or {}).get("metadata") or {}).get("annotations") or {}
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"),
                     "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or [])),
                     "deletionTimestamp": meta.get("deletionTimestamp")},
        "spec": {k: spec.get(k) for k in ("suspend", "backoffLimit", "completions")},
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


def recorded_spec(job: dict[str, Any]) -> dict[str, Any] | None:
    """The spec stored on the Job at creation (None for Jobs made without one)."""
    document = job.get("specDocument")
    if not document:
        return None
    try:
        loaded = yaml.safe_load(document)
    except yaml.YAMLError:
        return None
    return loaded.get("spec") if isinstance(loaded, dict) else None


def slim_pod(body: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"), "creationTimestamp": meta.get("creationTimestamp"),
                     "deletionTimestamp": meta.get("deletionTimestamp"),
                     "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("batch.kubernetes.io")},
                     "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or []))},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def build_deployment(tj: dict[str, Any]) -> dict[str, Any]:
    """The ModelDeployment that `spec.deploy` asks for (not owned by the TrainingJob: see docs)."""
    deploy = copy.deepcopy(tj["spec"]["deploy"])
    md_name = deploy.pop("name", None) or tj["metadata"]["name"]
    model = {"trainingJob": tj["metadata"]["name"], "format": (deploy.pop("model", None) or {}).get("format", "onnx")}
    return {
        "apiVersion": API_VERSION,
        "kind": "ModelDeployment",
        "metadata": {"name": md_name, "namespace": tj["metadata"]["namespace"],
                     "labels": {names.LABEL_CREATED_BY: names.label_value(tj["metadata"]["name"]),
                                "app.kubernetes.io/managed-by": "kiln-operator"}},
        "spec": {**deploy, "model": model},
    }


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Attach the TrainingJob handlers to `registry` (timings come from `settings`)."""
    writer = StatusWriter(API_VERSION, "TrainingJob")
    features = settings.features
    def wanted(namespace: str | None, **_: Any) -> bool:
        return settings.handles(namespace)

    selector = {names.LABEL_TRAININGJOB: kopf.PRESENT}

    trainingjobs, jobs, pods = Cache(), Cache(), Cache()
    reconciled: dict[Key, float] = {}
    """When each TrainingJob was last reconciled: the periodic resync skips those seen recently."""
    created: dict[Key, float] = {}
    """When this process created each TrainingJob's Job: until its watch event arrives, it is not 'missing'."""

    async def reconcile_all() -> None:
        horizon = time.monotonic() - settings.reconcile_interval
        for key in trainingjobs:
            if reconciled.get(key, 0.0) > horizon:
                continue
            for body in trainingjobs.get(key):
                try:
                    await reconcile(key, body)
                except (ApiException, kopf.TemporaryError) as exc:
                    log.warning("resync of %s/%s failed: %s", key[0], key[1], exc)

    ticker = Ticker(settings.reconcile_interval, reconcile_all)

    @kopf.on.startup(id="trainingjob-resync", registry=registry)
    async def start_resync(**_: Any) -> None:
        ticker.start()
        coalescer.start()

    @kopf.on.cleanup(id="trainingjob-resync-stop", registry=registry)
    async def stop_resync(**_: Any) -> None:
        await ticker.stop()
        await coalescer.stop()

    async def reconcile(key: Key, body: dict[str, Any]) -> None:
        async with writer.locks[key]:
            reconciled[key] = time.monotonic()
            tj = writer.view(key, body)
            uid = tj["metadata"].get("uid")
            status = tj["status"]
            job = next((j for j in jobs.get(key) if owned_by(j, uid)), None)
            job_name = status.get("jobName")
            if job is None and not job_name and status.get("phase") not in TERMINAL:
                await ensure_children(key, tj)
                return
            if job is None and job_name and status.get("phase") not in TERMINAL:
                if time.monotonic() - created.get(key, -1e9) < 30:
                    return  # created moments ago: its watch event is on the way and reconciles again
                # The watch may simply not have delivered the Job yet: ask before calling it deleted.
                live = await aiokube.get("batch/v1", "Job", key[0], job_name)
                if live is not None and owned_by(live, uid):
                    job = slim_job(live)
                    jobs.update("ADDED", key, job)
            if job is not None:
                created.pop(key, None)
            generation = tj["metadata"].get("generation")
            observed = status.get("observedGeneration")
            if job_name and generation and observed and generation != observed:
                await spec_changed(key, tj, job)
                tj = writer.view(key, body)
            job_uid = job["metadata"]["uid"] if job else None
            job_pods = [p for p in pods.get(key) if job_uid and owned_by(p, job_uid)]
            if job and job_finished(job) and not any(pod_phase(p) in ("Succeeded", "Failed") for p in job_pods):
                # The Job says it finished but its finished pod has not reached the watch cache yet (an
                # operator restart refills caches stream by stream): read the pods, for the real reason.
                listed = await aiokube.list_objects("v1", "Pod", key[0],
                                                 f"{names.LABEL_TRAININGJOB}={names.label_value(key[1])}")
                for pod in listed:
                    pods.update("ADDED", key, slim_pod(pod))
                job_pods = [p for p in pods.get(key) if owned_by(p, job_uid)]
            held_back = bool(((tj.get("spec") or {}).get("runPolicy") or {}).get("suspend")) and not features.job_suspend \
                and not tj["status"].get("jobName")
            derived = derive(tj, job, job_pods, held_back=held_back)
            if derived.delete_job and job:
                await aiokube.delete("batch/v1", "Job", key[0], job["metadata"]["name"])
            await writer.patch(key, derived.status)
            if derived.event:
                await post_event(tj, *derived.event)
            status = writer.view(key, body)["status"]
            if status.get("phase") == "Succeeded" and (tj.get("spec") or {}).get("deploy") and not status.get("deployment"):
                await create_deployment(key, tj)

    async def create_deployment(key: Key, tj: dict[str, Any]) -> None:
        md = build_deployment(tj)
        try:
            _, made = await aiokube.create(md)
        except ApiException as exc:
            message = f"could not create ModelDeployment {md['metadata']['name']}: {kube.error_message(exc)}"
            await post_event(tj, "Warning", "DeployFailed", message)
            raise kopf.TemporaryError(kube.error_message(exc), delay=10) from exc
        await writer.patch(key, {"deployment": md["metadata"]["name"]})
        if made:
            await post_event(tj, "Normal", "Deploying", f"created ModelDeployment {md['metadata']['name']}")

    async def fail(key: Key, tj: dict[str, Any], reason: str, message: str) -> None:
        """Mark the TrainingJob Failed (the caller holds its lock)."""
        now = now_utc()
        conditions = set_condition(tj["status"].get("conditions") or [], "Failed", "True", reason, message, now,
                                   tj["metadata"].get("generation"))
        await writer.patch(key, {"phase": "Failed", "reason": reason, "message": message, "conditions": conditions,
                                 "completionTime": fmt_time(now), "observedGeneration": tj["metadata"].get("generation")})
        await post_event(tj, "Warning", reason, message)

    async def ensure_children(key: Key, tj: dict[str, Any]) -> None:
        """Create the ServiceAccount, Role, RoleBinding (and workers' Service) and the Job (caller holds the lock)."""
        status = tj["status"]
        spec = tj.get("spec") or {}
        if (spec.get("runPolicy") or {}).get("suspend") and not features.job_suspend:
            # No Job suspend on this API server: hold the Job back until the user resumes.
            if status.get("phase") != "Suspended":
                await writer.patch(key, {"phase": "Suspended", "reason": "Suspended", "message": HELD_BACK_MESSAGE})
                await post_event(tj, "Normal", "Suspended", "the Job is held back while spec.runPolicy.suspend is true")
            return
        try:
            children = build_trainingjob(tj, settings)
        except RenderError as exc:
            await fail(key, tj, "InvalidSpec", str(exc))
            return

        async def create_child(obj: dict[str, Any]) -> tuple[dict[str, Any], bool] | ApiException:
            try:
                return await aiokube.create(obj, decode=False)
            except ApiException as exc:
                return exc

        # Two round trips. A RoleBinding may only be created once its Role exists (RBAC checks that the
        # creator holds what the binding grants), and the Job goes second so that its pods find their
        # ServiceAccount and no training starts when the trainer's identity could not be made. (Creating
        # the Job in the first round trip was faster under a burst, but an operator killed between the
        # two requests left a Job whose pods failed for want of their ServiceAccount, and the Job
        # controller's backoff then delayed them for minutes.)
        late = {"RoleBinding", "Job"}
        first = [i for i, obj in enumerate(children) if obj["kind"] not in late]
        second = [i for i, obj in enumerate(children) if obj["kind"] in late]
        outcomes: list[tuple[dict[str, Any], bool] | ApiException] = [ApiException(status=0)] * len(children)
        for stage in (first, second):
            for i, outcome in zip(stage, await asyncio.gather(*(create_child(children[i]) for i in stage)), strict=True):
                outcomes[i] = outcome
            if any(isinstance(outcomes[i], ApiException) for i in stage):
                break
        job_name = ""
        job_created = False
        for obj, outcome in zip(children, outcomes, strict=True):
            if isinstance(outcome, ApiException) and outcome.status == 0:
                continue  # not attempted: an earlier stage failed and is reported below
            if isinstance(outcome, ApiException):
                message = f"could not create {obj['kind']} {obj['metadata']['name']}: {kube.error_message(outcome)}"
                if outcome.status in (400, 422):
                    await fail(key, tj, "JobCreationFailed", message)
                    return
                await post_event(tj, "Warning", "CreateFailed", message)
                raise kopf.TemporaryError(message, delay=5) from outcome
            existing, made = outcome
            if not made and not owned_by(existing, tj["metadata"].get("uid")):
                # A namesake from a deleted TrainingJob that garbage collection has not removed yet.
                raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} belongs to another owner; waiting", delay=3)
            if obj["kind"] == "Job":
                job_name = obj["metadata"]["name"]
                job_created = made
                created[key] = time.monotonic()
        await record_created(key, tj, job_name)
        if job_created:
            log.info("%s/%s: created Job %s", key[0], key[1], job_name)
            await post_event(tj, "Normal", "JobCreated", f"created Job {job_name}")

    async def record_created(key: Key, tj: dict[str, Any], job_name: str) -> None:
        status, spec = tj["status"], tj.get("spec") or {}
        now = now_utc()
        generation = tj["metadata"].get("generation")
        update: dict[str, Any] = {
            "jobName": job_name,
            "observedGeneration": generation,
            "conditions": set_condition(status.get("conditions") or [], "Created", "True", "JobCreated",
                                        f"created Job {job_name}", now, generation),
        }
        if not status.get("phase") or status.get("phase") == "Suspended":
            update.update(phase="Pending", reason="JobCreated", message=f"Job {job_name} created, waiting for pods")
        if not status.get("progress") and not spec.get("command"):
            epochs = int((spec.get("training") or {}).get("epochs") or 10)
            update["progress"] = {"epoch": 0, "epochs": epochs, "percent": 0}
        await writer.patch(key, {k: v for k, v in update.items() if status.get(k) != v})

    async def spec_changed(key: Key, tj: dict[str, Any], job: dict[str, Any] | None) -> None:
        """A spec edit after the Job exists: suspend/resume is applied, anything else is flagged (caller holds the lock)."""
        namespace, _ = key
        spec = tj.get("spec") or {}
        status = tj["status"]
        generation = tj["metadata"].get("generation")
        original = recorded_spec(job) if job else None
        fields = changed_fields(original, spec) if original is not None else ["spec"]
        update: dict[str, Any] = {"observedGeneration": generation}
        suspend_only = all(f.startswith("spec.runPolicy.suspend") for f in fields)
        conditions = status.get("conditions") or []
        ignored = next((c for c in conditions if c.get("type") == "SpecChangeIgnored"), None)
        if suspend_only and job is not None and status.get("phase") not in TERMINAL:
            suspend = bool((spec.get("runPolicy") or {}).get("suspend"))
            queued = bool((spec.get("scheduling") or {}).get("queueName"))  # a queue (Kueue) owns resuming
            if features.job_suspend and bool((job.get("spec") or {}).get("suspend")) != suspend and (suspend or not queued):
                await aiokube.patch("batch/v1", "Job", namespace, job["metadata"]["name"], {"spec": {"suspend": suspend}})
                await post_event(tj, "Normal", "Suspended" if suspend else "Resumed", f"Job {job['metadata']['name']} suspend={suspend}")
            if ignored is not None and ignored.get("status") == "True":
                update["conditions"] = set_condition(conditions, "SpecChangeIgnored", "False", "SpecMatchesJob",
                                                     "the spec is back to what the Job runs with", now_utc(), generation)
            await writer.patch(key, update)
            return
        message = (f"{', '.join(fields)} changed after Job {status.get('jobName')} was created; the change is not "
                   "applied to the running job. Delete and re-create the TrainingJob to train with it.")
        update["conditions"] = set_condition(conditions, "SpecChangeIgnored", "True", "SpecChangeIgnored",
                                             message, now_utc(), generation)
        await writer.patch(key, update)
        await post_event(tj, "Warning", "SpecChangeIgnored", message)

    async def reconcile_key(key: Key) -> None:
        for body in trainingjobs.get(key):
            await reconcile(key, body)

    coalescer = Coalescer(reconcile_key)

    @kopf.on.event("batch", "v1", "jobs", labels=selector, id="job-event", when=wanted, registry=registry)
    async def job_event(type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", annotations.get(names.ANNOTATION_TRAININGJOB, ""))
        jobs.update(type, key, slim_job(body))
        coalescer.mark(key)

    @kopf.on.event("", "v1", "pods", labels=selector, id="pod-event", when=wanted, registry=registry)
    async def pod_event(type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", annotations.get(names.ANNOTATION_TRAININGJOB, ""))
        pods.update(type, key, slim_pod(body))
        coalescer.mark(key)

    @kopf.on.event(GROUP, VERSION, PLURAL, id="trainingjob-event", when=wanted, registry=registry)
    async def trainingjob_event(type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            trainingjobs.items.pop(key, None)
            writer.forget(key)
            reconciled.pop(key, None)
            created.pop(key, None)
            return
        trainingjobs.items[key] = {"": snapshot(body)}
        try:
            await reconcile(key, trainingjobs.items[key][""])
        except (ApiException, kopf.TemporaryError) as exc:
            # Not raised to Kopf: event handlers are not retried. The periodic resync tries again.
            reconciled.pop(key, None)
            log.warning("reconcile of %s/%s failed (retried by the resync): %s", key[0], key[1], exc)
