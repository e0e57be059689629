"""What a ModelDeployment renders to, pure: which model to serve (`resolve_model`) and the server's
Deployment, Service and HPA for it (`build_modeldeployment`, also behind `kiln render`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from kiln import GROUP
from kiln.netguard import FetchPolicy
from kiln.serverargs import serve_args
from kiln.spec import ModelDeploymentSpec, ModelSource, NetworkPeer, ServingSpec, TrainingJobSpec
from kiln_operator import names
from kiln_operator.podspec import (
    CONTAINER_SECURITY_CONTEXT,
    POD_SECURITY_CONTEXT,
    PVC_ROOT,
    owner_references,
    parse_pvc,
    resources,
    storage_env,
    tolerations,
)
from kiln_operator.settings import OperatorSettings
from kiln_operator.templating import RenderError, render_template

SERVER_PORT = 8080
SERVER_GRPC_PORT = 9000
FETCH_DIR = "/models"
AUTH_DIR = "/etc/kiln/auth"
ANNOTATION_SHA = f"{GROUP}/model-sha256"
ANNOTATION_URI = f"{GROUP}/model-uri"


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
    source = ModelDeploymentSpec.from_dict(md.get("spec")).model
    fmt = source.format
    if source.uri:
        return Resolution(ModelRef(source.uri, source.sha256 or "", "", fmt))
    name = source.training_job or ((tj or {}).get("metadata") or {}).get("name", "")
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


def fetch_flags(uri: str, fetch: FetchPolicy) -> list[str]:
    """The init container's flags that relax its http(s) rules, as the admin's policy allows (none by default)."""
    if not uri.startswith(("http://", "https://")):
        return []
    default = FetchPolicy()
    flags = ["--allow-http"] if fetch.allow_http else []
    flags += ["--allow-private"] if fetch.allow_private else []
    flags += ["--allow-missing-sha256"] if not fetch.require_sha256 else []
    return flags + (["--max-bytes", str(fetch.max_bytes)] if fetch.max_bytes != default.max_bytes else [])


def _model_location(model: ModelRef, spec: ServingSpec, fetch_policy: FetchPolicy | None = None,
                    ) -> tuple[str, dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]]]:
    """(path the server loads, fetch init container, volumes, server mounts) for a model URI; only the
    fetch init container gets `spec.storage`'s credentials."""
    pvc = parse_pvc(model.uri, "spec.model.uri")
    if pvc:
        claim, path = pvc
        volumes = [{"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}]
        mounts = [{"name": "model", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": True}]
        return f"{PVC_ROOT}/{claim}/{path}", None, volumes, mounts
    scheme = model.uri.split("://", 1)[0] if "://" in model.uri else "file"
    if scheme == "gs":
        raise RenderError("spec.model.uri", "gs:// is not supported: use s3:// (Google Cloud Storage answers the S3 API "
                          "at https://storage.googleapis.com with HMAC keys: spec.storage.endpoint), pvc:// or https://")
    if scheme in ("s3", "http", "https"):
        target = f"{FETCH_DIR}/model.onnx"
        command = ["python", "-m", "kiln_server.fetch", model.uri, target]
        if model.sha256:
            command += ["--sha256", model.sha256]
        command += fetch_flags(model.uri, fetch_policy or FetchPolicy())
        volumes = [{"name": "model", "emptyDir": {}}]
        fetch = {"command": command, "mounts": [{"name": "model", "mountPath": FETCH_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
                 "env": [{"name": "HOME", "value": "/tmp"}, *(storage_env(spec.storage) if scheme == "s3" else [])]}
        return target, fetch, volumes, [{"name": "model", "mountPath": FETCH_DIR, "readOnly": True}]
    if scheme == "file":
        return model.uri[len("file://"):] if model.uri.startswith("file://") else model.uri, None, [], []
    raise RenderError("spec.model.uri", f"unsupported scheme {scheme!r}: use pvc://, s3://, http(s):// or file://")


def network_peers(spec: ServingSpec) -> list[dict[str, Any]]:
    """NetworkPolicy `from` peers of `spec.networkPolicy.from`; default: every pod of the same namespace."""
    peers = []
    listed = spec.network_policy.from_ if spec.network_policy else None
    entries: list[NetworkPeer | None] = list(listed) if listed else [None]
    for entry in entries:
        peer = {} if entry is None else {
            key: {"matchLabels": dict(value)}
            for key, value in (("namespaceSelector", entry.namespace_selector), ("podSelector", entry.pod_selector))
            if value is not None}
        peers.append(peer or {"podSelector": {}})
    return peers


def auth_parts(spec: ServingSpec) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]]]:
    """(server args, volumes, mounts) for `spec.auth`: the tokens Secret mounted read-only, passed by path."""
    auth = spec.auth
    if auth is None or not auth.token_secret:
        return [], [], []
    key = auth.key or "tokens"
    args = ["--auth-token-file", f"{AUTH_DIR}/{key}", "--auth-open-routes", "health,metrics" if auth.open_metrics else "health"]
    volume = {"name": "auth", "secret": {"secretName": auth.token_secret, "items": [{"key": key, "path": key}], "defaultMode": 0o440}}
    return args, [volume], [{"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}]


def model_name(md: dict[str, Any]) -> str:
    """The name in the V2 routes: `spec.modelName`, else the resource's name."""
    return str((md.get("spec") or {}).get("modelName") or md["metadata"]["name"])


def service_url(md: dict[str, Any]) -> str:
    meta = md["metadata"]
    return f"http://{names.server_service(meta['name'])}.{meta.get('namespace') or 'default'}.svc.cluster.local/v2/models/{model_name(md)}"


def grpc_address(md: dict[str, Any]) -> str:
    """In-cluster `host:port` of the gRPC API ("" when it is off): gRPC clients take an address, not a URL."""
    port = ModelDeploymentSpec.from_dict(md.get("spec") or {}).service.grpc_port
    if not port:
        return ""
    meta = md["metadata"]
    return f"{names.server_service(meta['name'])}.{meta.get('namespace') or 'default'}.svc.cluster.local:{port}"


def cpu_count(quantity: Any) -> float:
    """A CPU quantity (`2`, `1.5`, `500m`) as a number of CPUs; 0 when it cannot be read."""
    text = str(quantity).strip()
    try:
        return int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return 0.0


def workers(spec: ServingSpec) -> int:
    """`spec.workers`, or the CPU request rounded down (at least 1): one event loop per CPU the pod may use.

    GPU pods default to 1: each worker would hold its own CUDA context and copy of the model on the GPU.
    """
    if spec.workers:
        return spec.workers
    if spec.resources.gpus > 0:
        return 1
    cpu = spec.resources.cpu
    return max(1, int(cpu_count(cpu))) if cpu is not None else 1


def server_image(spec: ServingSpec, settings: OperatorSettings) -> str:
    """`spec.image`, else the GPU server image when GPUs are asked for, else the CPU one.

    GPUs without a GPU image is refused: the CPU image's ONNX Runtime has no CUDA provider, so the pod
    would hold GPUs it never uses.
    """
    if spec.image:
        return spec.image
    gpus = spec.resources.gpus
    if gpus <= 0:
        return settings.server_image
    if not settings.server_gpu_image:
        raise RenderError(
            "spec.resources.gpus",
            f"asks for {gpus} GPU(s) but the operator has no GPU server image (chart value server.gpuImage, "
            f"KILN_SERVER_GPU_IMAGE); its CPU image {settings.server_image} cannot use GPUs. Configure a GPU image, "
            "name a CUDA-enabled server image in spec.image, or remove resources.gpus",
        )
    return settings.server_gpu_image


def _server_args(md: dict[str, Any], spec: ServingSpec, path: str, sha256: str) -> list[str]:
    """`kiln serve` arguments: the shared mapping, plus the pod-only gRPC port and the workers default."""
    args = serve_args(spec, model=path, name=model_name(md), host="0.0.0.0", port=SERVER_PORT, sha256=sha256)
    grpc_port = spec.service.grpc_port
    if grpc_port:
        if grpc_port == spec.service.port:
            raise RenderError("spec.service.grpcPort", f"port {grpc_port} is also spec.service.port; the two must differ")
        args += ["--grpc-port", str(SERVER_GRPC_PORT)]
    n = workers(spec)
    if n > 1 and "--workers" not in args:
        args += ["--workers", str(n)]
    if spec.resources.gpus > 0:
        args += ["--providers", "cuda"]  # a pod holding GPUs must run on them: fail loudly, never fall back to CPU
    return args


def serves(deployment: dict[str, Any], model: ModelRef) -> bool:
    """Whether a Deployment's pod template serves `model` (its URI and digest annotations)."""
    annotations = (((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("annotations") or {}
    return bool(annotations.get(ANNOTATION_URI) == model.uri and annotations.get(ANNOTATION_SHA) == (model.sha256 or "unknown"))


def split_replicas(total: int, percent: int) -> tuple[int, int]:
    """(stable, canary) replicas that give the canary `percent` of `total` by replica ratio.

    The Service spreads connections evenly over ready pods, so the share moves in steps of 1/total:
    round(total x percent / 100), at least 1 while percent > 0 and at most total - 1 below 100 (both
    tracks keep a pod). With one replica, any percent between 1 and 99 runs one pod of each (50 %).
    """
    if percent <= 0 or total <= 0:
        return total, 0
    if percent >= 100:
        return 0, total
    if total == 1:
        return 1, 1
    canary = min(total - 1, max(1, (total * percent + 50) // 100))
    return total - canary, canary


def revision(model: ModelRef) -> str:
    """The model's identity in the server's metrics (`--revision`): its digest's first 12 hex digits,
    else those of its URI's sha256 (so two models behind one Service always differ)."""
    return model.sha256[:12] if model.sha256 else "uri-" + hashlib.sha256(model.uri.encode()).hexdigest()[:12]


def placeholder(source: ModelSource) -> ModelRef:
    """The model `kiln render` shows for a source not resolved yet (a TrainingJob that has not succeeded)."""
    tj = source.training_job or ""
    uri = source.uri or f"file:///resolved-when-trainingjob-{tj}-succeeds/model.onnx"
    return ModelRef(uri, source.sha256 or "", tj)


def routed(spec: ServingSpec, settings: OperatorSettings) -> bool:
    """Whether an HTTPRoute splits the traffic: `spec.service.gateway` is set and the API serves HTTPRoutes."""
    return spec.service.gateway is not None and bool(settings.features.http_route)


def _server_context(md: dict[str, Any], spec: ServingSpec, settings: OperatorSettings, model: ModelRef,
                    fetch_policy: FetchPolicy, track: str) -> dict[str, Any]:
    """The template values of one track's Deployment (and, for the stable track, its Service, HPA, NetworkPolicy).

    The stable Deployment keeps the selector it always had (a Deployment's selector cannot change), which
    the main Service and the NetworkPolicy use too, so they reach both tracks; the canary's adds its track.
    """
    meta = md["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or "default"
    path, fetch, volumes, mounts = _model_location(model, spec, fetch_policy)
    labels = {**names.standard_labels(name, "server", "kiln-server"), names.LABEL_MODELDEPLOYMENT: names.label_value(name)}
    selector = {names.LABEL_MODELDEPLOYMENT: names.label_value(name), "app.kubernetes.io/component": "server"}
    if track == "canary":
        selector[names.LABEL_TRACK] = track
    args = [*_server_args(md, spec, path, model.sha256), "--revision", revision(model)]
    auth_args, auth_volumes, auth_mounts = auth_parts(spec)
    return {
        "deployment": names.canary_deployment(name) if track == "canary" else names.server_deployment(name),
        "service": names.server_service(name),
        "namespace": namespace,
        "labels": labels,
        "pod_labels": {**labels, names.LABEL_TRACK: track},
        "selector": selector,
        "annotations": {names.ANNOTATION_MODELDEPLOYMENT: name},
        "pod_annotations": {names.ANNOTATION_MODELDEPLOYMENT: name, ANNOTATION_URI: model.uri, ANNOTATION_SHA: model.sha256 or "unknown"},
        "owner_references": owner_references({**md, "kind": "ModelDeployment"}),
        "progress_deadline": spec.progress_deadline_seconds,
        "image": server_image(spec, settings),
        "image_pull_policy": spec.image_pull_policy or settings.image_pull_policy,
        "image_pull_secrets": [],  # a ModelDeployment has no imagePullSecrets field (the shared template has)
        "scheduling": spec.scheduling,
        "tolerations": tolerations(spec),
        "pod_security_context": POD_SECURITY_CONTEXT,
        "container_security_context": CONTAINER_SECURITY_CONTEXT,
        "fetch": fetch,
        "args": args + auth_args,
        "port": SERVER_PORT,
        "grpc_port": SERVER_GRPC_PORT if spec.service.grpc_port else 0,
        "grpc_service_port": spec.service.grpc_port,
        "startup_failures": max(1, spec.startup_timeout_seconds // 2),
        "resources": resources(spec),
        "volume_mounts": [{"name": "tmp", "mountPath": "/tmp"}, *mounts, *auth_mounts],
        "volumes": [{"name": "tmp", "emptyDir": {}}, *volumes, *auth_volumes],
        "network_peers": network_peers(spec),
        "service_type": spec.service.type,
        "service_port": spec.service.port,
        "autoscaling": spec.autoscaling,
    }


def _route(ctx: dict[str, Any], spec: ServingSpec, settings: OperatorSettings,
           weights: dict[str, int]) -> list[dict[str, Any]]:
    """Per-track ClusterIP Services and the HTTPRoute that weighs them (`weights`: track -> weight)."""
    gateway = spec.service.gateway
    assert gateway is not None
    name = ctx["annotations"][names.ANNOTATION_MODELDEPLOYMENT]
    out: list[dict[str, Any]] = []
    backends = []
    for track, weight in weights.items():
        service = names.track_service(name, track)
        selector = {**ctx["selector"], names.LABEL_TRACK: track}
        out += render_template("modeldeployment-service.yaml.j2", **{**ctx, "service": service, "selector": selector,
                                                                     "service_type": "ClusterIP"})
        backends.append({"name": service, "port": spec.service.port, "weight": weight})
    parent: dict[str, Any] = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway.name}
    parent |= {k: v for k, v in (("namespace", gateway.namespace), ("sectionName", gateway.section_name)) if v}
    return out + render_template("modeldeployment-httproute.yaml.j2", **ctx, route=names.http_route(name),
                                 route_api=settings.features.http_route, parent_refs=[parent],
                                 hostnames=gateway.hostnames or [], backends=backends)


def build_modeldeployment(md: dict[str, Any], settings: OperatorSettings, model: ModelRef | None,
                          fetch_policy: FetchPolicy | None = None, canary: ModelRef | None = None,
                          handoff: tuple[int, int] | None = None, canary_ready: int | None = None) -> list[dict[str, Any]]:
    """Deployment, Service, (when asked and served by the API) HPA, (unless turned off) NetworkPolicy, the
    canary's Deployment for a resolved `canary` model, and with a routed Gateway the HTTPRoute and its Services.

    Without a resolved model (`kiln render` of a ModelDeployment that waits for a TrainingJob), the
    model path shows as the TrainingJob's placeholder so the preview is still complete. `handoff` is the
    (stable, canary) ready replicas while a canary Deployment no longer in the spec is handed off (a
    promotion, or a rollback waiting for a stable pod): it is left as it is (not rendered) and the route
    weighs the two by those replicas until the controller deletes it. `canary_ready` is the canary's ready
    pods (None: as many as it asks for, as a preview assumes): the stable Deployment gives up one replica per
    ready canary pod, never more than the split asks, so the serving capacity never drops while canary
    pods are still starting (or cannot be scheduled); until one is ready the route gives the canary no
    weight (a backend without endpoints fails requests).
    """
    spec = ModelDeploymentSpec.from_dict(md.get("spec"))
    fetch = fetch_policy or settings.policy.fetch
    ctx = _server_context(md, spec, settings, model or placeholder(spec.model), fetch, "stable")
    hpa = spec.autoscaling is not None and settings.features.hpa_v2
    total = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    percent = spec.canary.traffic_percent if spec.canary and canary else 0
    stable_n, canary_n = split_replicas(total, percent)
    ready = canary_n if canary_ready is None else min(canary_n, canary_ready)
    ctx["replicas"] = None if hpa else max(stable_n, total - ready)
    out = render_template("modeldeployment-deployment.yaml.j2", **ctx)
    out += render_template("modeldeployment-service.yaml.j2", **ctx)
    if hpa:
        out += render_template("modeldeployment-hpa.yaml.j2", **ctx)
    if settings.network_policies:
        out += render_template("modeldeployment-networkpolicy.yaml.j2", **ctx)
    if canary is not None:
        try:
            cctx = _server_context(md, spec, settings, canary, fetch, "canary")
        except RenderError as exc:
            raise RenderError(exc.field.replace("spec.model", "spec.canary.model"), exc.detail) from None
        out += render_template("modeldeployment-deployment.yaml.j2", **cctx, replicas=canary_n)
    if routed(spec, settings):
        share = percent if ready > 0 else 0
        weights = {"stable": 100 - share, "canary": share} if canary is not None else {"stable": 100}
        if handoff is not None:
            weights = dict(zip(("stable", "canary"), handoff, strict=True))  # by capacity, as the Service spreads them
        out += _route(ctx, spec, settings, weights)
    return out


def build_modeldeployment_preview(md: dict[str, Any], settings: OperatorSettings,
                                  trainingjobs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What a ModelDeployment renders to (its Deployment, Service and HPA), without a cluster.

    A model from a TrainingJob in the same files is previewed at that job's output location (where
    the trainer writes model.onnx); any other TrainingJob's model is only known once it has succeeded.
    """
    spec = ModelDeploymentSpec.from_dict(md.get("spec"))

    def preview(source: ModelSource) -> ModelRef:
        tj = (trainingjobs or {}).get(source.training_job or "")
        output = TrainingJobSpec.from_dict(tj.get("spec")).output.uri if tj else None
        if source.training_job and output:
            return ModelRef(output.rstrip("/") + "/model.onnx", "", source.training_job)
        return placeholder(source)

    return build_modeldeployment(md, settings, preview(spec.model), canary=preview(spec.canary.model) if spec.canary else None)
