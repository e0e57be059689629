"""ModelDeployment logic, pure: which model to serve, what to render for it, and what status follows.

The handler (handlers/modeldeployment.py) only feeds these functions from watch caches and applies
what they return, so every rule here is unit-tested without a cluster.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kiln.serverargs import serve_args
from kiln_operator import names
from kiln_operator.render import (
    CONTAINER_SECURITY_CONTEXT,
    POD_SECURITY_CONTEXT,
    PVC_ROOT,
    RenderError,
    owner_references,
    parse_pvc,
    render_template,
    resources,
    tolerations,
)
from kiln_operator.settings import OperatorSettings
from kiln_operator.status import now_utc, set_condition, termination_summary

SERVER_PORT = 8080
FETCH_DIR = "/models"
ANNOTATION_SHA = "kiln.dev/model-sha256"
ANNOTATION_URI = "kiln.dev/model-uri"
POD_START_FAILURES = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"}


@dataclass(frozen=True)
class ModelRef:
    """The model a ModelDeployment should serve."""

    uri: str
    sha256: str = ""
    trainingJob: str = ""
    format: str = "onnx"

    def as_status(self) -> dict[str, Any]:
        out = {"uri": self.uri, "format": self.format}
        if self.sha256:
            out["sha256"] = self.sha256
        if self.trainingJob:
            out["trainingJob"] = self.trainingJob
        return out


@dataclass
class Resolution:
    """Either a model, or why there is none yet (reason, message, failed?)."""

    model: ModelRef | None = None
    reason: str = ""
    message: str = ""
    failed: bool = False


def resolve_model(md: dict[str, Any], tj: dict[str, Any] | None) -> Resolution:
    """Pick the model: `spec.model.uri`, or the result of a succeeded TrainingJob."""
    spec_model = (md.get("spec") or {}).get("model") or {}
    fmt = spec_model.get("format") or "onnx"
    if spec_model.get("uri"):
        return Resolution(ModelRef(spec_model["uri"], spec_model.get("sha256", ""), "", fmt))
    name = spec_model.get("trainingJob", "")
    served = ((md.get("status") or {}).get("model") or {})
    if tj is None:
        if served.get("uri") and served.get("trainingJob") == name:
            # The TrainingJob is gone, its model is not: keep serving what is deployed.
            return Resolution(ModelRef(served["uri"], served.get("sha256", ""), name, served.get("format", fmt)),
                              "TrainingJobNotFound", f"TrainingJob {name} no longer exists; serving its last model")
        return Resolution(None, "TrainingJobNotFound", f"TrainingJob {name} does not exist (yet)")
    st = tj.get("status") or {}
    phase = st.get("phase") or "Pending"
    if phase == "Failed":
        why = f"TrainingJob {name} failed: {st.get('reason', '')}: {st.get('message', '')}"
        return Resolution(None, "TrainingJobFailed", why, failed=True)
    if phase != "Succeeded":
        progress = st.get("progress") or {}
        detail = f" ({progress.get('percent')}%)" if progress.get("percent") is not None else ""
        return Resolution(None, "TrainingJobNotSucceeded", f"waiting for TrainingJob {name}: {phase}{detail}")
    result = st.get("result") or {}
    if fmt == "onnx":
        uri, sha = result.get("modelUri"), result.get("onnxSha256", "")
    else:
        entry = next((f for f in result.get("formats") or [] if f.get("format") == fmt), None)
        uri, sha = (entry or {}).get("uri"), (entry or {}).get("sha256", "")
    if not uri:
        return Resolution(None, "ModelNotExported", f"TrainingJob {name} succeeded but reported no {fmt} model "
                          f"(add {fmt!r} to its spec.output.formats)", failed=True)
    return Resolution(ModelRef(uri, sha, name, fmt))


def _model_location(model: ModelRef) -> tuple[str, dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """(path the server loads, fetch init container, volumes, server mounts) for a model URI."""
    pvc = parse_pvc(model.uri, "spec.model.uri")
    if pvc:
        claim, path = pvc
        volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
        mounts = [{"name": "model", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}]
        return f"{PVC_ROOT}/{claim}/{path}", None, volumes, mounts
    scheme = model.uri.split("://", 1)[0] if "://" in model.uri else "file"
    if scheme in ("s3", "http", "https", "gs"):
        target = f"{FETCH_DIR}/model.onnx"
        command = ["python", "-m", "kiln_server.fetch", model.uri, target]
        if model.sha256:
            command += ["--sha256", model.sha256]
        volumes = [{"name": "model", "emptyDir": {}}]
        fetch = {"command": command, "mounts": [{"name": "model", "mountPath": FETCH_DIR}, {"name": "tmp", "mountPath": "/tmp"}]}
        return target, fetch, volumes, [{"name": "model", "mountPath": FETCH_DIR, "readOnly": True}]
    if scheme == "file":
        return model.uri[len("file://"):] if model.uri.startswith("file://") else model.uri, None, [], []
    raise RenderError("spec.model.uri", f"unsupported scheme {scheme!r}: use pvc://, s3://, http(s):// or file://")


def model_name(md: dict[str, Any]) -> str:
    return (md.get("spec") or {}).get("modelName") or md["metadata"]["name"]


def service_url(md: dict[str, Any]) -> str:
    meta = md["metadata"]
    return f"http://{names.server_service(meta['name'])}.{meta.get('namespace') or 'default'}.svc.cluster.local/v2/models/{model_name(md)}"


def build_modeldeployment(md: dict[str, Any], settings: OperatorSettings, model: ModelRef | None) -> list[dict[str, Any]]:
    """Deployment, Service and (when asked and served by the API) HPA for a ModelDeployment.

    Without a resolved model (`kiln render` of a ModelDeployment that waits for a TrainingJob), the
    model path shows as the TrainingJob's placeholder so the preview is still complete.
    """
    spec = copy.deepcopy(md.get("spec") or {})
    meta = md["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or "default"
    if model is None:
        tj = (spec.get("model") or {}).get("trainingJob", "")
        uri = (spec.get("model") or {}).get("uri") or f"file:///resolved-when-trainingjob-{tj}-succeeds/model.onnx"
        model = ModelRef(uri, (spec.get("model") or {}).get("sha256", ""), tj)
    path, fetch, volumes, mounts = _model_location(model)
    labels = {**names.standard_labels(name, "server", "kiln-server"), names.LABEL_MODELDEPLOYMENT: names.label_value(name)}
    selector = {names.LABEL_MODELDEPLOYMENT: names.label_value(name), "app.kubernetes.io/component": "server"}
    args = serve_args(spec, model=path, name=model_name(md), host="0.0.0.0", port=SERVER_PORT, sha256=model.sha256)
    autoscaling = spec.get("autoscaling")
    if autoscaling:
        autoscaling = {"minReplicas": 1, "targetCPUUtilization": 80, **autoscaling}
    hpa = bool(autoscaling) and settings.features.hpa_v2
    replicas: int | None = None if hpa else (int(autoscaling["minReplicas"]) if autoscaling else int(spec.get("replicas", 1)))
    startup = int(spec.get("startupTimeoutSeconds") or 600)
    ctx = {
        "deployment": names.server_deployment(name),
        "service": names.server_service(name),
        "namespace": namespace,
        "labels": labels,
        "selector": selector,
        "annotations": {names.ANNOTATION_MODELDEPLOYMENT: name},
        "pod_annotations": {names.ANNOTATION_MODELDEPLOYMENT: name, ANNOTATION_URI: model.uri, ANNOTATION_SHA: model.sha256 or "unknown"},
        "owner_references": owner_references({**md, "kind": "ModelDeployment"}),
        "replicas": replicas,
        "progress_deadline": int(spec.get("progressDeadlineSeconds") or 600),
        "image": spec.get("image") or settings.server_image,
        "image_pull_policy": spec.get("imagePullPolicy") or settings.image_pull_policy,
        "image_pull_secrets": spec.get("imagePullSecrets") or [],
        "scheduling": {"nodeSelector": {}, "priorityClassName": "", **(spec.get("scheduling") or {})},
        "tolerations": tolerations(spec),
        "pod_security_context": POD_SECURITY_CONTEXT,
        "container_security_context": CONTAINER_SECURITY_CONTEXT,
        "fetch": fetch,
        "args": args,
        "port": SERVER_PORT,
        "startup_failures": max(1, startup // 2),
        "resources": resources(spec),
        "volume_mounts": [{"name": "tmp", "mountPath": "/tmp"}, *mounts],
        "volumes": [{"name": "tmp", "emptyDir": {}}, *volumes],
        "service_type": (spec.get("service") or {}).get("type", "ClusterIP"),
        "service_port": int((spec.get("service") or {}).get("port", 80)),
        "autoscaling": autoscaling,
    }
    out = render_template("modeldeployment-deployment.yaml.j2", **ctx)
    out += render_template("modeldeployment-service.yaml.j2", **ctx)
    if hpa:
        out += render_template("modeldeployment-hpa.yaml.j2", **ctx)
    return out


@dataclass
class MDDerived:
    status: dict[str, Any] = field(default_factory=dict)
    event: tuple[str, str, str] | None = None


def _deployment_condition(dep: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in (dep.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _pod_problem(pods: list[dict[str, Any]], gpus: int) -> tuple[str, str] | None:
    """The most telling reason a server pod is not ready, from container and scheduling states."""
    for pod in pods:
        st = pod.get("status") or {}
        pname = pod["metadata"]["name"]
        for cs in list(st.get("initContainerStatuses") or []) + list(st.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            term = (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated") or {}
            if waiting.get("reason") in POD_START_FAILURES:
                return waiting["reason"], f"pod {pname}: {waiting.get('message') or cs.get('image')}"
            if cs.get("name") == "fetch-model" and term and int(term.get("exitCode", 0)) != 0:
                detail = (termination_summary(term.get("message")) or {}).get("error") or term.get("message") or ""
                return "ModelFetchFailed", f"pod {pname}: fetching the model failed: {detail}".strip()
            if waiting.get("reason") == "CrashLoopBackOff" or (term and int(term.get("exitCode", 0)) != 0):
                detail = (termination_summary(term.get("message")) or {}).get("error") or term.get("message") or term.get("reason") or ""
                return "CrashLoopBackOff", (f"pod {pname}: server keeps exiting (restarts {cs.get('restartCount', 0)}, "
                                            f"exit code {term.get('exitCode', '?')}): {detail}").strip()
        for cond in st.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                text = cond.get("message") or ""
                return ("WaitingForGPU" if gpus > 0 or "nvidia.com/gpu" in text else "Unschedulable"), f"pod {pname}: {text}"
    return None


def derive_md_status(md: dict[str, Any], resolution: Resolution, deployment: dict[str, Any] | None,
                     pods: list[dict[str, Any]], settings: OperatorSettings, now: datetime | None = None,
                     render_error: str = "") -> MDDerived:
    """The status a ModelDeployment should have, from its model resolution and its Deployment."""
    now = now or now_utc()
    spec = md.get("spec") or {}
    old = md.get("status") or {}
    gen = (md.get("metadata") or {}).get("generation")
    conds = list(old.get("conditions") or [])
    new: dict[str, Any] = {"observedGeneration": gen}
    model = resolution.model

    if render_error:
        phase, reason, message = "Failed", "InvalidSpec", render_error
        conds = set_condition(conds, "Ready", "False", reason, message, now, gen)
    elif model is None:
        phase = "Failed" if resolution.failed else "WaitingForModel"
        reason, message = resolution.reason, resolution.message
        conds = set_condition(conds, "ModelReady", "False", reason, message, now, gen)
        conds = set_condition(conds, "Ready", "False", reason, message, now, gen)
    else:
        conds = set_condition(conds, "ModelReady", "True", resolution.reason or "ModelResolved",
                              resolution.message or f"model {model.uri}", now, gen)
        dep_status = (deployment or {}).get("status") or {}
        want = (deployment or {}).get("spec", {}).get("replicas", 1)
        ready = int(dep_status.get("readyReplicas") or 0)
        updated = int(dep_status.get("updatedReplicas") or 0)
        total = int(dep_status.get("replicas") or 0)
        available = _deployment_condition(deployment or {}, "Available")
        progressing = _deployment_condition(deployment or {}, "Progressing")
        observed = int(dep_status.get("observedGeneration") or 0) >= int((deployment or {}).get("metadata", {}).get("generation") or 0)
        rolled_out = deployment is not None and observed and updated >= want and total == updated and ready >= want
        new["replicas"] = total
        new["readyReplicas"] = ready
        new["url"] = service_url(md)
        problem = _pod_problem(pods, int((spec.get("resources") or {}).get("gpus") or 0))
        if progressing and progressing.get("status") == "False":
            phase, reason = "Failed", progressing.get("reason") or "ProgressDeadlineExceeded"
            message = progressing.get("message") or "the rollout made no progress"
            if problem:
                message += f"; {problem[0]}: {problem[1]}"
        elif rolled_out and available and available.get("status") == "True" and (ready > 0 or want == 0):
            phase, reason, message = "Ready", "Ready", f"{ready}/{want} replicas ready, serving {model.uri}"
            new["model"] = model.as_status()
        else:
            phase = "Deploying"
            if problem:
                reason, message = problem
            else:
                reason = "RollingOut" if old.get("model") and old["model"] != model.as_status() else "Deploying"
                message = f"{ready}/{want} replicas ready, {updated} updated; rolling out {model.uri}"
        predictor_ok = phase == "Ready"
        conds = set_condition(conds, "PredictorReady", "True" if predictor_ok else "False", reason, message, now, gen)
        conds = set_condition(conds, "Ready", "True" if predictor_ok else "False", reason, message, now, gen)
        if spec.get("autoscaling"):
            if settings.features.hpa_v2:
                conds = set_condition(conds, "AutoscalerReady", "True", "HorizontalPodAutoscaler",
                                      f"HPA {names.server_deployment(md['metadata']['name'])} scales on CPU", now, gen)
            else:
                conds = set_condition(conds, "AutoscalerReady", "False", "AutoscalingUnavailable",
                                      f"autoscaling/v2 is not served by this API server ({settings.features.server_version}); "
                                      f"running spec.autoscaling.minReplicas={spec['autoscaling'].get('minReplicas', 1)} replicas",
                                      now, gen)
    new.update(phase=phase, reason=reason, message=message[:2048], conditions=conds)
    changed = {k: v for k, v in new.items() if old.get(k) != v}
    event = None
    if (phase, reason) != (old.get("phase"), old.get("reason")):
        kind = "Warning" if phase == "Failed" or reason in POD_START_FAILURES | {"CrashLoopBackOff", "ModelFetchFailed"} else "Normal"
        event = (kind, reason or phase, f"{phase}: {message}")
    return MDDerived(changed, event)


def subset(want: Any, have: Any) -> bool:
    """True when every field Kiln sets in `want` has the same value in the live object `have`.

    The API server adds defaults, so live objects are supersets; a field that differs means a hand
    edit (drift) to put back.
    """
    if isinstance(want, dict):
        return isinstance(have, dict) and all(subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(subset(w, h) for w, h in zip(want, have, strict=True))
    if (isinstance(want, (int, float)) and isinstance(have, str)) or (isinstance(want, str) and isinstance(have, (int, float))):
        return str(want) == str(have)
    return bool(want == have)


