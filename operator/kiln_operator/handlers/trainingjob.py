"""TrainingJob controller: renders the trainer's Job and follows it to success or a precise failure.

Flow: on create/resume the children are created (idempotently: fixed names, 409 means "already
there"); from then on every Job/Pod watch event and a periodic timer re-derive the status from Kopf's
in-memory indexes (no API reads) and patch it only when it changed. No finalizer: children go by
ownerReference garbage collection, so deleting a TrainingJob never hangs, operator up or not.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kiln import API_VERSION, GROUP, VERSION
from kiln_operator import kube, names
from kiln_operator.handlers.common import Cache, Coalescer, Key, StatusWriter, Ticker, log, owned_by, post_event, snapshot
from kiln_operator.render import RenderError, build_trainingjob
from kiln_operator.settings import OperatorSettings
from kiln_operator.status import HELD_BACK_MESSAGE, TERMINAL, derive, fmt_time, now_utc, set_condition

PLURAL = "trainingjobs"


def slim_job(body: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"),
                     "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or [])),
                     "deletionTimestamp": meta.get("deletionTimestamp")},
        "spec": {k: body.get("spec", {}).get(k) for k in ("suspend", "backoffLimit", "completions")},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def slim_pod(body: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "metadata": {"name": meta.get("name"), "uid": meta.get("uid"), "creationTimestamp": meta.get("creationTimestamp"),
                     "deletionTimestamp": meta.get("deletionTimestamp"),
                     "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith("batch.kubernetes.io")},
                     "ownerReferences": copy.deepcopy(list(meta.get("ownerReferences") or []))},
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def _phase(pod: dict[str, Any]) -> str | None:
    return (pod.get("status") or {}).get("phase")


def _finished(job: dict[str, Any]) -> bool:
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or [])


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

    async def reconcile_all() -> None:
        for key in trainingjobs:
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
            tj = writer.view(key, body)
            uid = tj["metadata"].get("uid")
            job = next((j for j in jobs.get(key) if owned_by(j, uid)), None)
            job_name = tj["status"].get("jobName")
            if job is None and job_name and tj["status"].get("phase") not in TERMINAL:
                # The watch may simply not have delivered the new Job yet: ask before calling it deleted.
                live = await asyncio.to_thread(kube.get, "batch/v1", "Job", key[0], job_name)
                if live is not None and owned_by(live, uid):
                    job = slim_job(live)
                    jobs.update("ADDED", key, job)
            job_uid = job["metadata"]["uid"] if job else None
            job_pods = [p for p in pods.get(key) if job_uid and owned_by(p, job_uid)]
            if job and _finished(job) and not any(_phase(p) in ("Succeeded", "Failed") for p in job_pods):
                # The Job says it finished but its finished pod has not reached the watch cache yet (an
                # operator restart refills caches stream by stream): read the pods, for the real reason.
                listed = await asyncio.to_thread(kube.list_objects, "v1", "Pod", key[0],
                                                 f"{names.LABEL_TRAININGJOB}={names.label_value(key[1])}")
                for pod in listed:
                    pods.update("ADDED", key, slim_pod(pod))
                job_pods = [p for p in pods.get(key) if owned_by(p, job_uid)]
            held_back = bool(((tj.get("spec") or {}).get("runPolicy") or {}).get("suspend")) and not features.job_suspend \
                and not tj["status"].get("jobName")
            derived = derive(tj, job, job_pods, held_back=held_back)
            if derived.delete_job and job:
                await asyncio.to_thread(kube.delete, "batch/v1", "Job", key[0], job["metadata"]["name"])
            await writer.patch(key, derived.status)
            if derived.event:
                await post_event(tj, *derived.event)
            status = writer.view(key, body)["status"]
            if status.get("phase") == "Succeeded" and (tj.get("spec") or {}).get("deploy") and not status.get("deployment"):
                await create_deployment(key, tj)

    async def create_deployment(key: Key, tj: dict[str, Any]) -> None:
        md = build_deployment(tj)
        try:
            _, created = await asyncio.to_thread(kube.create, md)
        except ApiException as exc:
            message = f"could not create ModelDeployment {md['metadata']['name']}: {kube.error_message(exc)}"
            await post_event(tj, "Warning", "DeployFailed", message)
            raise kopf.TemporaryError(kube.error_message(exc), delay=10) from exc
        await writer.patch(key, {"deployment": md["metadata"]["name"]})
        if created:
            await post_event(tj, "Normal", "Deploying", f"created ModelDeployment {md['metadata']['name']}")

    async def fail(key: Key, body: dict[str, Any], reason: str, message: str) -> None:
        async with writer.locks[key]:
            tj = writer.view(key, body)
            now = now_utc()
            conditions = set_condition(tj["status"].get("conditions") or [], "Failed", "True", reason, message, now,
                                       tj["metadata"].get("generation"))
            await writer.patch(key, {"phase": "Failed", "reason": reason, "message": message, "conditions": conditions,
                                     "completionTime": fmt_time(now)})
        await post_event(tj, "Warning", reason, message)

    async def ensure_children(key: Key, body: dict[str, Any]) -> None:
        tj = writer.view(key, body)
        status = tj["status"]
        if status.get("phase") in TERMINAL:
            return
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
            await fail(key, body, "InvalidSpec", str(exc))
            return
        async def create_child(obj: dict[str, Any]) -> tuple[dict[str, Any], bool] | ApiException:
            try:
                return await asyncio.to_thread(kube.create, obj)
            except ApiException as exc:
                return exc

        # Two round trips. A RoleBinding may only be created once its Role exists (RBAC checks that the
        # creator holds what the binding grants), and the Job goes last so its pods find their
        # ServiceAccount and ConfigMap; everything else is independent and created together.
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
        for obj, outcome in zip(children, outcomes, strict=True):
            if isinstance(outcome, ApiException) and outcome.status == 0:
                continue  # not attempted: an earlier stage failed and is reported below
            if isinstance(outcome, ApiException):
                message = f"could not create {obj['kind']} {obj['metadata']['name']}: {kube.error_message(outcome)}"
                if outcome.status in (400, 422):
                    await fail(key, body, "JobCreationFailed", message)
                    return
                await post_event(tj, "Warning", "CreateFailed", message)
                raise kopf.TemporaryError(message, delay=5) from outcome
            existing, created = outcome
            if not created and not owned_by(existing, tj["metadata"].get("uid")):
                # A namesake from a deleted TrainingJob that garbage collection has not removed yet.
                raise kopf.TemporaryError(f"{obj['kind']} {obj['metadata']['name']} belongs to another owner; waiting", delay=3)
            if obj["kind"] == "Job":
                job_name = obj["metadata"]["name"]
                if created:
                    await post_event(tj, "Normal", "JobCreated", f"created Job {job_name}")
        async with writer.locks[key]:
            await record_created(key, body, job_name)

    async def record_created(key: Key, body: dict[str, Any], job_name: str) -> None:
        tj = writer.view(key, body)
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
        await writer.patch(key, {k: v for k, v in update.items() if tj["status"].get(k) != v})

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="children", when=wanted, registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="children", when=wanted, registry=registry)
    async def create_fn(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        await ensure_children((namespace or "", name), snapshot(body))

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec", id="spec-change", when=wanted, registry=registry)
    async def spec_changed(namespace: str | None, name: str, body: kopf.Body, diff: kopf.Diff, **_: Any) -> None:
        namespace = namespace or ""
        key = (namespace, name)
        tj = writer.view(key, snapshot(body))
        fields = sorted({"spec." + ".".join(str(p) for p in d[1]) if d[1] else "spec" for d in diff})
        suspend_only = all(f.startswith("spec.runPolicy.suspend") for f in fields)
        status = tj["status"]
        if suspend_only and status.get("phase") not in TERMINAL:
            suspend = bool((tj["spec"].get("runPolicy") or {}).get("suspend"))
            if status.get("jobName") and features.job_suspend:
                await asyncio.to_thread(kube.patch, "batch/v1", "Job", namespace, status["jobName"], {"spec": {"suspend": suspend}})
                await post_event(tj, "Normal", "Suspended" if suspend else "Resumed", f"Job {status['jobName']} suspend={suspend}")
                return
            if not status.get("jobName"):
                await ensure_children(key, snapshot(body))
                return
        if not status.get("jobName") and status.get("phase") not in TERMINAL:
            return  # nothing created yet: the next create attempt uses the new spec
        message = (f"{', '.join(fields)} changed after Job {status.get('jobName')} was created; the change is not "
                   "applied to the running job. Delete and re-create the TrainingJob to train with it.")
        generation = tj["metadata"].get("generation")
        async with writer.locks[key]:
            status = writer.view(key, snapshot(body))["status"]
            conditions = set_condition(status.get("conditions") or [], "SpecChangeIgnored", "True", "SpecChangeIgnored",
                                       message, now_utc(), generation)
            await writer.patch(key, {"conditions": conditions})
        await post_event(tj, "Warning", "SpecChangeIgnored", message)

    async def reconcile_key(key: Key) -> None:
        for body in trainingjobs.get(key):
            await reconcile(key, body)

    coalescer = Coalescer(reconcile_key)

    async def on_child(key: Key) -> None:
        coalescer.mark(key)

    @kopf.on.event("batch", "v1", "jobs", labels=selector, id="job-event", when=wanted, registry=registry)
    async def job_event(type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", annotations.get(names.ANNOTATION_TRAININGJOB, ""))
        jobs.update(type, key, slim_job(body))
        await on_child(key)

    @kopf.on.event("", "v1", "pods", labels=selector, id="pod-event", when=wanted, registry=registry)
    async def pod_event(type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", annotations.get(names.ANNOTATION_TRAININGJOB, ""))
        pods.update(type, key, slim_pod(body))
        await on_child(key)

    @kopf.on.event(GROUP, VERSION, PLURAL, id="trainingjob-event", when=wanted, registry=registry)
    async def trainingjob_event(type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            trainingjobs.items.pop(key, None)
            writer.forget(key)
        else:
            trainingjobs.items[key] = {"": snapshot(body)}
