"""ModelDeployment controller: serves a model (from a TrainingJob or a URI) as Deployment + Service (+ HPA).

Children are kept by server-side apply with Kiln's field manager: whenever a watched child differs
from what Kiln renders (a hand edit), it is applied again. Status follows the Deployment and its Pods.
Like TrainingJobs, no finalizer: children go by ownerReference garbage collection.

`ModelDeploymentController` holds the watch caches and its methods are the handlers; `register`
attaches them to a Kopf registry.
"""

from __future__ import annotations

import copy
from typing import Any

import kopf

from kiln import API_VERSION, GROUP, VERSION, kube
from kiln.kube import ApiError
from kiln.policy import REASON as POLICY_VIOLATION
from kiln.policy import describe
from kiln.spec import ModelDeploymentSpec
from kiln_operator import metrics, names, policycheck
from kiln_operator.conditions import condition
from kiln_operator.modeldeployment.follow import canary_view, follows, resolve_followed
from kiln_operator.modeldeployment.render import Resolution, build_modeldeployment, routed, serves
from kiln_operator.modeldeployment.status import CanaryState, MDDerived, derive_md_status
from kiln_operator.runtime import Cache, Key, StatusWriter, Ticker, log, owned_by, post_event, snapshot, subset
from kiln_operator.settings import OperatorSettings
from kiln_operator.templating import RenderError

PLURAL = "modeldeployments"


