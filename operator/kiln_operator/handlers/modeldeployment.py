"""ModelDeployment controller: serves a model (from a TrainingJob or a URI) as Deployment + Service (+ HPA).

Children are kept by server-side apply with Kiln's field manager: whenever a watched child differs
from what Kiln renders (a hand edit), it is applied again. Status follows the Deployment and its Pods.
Like TrainingJobs, no finalizer: children go by ownerReference garbage collection.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kiln import API_VERSION, GROUP, VERSION
from kiln_operator import aiokube, kube, names
from kiln_operator.handlers.common import Cache, Key, StatusWriter, Ticker, log, owned_by, post_event, snapshot
from kiln_operator.render import RenderError
from kiln_operator.serving import build_modeldeployment, derive_md_status, resolve_model, subset
from kiln_operator.settings import OperatorSettings

PLURAL = "modeldeployments"


def _full(body: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> None:
    """Attach the ModelDeployment handlers to `registry`."""
    writer = StatusWriter(API_VERSION, "ModelDeployment")
    mds, deployments, services, pods, trainingjobs = Cache(), Cache(), Cache(), Cache(), Cache()
    hpas_applied: set[Key] = set()
    def wanted(namespace: str | None, **_: Any) -> bool:
        return settings.handles(namespace)

    selector = {names.LABEL_MODELDEPLOYMENT: kopf.PRESENT}

    async def apply_children(key: Key, md: dict[str, Any], children: list[dict[str, Any]]) -> None:
        uid = md["metadata"].get("uid")
        for child in children:
            kind = child["kind"]
            if kind == "Deployment":
                live = next((d for d in deployments.get(key) if owned_by(d, uid)), None)
            elif kind == "Service":
                live = next((s for s in services.get(key) if owned_by(s, uid)), None)
            else:
                live = None if key not in hpas_applied else child
            if live is not None and subset(child, live):
                continue
            try:
                if live is None or kind == "HorizontalPodAutoscaler":
                    result = await aiokube.apply(child, settings.field_manager)
                else:
                    # Put a hand edit back. Server-side apply would merge list entries it does not own
                    # (a hand-added Service port); a merge patch replaces those lists with exactly Kiln's.
                    meta = {k: child["metadata"][k] for k in ("labels", "annotations") if k in child["metadata"]}
                    result = await aiokube.patch(child["apiVersion"], kind, key[0], child["metadata"]["name"],
                                                     {"metadata": meta, "spec": child["spec"]})
            except ApiException as exc:
                message = f"could not apply {kind} {child['metadata']['name']}: {kube.error_message(exc)}"
                await post_event(md, "Warning", "ApplyFailed", message)
                raise kopf.TemporaryError(message, delay=5) from exc
            if kind == "Deployment":
                deployments.update("MODIFIED", key, result)
            elif kind == "Service":
                services.update("MODIFIED", key, result)
            else:
                hpas_applied.add(key)
            if live is None and kind != "HorizontalPodAutoscaler":
                await post_event(md, "Normal", "Created", f"applied {kind} {child['metadata']['name']}")
            elif live is not None:
                log.info("put back %s %s/%s (it differed from what Kiln renders)", kind, key[0], child["metadata"]["name"])
        if key in hpas_applied and not any(c["kind"] == "HorizontalPodAutoscaler" for c in children):
            await aiokube.delete("autoscaling/v2", "HorizontalPodAutoscaler", key[0],
                                    names.server_deployment(key[1]))
            hpas_applied.discard(key)

    async def reconcile(key: Key, body: dict[str, Any]) -> None:
        async with writer.locks[key]:
            md = writer.view(key, body)
            uid = md["metadata"].get("uid")
            tj_name = ((md.get("spec") or {}).get("model") or {}).get("trainingJob")
            tj = next(iter(trainingjobs.get((key[0], tj_name))), None) if tj_name else None
            resolution = resolve_model(md, tj)
            render_error = ""
            if resolution.model is not None:
                try:
                    children = build_modeldeployment(md, settings, resolution.model)
                except RenderError as exc:
                    render_error = str(exc)
                else:
                    await apply_children(key, md, children)
            deployment = next((d for d in deployments.get(key) if owned_by(d, uid)), None)
            server_pods = [p for p in pods.get(key) if not (p.get("metadata") or {}).get("deletionTimestamp")]
            derived = derive_md_status(md, resolution, deployment, server_pods, settings, render_error=render_error)
            await writer.patch(key, derived.status)
            if derived.event:
                await post_event(md, *derived.event)

    async def safe_reconcile(key: Key) -> None:
        for body in mds.get(key):
            try:
                await reconcile(key, body)
            except (ApiException, kopf.TemporaryError) as exc:
                log.warning("reconcile of ModelDeployment %s/%s failed: %s", key[0], key[1], exc)

    async def reconcile_all() -> None:
        for key in mds:
            await safe_reconcile(key)

    ticker = Ticker(settings.reconcile_interval, reconcile_all)

    @kopf.on.startup(id="modeldeployment-resync", registry=registry)
    async def start_resync(**_: Any) -> None:
        ticker.start()

    @kopf.on.cleanup(id="modeldeployment-resync-stop", registry=registry)
    async def stop_resync(**_: Any) -> None:
        await ticker.stop()

    @kopf.on.event(GROUP, VERSION, PLURAL, id="modeldeployment-event", when=wanted, registry=registry)
    async def md_event(type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            mds.items.pop(key, None)
            writer.forget(key)
            hpas_applied.discard(key)
            return
        mds.items[key] = {"": snapshot(body)}
        await safe_reconcile(key)

    def child_key(namespace: str, annotations: Any) -> Key:
        return namespace, annotations.get(names.ANNOTATION_MODELDEPLOYMENT, "")

    @kopf.on.event("apps", "v1", "deployments", labels=selector, id="md-deployment-event", when=wanted, registry=registry)
    async def deployment_event(type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = child_key(namespace or "", annotations)
        deployments.update(type, key, _full(body))
        await safe_reconcile(key)

    @kopf.on.event("", "v1", "services", labels=selector, id="md-service-event", when=wanted, registry=registry)
    async def service_event(type: str, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> None:
        wanted_label = labels.get(names.LABEL_MODELDEPLOYMENT)
        md_name = next((k for k in mds if k[0] == namespace and names.label_value(k[1]) == wanted_label), None)
        if md_name is None:
            return
        services.update(type, md_name, _full(body))
        await safe_reconcile(md_name)

    @kopf.on.event("", "v1", "pods", labels=selector, id="md-pod-event", when=wanted, registry=registry)
    async def pod_event(type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = child_key(namespace or "", annotations)
        pods.update(type, key, {"metadata": copy.deepcopy(dict(body.get("metadata") or {})),
                                "status": copy.deepcopy(dict(body.get("status") or {}))})
        await safe_reconcile(key)

    @kopf.on.event(GROUP, VERSION, "trainingjobs", id="md-trainingjob-event", when=wanted, registry=registry)
    async def trainingjob_event(type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            trainingjobs.items.pop(key, None)
        else:
            trainingjobs.items[key] = {"": snapshot(body)}
        for md_key in list(mds):
            md = next(iter(mds.get(md_key)), None)
            if md_key[0] == namespace and md and ((md.get("spec") or {}).get("model") or {}).get("trainingJob") == name:
                await safe_reconcile(md_key)
