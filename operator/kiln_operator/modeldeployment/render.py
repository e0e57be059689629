"""What a ModelDeployment renders to, pure: which model to serve (`resolve_model`) and the server's
Deployment, Service and HPA for it (`build_modeldeployment`, also behind `kiln render`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from kiln.serverargs import serve_args
from kiln_operator import names
from kiln_operator.podspec import (
    CONTAINER_SECURITY_CONTEXT,
    POD_SECURITY_CONTEXT,
    PVC_ROOT,
    owner_references,
    parse_pvc,
    resources,
    tolerations,
)
from kiln_operator.settings import OperatorSettings
from kiln_operator.templating import RenderError, render_template

SERVER_PORT = 8080
FETCH_DIR = "/models"
ANNOTATION_SHA = "kiln.dev/model-sha256"
ANNOTATION_URI = "kiln.dev/model-uri"


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
    previous: bool = False
    """The model is the one served before: the newest followed TrainingJob has none (yet)."""


def resolve_model(md: dict[str, Any], tj: dict[str, Any] | None) -> Resolution:
    """Pick the model: `spec.model.uri`, or the result of a succeeded TrainingJob."""
    spec_model = (md.get("spec") or {}).get("model") or {}
    fmt = spec_model.get("format") or "onnx"
    if spec_model.get("uri"):
        return Resolution(ModelRef(spec_model["uri"], spec_model.get("sha256", ""), "", fmt))
    name = spec_model.get("trainingJob") or ((tj or {}).get("metadata") or {}).get("name", "")
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
    return str((md.get("spec") or {}).get("modelName") or md["metadata"]["name"])


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


def build_modeldeployment_preview(md: dict[str, Any], settings: OperatorSettings,
                                  trainingjobs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What a ModelDeployment renders to (its Deployment, Service and HPA), without a cluster.

    A model from a TrainingJob in the same files is previewed at that job's output location (where
    the trainer writes model.onnx); any other TrainingJob's model is only known once it has succeeded.
    """
    tj_name = ((md.get("spec") or {}).get("model") or {}).get("trainingJob")
    tj = (trainingjobs or {}).get(tj_name or "")
    output = (((tj or {}).get("spec") or {}).get("output") or {}).get("uri")
    if tj_name and output:
        return build_modeldeployment(md, settings, ModelRef(output.rstrip("/") + "/model.onnx", "", tj_name))
    return build_modeldeployment(md, settings, model=None)