def _full(body: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


class ModelDeploymentController:
    """The ModelDeployment handlers and the state they share (one instance per operator)."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.writer = StatusWriter(API_VERSION, "ModelDeployment")
        self.mds, self.deployments, self.services, self.pods, self.trainingjobs = Cache(), Cache(), Cache(), Cache(), Cache()
        self.hpas_applied: dict[Key, dict[str, Any]] = {}
        """HPAs applied, as the API server answered: not watched, but compared with what is rendered, so an edit
        to `spec.autoscaling` is applied (and a hand edit put back at the next change or operator start)."""
        self.netpols_applied: dict[Key, dict[str, Any]] = {}
        """NetworkPolicies applied, kept and compared like the HPAs."""
        self.routes_applied: dict[Key, dict[str, Any]] = {}
        self.routes_checked: set[Key] = set()
        """ModelDeployments whose leftover HTTPRoute was looked for since this operator started (prune)."""
        """HTTPRoutes applied (`spec.service.gateway`), as the API server answered: not watched, but compared with
        what is rendered, so a new weight is applied."""
        self.ticker = Ticker(settings.reconcile_interval, self.reconcile_all)

    def wanted(self, namespace: str | None, **_: Any) -> bool:
        return self.settings.handles(namespace)

    # -------------------------------------------------------------------------------- lifecycle
    async def start_resync(self, **_: Any) -> None:
        self.ticker.start()

    async def stop_resync(self, **_: Any) -> None:
        await self.ticker.stop()

    async def reconcile_all(self) -> None:
        for key in self.mds:
            await self.safe_reconcile(key)

    async def safe_reconcile(self, key: Key) -> None:
        for body in self.mds.get(key):
            try:
                await self.reconcile(key, body)
            except (ApiError, kopf.TemporaryError) as exc:
                log.warning("reconcile of ModelDeployment %s/%s failed: %s", key[0], key[1], exc)

    # -------------------------------------------------------------------------------- reconcile
    def metric_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """ModelDeployments by readiness, for /metrics (read at scrape time, no API calls)."""
        ready = {"true": 0, "false": 0}
        for key in list(self.mds.items):
            for body in list((self.mds.items.get(key) or {}).values()):
                cond = condition(self.writer.view(key, body)["status"], "Ready")
                ready["true" if cond and cond.get("status") == "True" else "false"] += 1
        return [("kiln_operator_modeldeployments", {"ready": r}, n) for r, n in ready.items()]

    async def reconcile(self, key: Key, body: dict[str, Any]) -> None:
        with metrics.reconciling("ModelDeployment"):
            await self._reconcile(key, body)

    async def _reconcile(self, key: Key, body: dict[str, Any]) -> None:
        async with self.writer.locks[key]:
            md = self.writer.view(key, body)
            derived, promoted = await self._pass(key, md)
            if promoted:  # the canary Deployment is gone: render (route, Services) and derive the status without it
                derived, _ = await self._pass(key, md)
            await self.writer.patch(key, derived.status, md)
            if derived.event:
                await post_event(md, *derived.event)

    def _owned(self, cache: Cache, key: Key, uid: str | None, name: str) -> dict[str, Any] | None:
        return next((o for o in cache.get(key) if owned_by(o, uid) and o["metadata"]["name"] == name), None)

    async def _pass(self, key: Key, md: dict[str, Any]) -> tuple[MDDerived, bool]:
        """Render, apply and derive the status once; True when it ended a promotion's handoff (deleted the canary)."""
        uid = md["metadata"].get("uid")
        namespace_tjs = [t for k in self.trainingjobs if k[0] == key[0] for t in self.trainingjobs.get(k)]
        resolution = resolve_followed(md, namespace_tjs)
        cview = canary_view(md)
        canary_res = resolve_followed(cview, namespace_tjs) if cview is not None else None
        canary_dep = self._owned(self.deployments, key, uid, names.canary_deployment(key[1]))
        handoff = self._handoff(key, uid, resolution, canary_dep) if cview is None else ""
        render_error, render_reason = await self._render_and_apply(key, md, resolution, canary_res, canary_dep, handoff)
        deployment = self._owned(self.deployments, key, uid, names.server_deployment(key[1]))
        canary_dep = self._owned(self.deployments, key, uid, names.canary_deployment(key[1]))
        live_pods = [p for p in self.pods.get(key) if not (p.get("metadata") or {}).get("deletionTimestamp")]
        canary_pods: list[dict[str, Any]] = []
        server_pods: list[dict[str, Any]] = []
        for pod in live_pods:
            track = ((pod.get("metadata") or {}).get("labels") or {}).get(names.LABEL_TRACK)
            (canary_pods if track == "canary" else server_pods).append(pod)
        spec = ModelDeploymentSpec.from_dict(md.get("spec"))
        state = CanaryState(canary_res, canary_dep, canary_pods, handoff if canary_dep is not None else "", routed(spec, self.settings))
        derived = derive_md_status(md, resolution, deployment, server_pods, self.settings, render_error=render_error,
                                   render_reason=render_reason, canary=state)
        if state.handoff == "Promoting" and derived.stable_ready and canary_dep is not None and not render_error:
            served = resolution.model.uri if resolution.model else ""
            await self._delete(key, md, "Deployment", canary_dep, "Promoted",
                               f"{names.server_deployment(key[1])} serves the promoted model {served}: deleted the canary Deployment")
            return derived, True
        return derived, False

    def _handoff(self, key: Key, uid: str | None, resolution: Resolution, canary_dep: dict[str, Any] | None) -> str:
        """Without `spec.canary`, whether its Deployment still serves: `Promoting` when its model is `spec.model`'s
        (no pod of it restarts), `RollingBack` while the stable Deployment has no ready pod (a canary at 100 %);
        "" when it is to be deleted at once (or there is none)."""
        if canary_dep is None:
            return ""
        if resolution.model is not None and serves(canary_dep, resolution.model):
            return "Promoting"
        stable = self._owned(self.deployments, key, uid, names.server_deployment(key[1]))
        return "RollingBack" if _ready(stable) == 0 and _ready(canary_dep) > 0 else ""

    async def _render_and_apply(self, key: Key, md: dict[str, Any], resolution: Resolution, canary_res: Resolution | None,
                                canary_dep: dict[str, Any] | None, handoff: str) -> tuple[str, str]:
        """Apply what the ModelDeployment renders to and delete what it no longer does; (error, reason) when it cannot."""
        if resolution.model is None:
            return "", "InvalidSpec"
        base = self.settings.tenant_policy()
        policy = await policycheck.effective(base, key[0])
        canary = canary_res.model if canary_res else None
        violations = await policycheck.check("ModelDeployment", md, base, resolution.model.uri, resolution.model.sha256)
        if canary is not None and not violations:
            violations = await policycheck.check("ModelDeployment", md, base, canary.uri, canary.sha256)
        if violations:
            return describe(violations), POLICY_VIOLATION
        live_canary = _ready(canary_dep)
        stable_dep = self._owned(self.deployments, key, md["metadata"].get("uid"), names.server_deployment(key[1]))
        try:
            children = build_modeldeployment(md, self.settings, resolution.model, policy.fetch, canary=canary,
                                             handoff=(_ready(stable_dep), live_canary) if handoff else None,
                                             canary_ready=live_canary)
        except RenderError as exc:
            return str(exc), "InvalidSpec"
        await self.apply_children(key, md, children)
        await self.prune(key, md, children, keep_canary=bool(handoff))
        return "", "InvalidSpec"

    def _live(self, key: Key, child: dict[str, Any], uid: str | None) -> dict[str, Any] | None:
        """The live copy of a child from the watch caches (an applied HPA, NetworkPolicy or HTTPRoute counts as
        itself: they are not watched)."""
        kind, name = child["kind"], child["metadata"]["name"]
        if kind == "Deployment":
            return self._owned(self.deployments, key, uid, name)
        if kind == "Service":
            return self._owned(self.services, key, uid, name)
        if kind == "HTTPRoute":
            return self.routes_applied.get(key)
        applied = self.netpols_applied if kind == "NetworkPolicy" else self.hpas_applied
        return applied.get(key)

    async def apply_children(self, key: Key, md: dict[str, Any], children: list[dict[str, Any]]) -> None:
        uid = md["metadata"].get("uid")
        for child in children:
            live = self._live(key, child, uid)
            if live is not None and subset(child, live):
                continue
            await self._apply(key, md, child, live)
        if key in self.hpas_applied and not any(c["kind"] == "HorizontalPodAutoscaler" for c in children):
            await kube.api().delete("autoscaling/v2", "HorizontalPodAutoscaler", key[0], names.server_deployment(key[1]))
            self.hpas_applied.pop(key, None)

    async def prune(self, key: Key, md: dict[str, Any], children: list[dict[str, Any]], keep_canary: bool) -> None:
        """Delete the canary's children Kiln no longer renders: its Deployment (rollback: at once, unless it is being
        handed off: `keep_canary`), the per-track Services and the HTTPRoute (Gateway routing turned off)."""
        uid, name = md["metadata"].get("uid"), key[1]
        rendered = {(c["kind"], c["metadata"]["name"]) for c in children}
        dep = self._owned(self.deployments, key, uid, names.canary_deployment(name))
        if dep is not None and not keep_canary and ("Deployment", dep["metadata"]["name"]) not in rendered:
            await self._delete(key, md, "Deployment", dep, "CanaryRemoved",
                               f"spec.canary was removed: deleted Deployment {dep['metadata']['name']}")
        for track in ("stable", "canary"):
            svc = self._owned(self.services, key, uid, names.track_service(name, track))
            if svc is not None and ("Service", svc["metadata"]["name"]) not in rendered and not (keep_canary and track == "canary"):
                await self._delete(key, md, "Service", svc)
        if not any(c["kind"] == "HTTPRoute" for c in children) and (key in self.routes_applied or key not in self.routes_checked):
            await self._drop_route(key, uid, name)

    async def _drop_route(self, key: Key, uid: str | None, name: str) -> None:
        """Delete the HTTPRoute Kiln no longer renders. The one applied since start is known; once after a
        start, one left by an earlier operator (spec.service.gateway removed while it was down) is read back
        and deleted if this ModelDeployment owns it."""
        self.routes_checked.add(key)
        api_version = self.settings.features.http_route
        if api_version:
            if key in self.routes_applied:
                await kube.api().delete(api_version, "HTTPRoute", key[0], names.http_route(name))
            else:
                live = await kube.api().get(api_version, "HTTPRoute", key[0], names.http_route(name))
                if live is not None and uid and owned_by(live, uid):
                    await kube.api().delete(api_version, "HTTPRoute", key[0], names.http_route(name))
                    log.info("deleted HTTPRoute %s/%s: spec.service.gateway is gone", key[0], names.http_route(name))
        self.routes_applied.pop(key, None)

    async def _delete(self, key: Key, md: dict[str, Any], kind: str, child: dict[str, Any], reason: str = "", message: str = "") -> None:
        """Delete a watched child (Deployment or Service) and drop it from its cache; an Event with `reason`."""
        await kube.api().delete("apps/v1" if kind == "Deployment" else "v1", kind, key[0], child["metadata"]["name"])
        (self.deployments if kind == "Deployment" else self.services).update("DELETED", key, child)
        if reason:
            await post_event(md, "Normal", reason, message)

    async def _apply(self, key: Key, md: dict[str, Any], child: dict[str, Any], live: dict[str, Any] | None) -> None:
        kind = child["kind"]
        try:
            if live is None or kind in ("HorizontalPodAutoscaler", "NetworkPolicy", "HTTPRoute"):
                result = await kube.api().apply(child, self.settings.field_manager)
            else:
                # Put a hand edit back. Server-side apply would merge list entries it does not own
                # (a hand-added Service port); a merge patch replaces those lists with exactly Kiln's.
                meta = {k: child["metadata"][k] for k in ("labels", "annotations") if k in child["metadata"]}
                result = await kube.api().patch(child["apiVersion"], kind, key[0], child["metadata"]["name"],
                                             {"metadata": meta, "spec": child["spec"]})
        except ApiError as exc:
            message = f"could not apply {kind} {child['metadata']['name']}: {kube.error_message(exc)}"
            await post_event(md, "Warning", "ApplyFailed", message)
            raise kopf.TemporaryError(message, delay=5) from exc
        if kind == "Deployment":
            self.deployments.update("MODIFIED", key, result)
        elif kind == "Service":
            self.services.update("MODIFIED", key, result)
        elif kind == "NetworkPolicy":
            self.netpols_applied[key] = result
        elif kind == "HTTPRoute":
            self.routes_applied[key] = result
        else:
            self.hpas_applied[key] = result
        if live is None and kind not in ("HorizontalPodAutoscaler", "NetworkPolicy", "HTTPRoute"):
            await post_event(md, "Normal", "Created", f"applied {kind} {child['metadata']['name']}")
        elif live is not None:
            log.info("put back %s %s/%s (it differed from what Kiln renders)", kind, key[0], child["metadata"]["name"])

    # -------------------------------------------------------------------------------- watch events
    async def md_event(self, type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            self.mds.items.pop(key, None)
            self.writer.forget(key)
            self.hpas_applied.pop(key, None)
            self.netpols_applied.pop(key, None)
            self.routes_applied.pop(key, None)
            self.routes_checked.discard(key)
            return
        self.mds.items[key] = {"": snapshot(body)}
        await self.safe_reconcile(key)

    @staticmethod
    def child_key(namespace: str, annotations: Any) -> Key:
        return namespace, annotations.get(names.ANNOTATION_MODELDEPLOYMENT, "")

    async def deployment_event(self, type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body,
                               **_: Any) -> None:
        key = self.child_key(namespace or "", annotations)
        self.deployments.update(type, key, _full(body))
        await self.safe_reconcile(key)

    async def service_event(self, type: str, namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> None:
        wanted_label = labels.get(names.LABEL_MODELDEPLOYMENT)
        md_name = next((k for k in self.mds if k[0] == namespace and names.label_value(k[1]) == wanted_label), None)
        if md_name is None:
            return
        self.services.update(type, md_name, _full(body))
        await self.safe_reconcile(md_name)

    async def pod_event(self, type: str, namespace: str | None, annotations: kopf.Annotations, body: kopf.Body, **_: Any) -> None:
        key = self.child_key(namespace or "", annotations)
        self.pods.update(type, key, {"metadata": copy.deepcopy(dict(body.get("metadata") or {})),
                                     "status": copy.deepcopy(dict(body.get("status") or {}))})
        await self.safe_reconcile(key)

    async def trainingjob_event(self, type: str, namespace: str | None, name: str, body: kopf.Body, **_: Any) -> None:
        key = (namespace or "", name)
        if type == "DELETED":
            self.trainingjobs.items.pop(key, None)
        else:
            self.trainingjobs.items[key] = {"": snapshot(body)}
        tj = {"metadata": dict(body.get("metadata") or {})}
        for md_key in list(self.mds):
            md = next(iter(self.mds.get(md_key)), None)
            view = self.writer.view(md_key, md) if md else None
            if md_key[0] == namespace and view and (follows(view, tj) or follows(canary_view(view) or {}, tj)):
                await self.safe_reconcile(md_key)


def _ready(deployment: dict[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)


def register(registry: kopf.OperatorRegistry, settings: OperatorSettings) -> ModelDeploymentController:
    """Attach a ModelDeployment controller's handlers to `registry`."""
    c = ModelDeploymentController(settings)
    metrics.STATE.set_source("ModelDeployment", c.metric_samples)
    selector = {names.LABEL_MODELDEPLOYMENT: kopf.PRESENT}
    kopf.on.startup(id="modeldeployment-resync", registry=registry)(c.start_resync)
    kopf.on.cleanup(id="modeldeployment-resync-stop", registry=registry)(c.stop_resync)
    kopf.on.event(GROUP, VERSION, PLURAL, id="modeldeployment-event", when=c.wanted, registry=registry)(c.md_event)
    kopf.on.event("apps", "v1", "deployments", labels=selector, id="md-deployment-event", when=c.wanted,
                  registry=registry)(c.deployment_event)
    kopf.on.event("", "v1", "services", labels=selector, id="md-service-event", when=c.wanted, registry=registry)(c.service_event)
    kopf.on.event("", "v1", "pods", labels=selector, id="md-pod-event", when=c.wanted, registry=registry)(c.pod_event)
    kopf.on.event(GROUP, VERSION, "trainingjobs", id="md-trainingjob-event", when=c.wanted, registry=registry)(c.trainingjob_event)
    return c
