"""Pure derivation of a ModelDeployment's status from its model resolution, Deployment and Pods."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiln.spec import ModelDeploymentSpec
from kiln_operator import names
from kiln_operator.conditions import now_utc, set_all, set_condition, valid_reason
from kiln_operator.modeldeployment.render import ModelRef, Resolution, grpc_address, service_url
from kiln_operator.podstatus import START_FAILURES, problems, termination_summary, waits_for_gpu
from kiln_operator.settings import OperatorSettings

WARNING_REASONS = START_FAILURES | {"CrashLoopBackOff", "ModelFetchFailed"}

Outcome = tuple[str, str, str]
"""(phase, reason, message)."""


@dataclass
class MDDerived:
    status: dict[str, Any] = field(default_factory=dict)
    event: tuple[str, str, str] | None = None
    stable_ready: bool = False
    """The stable Deployment serves `spec.model`, fully rolled out (a promotion's handoff may end)."""


@dataclass
class CanaryState:
    """What the status needs of `spec.canary`: its model resolution, Deployment and pods."""

    resolution: Resolution | None
    """None: no `spec.canary` (a promotion may still be handing off)."""
    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    handoff: str = ""
    """`spec.canary` is gone but its Deployment still serves: `Promoting` (its model is `spec.model` now, until the
    stable Deployment has rolled it out) or `RollingBack` (until the stable Deployment has a ready pod)."""
    routed: bool = False
    """An HTTPRoute weighs the tracks (else the replica ratio does)."""


def _deployment_condition(dep: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (dep.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _pod_problem(pods: list[dict[str, Any]], gpus: int) -> tuple[str, str] | None:
    """The most telling reason a server pod is not ready, from container and scheduling states."""
    for pod in pods:
        for p in problems(pod):
            if p.reason in START_FAILURES:
                return p.reason, f"pod {p.pod}: {p.detail}"
            if p.container == "fetch-model" and p.term and int(p.term.get("exitCode", 0)) != 0:
                detail = (termination_summary(p.term.get("message")) or {}).get("error") or p.term.get("message") or ""
                return "ModelFetchFailed", f"pod {p.pod}: fetching the model failed: {detail}".strip()
            if p.reason in ("CrashLoopBackOff", "Exited"):
                return "CrashLoopBackOff", (f"pod {p.pod}: server keeps exiting (restarts {p.restarts}, "
                                            f"exit code {p.exit_code}): {p.detail}").strip()
            if p.reason == "Unschedulable":
                return ("WaitingForGPU" if waits_for_gpu(p, gpus) else "Unschedulable"), f"pod {p.pod}: {p.detail}"
    return None


def _rollout(md: dict[str, Any], model: ModelRef, deployment: dict[str, Any] | None, pods: list[dict[str, Any]],
             new: dict[str, Any]) -> Outcome:
    """Where serving `model` stands: Ready, Deploying (with the pods' problem) or Failed (no progress)."""
    spec, old = ModelDeploymentSpec.from_dict(md.get("spec")), md.get("status") or {}
    dep_status = (deployment or {}).get("status") or {}
    want = (deployment or {}).get("spec", {}).get("replicas", 1)
    ready = int(dep_status.get("readyReplicas") or 0)
    updated = int(dep_status.get("updatedReplicas") or 0)
    total = int(dep_status.get("replicas") or 0)
    available = _deployment_condition(deployment or {}, "Available")
    progressing = _deployment_condition(deployment or {}, "Progressing")
    observed = int(dep_status.get("observedGeneration") or 0) >= int((deployment or {}).get("metadata", {}).get("generation") or 0)
    rolled_out = deployment is not None and observed and updated >= want and total == updated and ready >= want
    new.update(replicas=total, readyReplicas=ready, url=service_url(md))
    new["grpcAddress"] = grpc_address(md) or None  # None removes an address left from before gRPC was turned off
    problem = _pod_problem(pods, spec.resources.gpus)
    if progressing and progressing.get("status") == "False":
        message = progressing.get("message") or "the rollout made no progress"
        if problem:
            message += f"; {problem[0]}: {problem[1]}"
        return "Failed", progressing.get("reason") or "ProgressDeadlineExceeded", message
    if rolled_out and available and available.get("status") == "True" and (ready > 0 or want == 0):
        new["model"] = model.as_status()
        return "Ready", "Ready", f"{ready}/{want} replicas ready, serving {model.uri}"
    if problem:
        return "Deploying", problem[0], problem[1]
    reason = "RollingOut" if old.get("model") and old["model"] != model.as_status() else "Deploying"
    return "Deploying", reason, f"{ready}/{want} replicas ready, {updated} updated; rolling out {model.uri}"


def _autoscaler_condition(md: dict[str, Any], settings: OperatorSettings, conds: list[dict[str, Any]], now: datetime,
                          gen: int | None) -> list[dict[str, Any]]:
    autoscaling = ModelDeploymentSpec.from_dict(md.get("spec")).autoscaling
    if autoscaling is None:
        return conds
    if settings.features.hpa_v2:
        return set_condition(conds, "AutoscalerReady", "True", "HorizontalPodAutoscaler",
                             f"HPA {names.server_deployment(md['metadata']['name'])} scales on CPU", now, gen)
    return set_condition(conds, "AutoscalerReady", "False", "AutoscalingUnavailable",
                         f"autoscaling/v2 is not served by this API server ({settings.features.server_version}); "
                         f"running spec.autoscaling.minReplicas={autoscaling.min_replicas} replicas", now, gen)


def _available(deployment: dict[str, Any] | None, canary: dict[str, Any] | None = None) -> tuple[str, str, str]:
    """(status, reason, message) of `Available`: some replica serves requests, whichever model (or track) it has."""
    if _ready_count(canary) > 0 and _available(deployment)[0] == "False":
        return "True", "MinimumReplicasAvailable", f"{_ready_count(canary)} canary replica(s) serving"
    dep_status = (deployment or {}).get("status") or {}
    ready = int(dep_status.get("readyReplicas") or 0)
    cond = _deployment_condition(deployment or {}, "Available")
    if deployment is None:
        return "False", "NoDeployment", "the server Deployment does not exist yet"
    if cond and cond.get("status") == "True" and ready > 0:
        return "True", "MinimumReplicasAvailable", f"{ready} replica(s) serving"
    return "False", valid_reason((cond or {}).get("reason") or "", "NoReplicasReady"), (cond or {}).get("message") or "no replica is ready"


def _ready_count(deployment: dict[str, Any] | None) -> int:
    return int(((deployment or {}).get("status") or {}).get("readyReplicas") or 0)


def _effective_percent(md: dict[str, Any], canary: CanaryState, stable: dict[str, Any] | None) -> int:
    """The canary's share of the requests now: the route's weight, or its share of the ready pods."""
    c_ready, s_ready = _ready_count(canary.deployment), _ready_count(stable)
    spec = ModelDeploymentSpec.from_dict(md.get("spec"))
    if canary.routed and not canary.handoff:
        return spec.canary.traffic_percent if spec.canary and c_ready else 0
    return round(100 * c_ready / (c_ready + s_ready)) if c_ready + s_ready else 0


def _canary(md: dict[str, Any], canary: CanaryState | None, stable: dict[str, Any] | None,
            ) -> tuple[tuple[str, str, str], dict[str, Any] | None, Outcome | None]:
    """(CanaryReady (status, reason, message), `status.canary` (None removes it), the outcome it imposes on
    the whole resource while the canary is not rolled out (None: none))."""
    if canary is None or (canary.resolution is None and not canary.handoff):
        return ("False", "NoCanary", "spec.canary is not set"), None, None
    old = (md.get("status") or {}).get("canary") or {}
    dep_status = (canary.deployment or {}).get("status") or {}
    out = {"model": old.get("model"), "replicas": int(dep_status.get("replicas") or 0), "readyReplicas": _ready_count(canary.deployment),
           "trafficPercent": _effective_percent(md, canary, stable), "routing": "HTTPRoute" if canary.routed else "ReplicaRatio"}
    if canary.handoff or canary.resolution is None:
        name = names.server_deployment(md["metadata"]["name"])
        why = (f"the canary's model is spec.model now: the canary serves until Deployment {name} has rolled it out"
               if canary.handoff == "Promoting" else f"spec.canary was removed: the canary serves until Deployment {name} has a ready pod")
        return ("False", canary.handoff or "Promoting", f"{why}, then it is deleted"), out, None
    res = canary.resolution
    if res.model is None:
        outcome = ("Failed" if res.failed else "Deploying", f"Canary{res.reason}", f"canary: {res.message}")
        return ("False", res.reason, res.message), out, outcome
    view = {**md, "status": {**(md.get("status") or {}), "model": old.get("model")}}
    rolled: dict[str, Any] = {}
    phase, reason, message = _rollout(view, res.model, canary.deployment, canary.pods, rolled)
    out["model"] = rolled.get("model") or old.get("model")
    if phase == "Ready":
        want = int((canary.deployment or {}).get("spec", {}).get("replicas") or 0)
        how = "the HTTPRoute's weights" if canary.routed else "replica ratio"
        return (("True", "NoTraffic" if want == 0 else "CanaryAvailable",
                 f"{message}; {out['trafficPercent']}% of the requests by {how}"), out, None)
    return ("False", reason, message), out, (phase, valid_reason(f"Canary{reason}", "CanaryDeploying"), f"canary: {message}")


def derive_md_status(md: dict[str, Any], resolution: Resolution, deployment: dict[str, Any] | None,
                     pods: list[dict[str, Any]], settings: OperatorSettings, now: datetime | None = None,
                     render_error: str = "", render_reason: str = "InvalidSpec", canary: CanaryState | None = None) -> MDDerived:
    """The status a ModelDeployment should have, from its model resolution and its Deployment.

    Every condition is present from the first write: Ready=False with a reason from creation on (so
    kstatus does not take an unreconciled ModelDeployment for a ready one), Reconciling while it waits
    for a model or rolls one out, Stalled when it cannot get on without a change (a failed TrainingJob,
    an invalid spec or a policy violation, a rollout past its progress deadline).
    """
    now = now or now_utc()
    old = md.get("status") or {}
    gen = (md.get("metadata") or {}).get("generation")
    conds = [c for c in old.get("conditions") or [] if c.get("type") != "ModelReady"]  # ModelResolved's old name
    new: dict[str, Any] = {"observedGeneration": gen}
    model = resolution.model
    if model is None:
        phase = "Failed" if resolution.failed or render_error else "WaitingForModel"
        reason, message = resolution.reason, resolution.message
        conds = set_condition(conds, "ModelResolved", "False", reason, message, now, gen)
    else:
        resolved = "False" if resolution.previous and resolution.reason != "Retraining" else "True"
        conds = set_condition(conds, "ModelResolved", resolved, resolution.reason or "ModelResolved",
                              resolution.message or f"model {model.uri}", now, gen)
        phase, reason, message = _rollout(md, model, deployment, pods, new)
        if resolution.previous and phase == "Ready":
            message = f"{message}; {resolution.message}"
        conds = set_condition(conds, "PredictorReady", "True" if phase == "Ready" else "False", reason, message, now, gen)
        conds = _autoscaler_condition(md, settings, conds, now, gen)
    stable_ready = model is not None and phase == "Ready"
    canary_cond, new["canary"], imposed = _canary(md, canary, deployment)
    if imposed and phase in ("Ready", "Deploying") and not (phase == "Deploying" and imposed[0] != "Failed"):
        phase, reason, message = imposed
    if render_error:
        phase, reason, message = "Failed", render_reason, render_error
    ready = "True" if phase == "Ready" else "False"
    conds = set_all(conds, [
        ("CanaryReady", *canary_cond),
        ("Available", *_available(deployment, (canary or CanaryState(None)).deployment)),
        ("Ready", ready, reason, message),
        ("Reconciling", "True" if phase in ("WaitingForModel", "Deploying") else "False", reason, message),
        ("Stalled", "True" if phase == "Failed" else "False", reason, message),
    ], now, gen)
    new.update(phase=phase, reason=reason, message=message[:2048], conditions=conds)
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    event = None
    if (phase, reason) != (old.get("phase"), old.get("reason")):
        kind = "Warning" if phase == "Failed" or reason.removeprefix("Canary") in WARNING_REASONS else "Normal"
        event = (kind, reason or phase, f"{phase}: {message}")
    return MDDerived(changed, event, stable_ready)
