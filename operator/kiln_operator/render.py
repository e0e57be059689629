"""Pure builders of the Kubernetes objects Kiln creates, from Jinja2 templates.

Why pure: `kiln render` (the GitOps preview), the unit tests and the operator's handlers call the very
same functions, so what a user previews is what the operator creates. Every value enters a template
through the `tojson` filter as a JSON scalar or structure, so a name, label or env value holding quotes,
newlines or template syntax stays a string and cannot add fields.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from typing import Any

import jinja2
import yaml

from kiln import API_VERSION
from kiln_operator import names
from kiln_operator.settings import Features, OperatorSettings

POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""Pod level of the Kubernetes "restricted" Pod Security Standard."""

CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
"""Container level of the "restricted" standard, plus a read-only root filesystem."""

PVC_ROOT = "/kiln/pvc"
SPEC_DIR = "/etc/kiln"
SPEC_FILE = f"{SPEC_DIR}/trainingjob.yaml"
MAX_SPEC_BYTES = 200 * 1024
"""Kubernetes allows 256 KiB of annotations per object; the spec travels in one."""
WORKER_PORT = 2222
GPU_RESOURCE = "nvidia.com/gpu"
KUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TRAINER_COMMAND = ["kiln", "train", "--in-cluster"]
BYO_COMMAND = ["python", "-m", "kiln_trainer.byo", "--"]


class RenderError(ValueError):
    """The resource cannot be rendered; `field` names the spec field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True)


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("kiln_operator", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["tojson"] = _tojson
    return env


# libyaml when present: the pure-Python parser costs ~10 ms per TrainingJob, which adds up in a burst.
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def render_template(name: str, **context: Any) -> list[dict[str, Any]]:
    """Render one template into its documents: `*.yaml.j2` (YAML stream) or `*.json.j2` (an object or a list)."""
    text = environment().get_template(name).render(**context)
    if name.endswith(".json.j2"):
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as exc:  # a template bug, never user input (values enter through tojson)
            raise RuntimeError(f"template {name} rendered invalid JSON: {exc}") from exc
        return [doc for doc in (loaded if isinstance(loaded, list) else [loaded]) if doc]
    return [doc for doc in yaml.load_all(text, Loader=_Loader) if doc]


def owner_references(owner: dict[str, Any]) -> list[dict[str, Any]]:
    """Children are owned by their Kiln resource: garbage collection deletes them with it."""
    meta = owner["metadata"]
    return [{
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta.get("uid", "00000000-0000-0000-0000-000000000000"),
        "controller": True,
        "blockOwnerDeletion": True,
    }]


def parse_pvc(uri: str, field: str) -> tuple[str, str] | None:
    """`pvc://claim/path` -> (claim, path); None for other schemes."""
    if not uri.startswith("pvc://"):
        return None
    rest = uri[len("pvc://"):]
    claim, _, path = rest.partition("/")
    if not claim:
        raise RenderError(field, f"{uri!r} has no claim name (pvc://CLAIM/PATH)")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", claim):
        raise RenderError(field, f"{claim!r} is not a valid PersistentVolumeClaim name")
    if ".." in path.split("/"):
        raise RenderError(field, f"{uri!r}: '..' may not leave the claim")
    return claim, path


def resources(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests equal limits for cpu and memory (predictable placement); GPUs as limits."""
    res = spec.get("resources") or {}
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    for key in ("cpu", "memory"):
        if res.get(key) is not None:
            limits[key] = requests[key] = str(res[key])
    if int(res.get("gpus") or 0) > 0:
        limits[GPU_RESOURCE] = int(res["gpus"])
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def tolerations(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The user's tolerations, plus the GPU taint's when GPUs are requested."""
    out = copy.deepcopy((spec.get("scheduling") or {}).get("tolerations") or [])
    if int((spec.get("resources") or {}).get("gpus") or 0) > 0 and not any(
        t.get("key") == GPU_RESOURCE for t in out
    ):
        out.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return out


def _storage(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """Volumes and mounts for the dataset/output PVCs, and the local output folder."""
    dataset_uri = (spec.get("dataset") or {}).get("uri", "")
    output_uri = (spec.get("output") or {}).get("uri", "")
    claims: dict[str, bool] = {}  # claim -> writable
    data_pvc = parse_pvc(dataset_uri, "spec.dataset.uri") if dataset_uri else None
    out_pvc = parse_pvc(output_uri, "spec.output.uri") if output_uri else None
    if data_pvc:
        claims[data_pvc[0]] = False
    if out_pvc:
        claims[out_pvc[0]] = True
    volumes, mounts = [], []
    for i, (claim, writable) in enumerate(sorted(claims.items())):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": not writable})
    output_dir = f"{PVC_ROOT}/{out_pvc[0]}/{out_pvc[1]}".rstrip("/") if out_pvc else "/tmp/kiln-output"
    return volumes, mounts, output_dir


def check_trainingjob(tj: dict[str, Any], features: Features) -> None:
    """What the schema cannot say but a cluster needs; raises RenderError naming the field."""
    spec = tj.get("spec") or {}
    output_uri = (spec.get("output") or {}).get("uri")
    if not spec.get("command"):
        for key in ("dataset", "model"):
            if not spec.get(key):
                raise RenderError(f"spec.{key}", "required for the built-in trainer (or set spec.command)")
        if not output_uri:
            raise RenderError("spec.output.uri", "required in a cluster: pvc://CLAIM/PATH or s3://BUCKET/PREFIX")
    if output_uri and output_uri.split("://")[0] not in ("pvc", "s3") :
        raise RenderError("spec.output.uri", f"{output_uri!r}: a cluster needs pvc:// or s3:// (the pod's filesystem is temporary)")
    if int(spec.get("workers") or 1) > 1 and not features.indexed_jobs:
        version = features.server_version or "older"
        raise RenderError("spec.workers", f"more than 1 worker needs Indexed Jobs (Kubernetes 1.21+); the API server is {version}")


def trainingjob_context(tj: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    """Everything the TrainingJob templates need, computed once."""
    spec = copy.deepcopy(tj.get("spec") or {})
    meta = tj["metadata"]
    name, namespace = meta["name"], meta.get("namespace") or "default"
    run_policy = {"backoffLimit": 0, "restartPolicy": "Never", "suspend": False, **(spec.get("runPolicy") or {})}
    scheduling = {"nodeSelector": {}, "priorityClassName": "", "queueName": "", **(spec.get("scheduling") or {})}
    workers = int(spec.get("workers") or 1)
    job = names.job_name(name)
    service = names.workers_service(name)
    volumes, mounts, output_dir = _storage(spec)
    labels = {**names.standard_labels(name, "trainer", "kiln-trainer"), names.LABEL_TRAININGJOB: names.label_value(name)}
    job_labels = dict(labels)
    if scheduling.get("queueName"):
        job_labels[KUEUE_LABEL] = scheduling["queueName"]
    annotations = {names.ANNOTATION_TRAININGJOB: name}
    account = spec.get("serviceAccountName") or names.trainer_account(name)

    env: list[dict[str, Any]] = [{"name": "HOME", "value": "/tmp"}, {"name": "TMPDIR", "value": "/tmp"}]
    env += copy.deepcopy(spec.get("env") or [])
    env += [
        {"name": "KILN_SPEC", "value": SPEC_FILE},
        {"name": "KILN_TRAININGJOB", "value": name},
        {"name": "KILN_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "KILN_OUTPUT_URI", "value": (spec.get("output") or {}).get("uri", "")},
        {"name": "KILN_OUTPUT_DIR", "value": output_dir},
        {"name": "KILN_PVC_ROOT", "value": PVC_ROOT},
        {"name": "KILN_TERMINATION_LOG", "value": "/dev/termination-log"},
    ]
    if workers > 1:
        hosts = ",".join(f"{job}-{i}.{service}.{namespace}.svc:{WORKER_PORT}" for i in range(workers))
        env += [
            {"name": "KILN_WORKER_HOSTS", "value": hosts},
            {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        ]
    command = BYO_COMMAND + list(spec["command"]) if spec.get("command") else list(TRAINER_COMMAND)
    document = {
        "apiVersion": tj.get("apiVersion", API_VERSION),
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": namespace, "uid": meta.get("uid", ""), "generation": meta.get("generation", 1)},
        "spec": spec,
    }
    spec_document = yaml.dump(document, Dumper=_Dumper, sort_keys=False)
    if len(spec_document) > MAX_SPEC_BYTES:
        raise RenderError("spec", f"{len(spec_document)} bytes once serialized; at most {MAX_SPEC_BYTES} fit in the pod's annotations")
    return {
        "trainingjob": name,
        "namespace": namespace,
        "job": job,
        "service": service,
        "account": account,
        "labels": labels,
        "job_labels": job_labels,
        "pod_labels": labels,
        "selector": {names.LABEL_TRAININGJOB: names.label_value(name)},
        "annotations": annotations,
        "pod_annotations": {**annotations, names.ANNOTATION_SPEC: spec_document},
        "owner_references": owner_references({**tj, "kind": "TrainingJob"}),
        "run_policy": run_policy,
        "restart_policy": run_policy["restartPolicy"],
        "suspend": bool(run_policy.get("suspend")) or bool(scheduling.get("queueName")),
        "workers": workers,
        "worker_port": WORKER_PORT,
        "scheduling": scheduling,
        "tolerations": tolerations(spec),
        "image": spec.get("image") or settings.trainer_image,
        "image_pull_policy": spec.get("imagePullPolicy") or settings.image_pull_policy,
        "image_pull_secrets": spec.get("imagePullSecrets") or [],
        "command": command,
        "args": list(spec.get("args") or []),
        "env": env,
        "resources": resources(spec),
        "pod_security_context": POD_SECURITY_CONTEXT,
        "container_security_context": CONTAINER_SECURITY_CONTEXT,
        "volume_mounts": [{"name": "spec", "mountPath": SPEC_DIR, "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"}, *mounts],
        # The spec reaches the pod through the downward API, from an annotation on the pod template:
        # no ConfigMap to create per job, and the Job itself records the spec it runs with.
        "volumes": [{"name": "spec", "downwardAPI": {"items": [{
            "path": SPEC_FILE.rsplit("/", 1)[1],
            "fieldRef": {"fieldPath": f"metadata.annotations['{names.ANNOTATION_SPEC}']"}}]}},
            {"name": "tmp", "emptyDir": {}}, *volumes],
        "create_account": not spec.get("serviceAccountName"),
    }


def build_trainingjob(tj: dict[str, Any], settings: OperatorSettings) -> list[dict[str, Any]]:
    """All children of a TrainingJob, in creation order (the Job last, once what it mounts exists)."""
    check_trainingjob(tj, settings.features)
    ctx = trainingjob_context(tj, settings)
    out: list[dict[str, Any]] = []
    if ctx["create_account"]:
        out += render_template("trainingjob-rbac.json.j2", **ctx)
    if ctx["workers"] > 1:
        out += render_template("trainingjob-service.yaml.j2", **ctx)
    out += render_template("trainingjob-job.json.j2", **ctx)
    return out


def build_modeldeployment_preview(md: dict[str, Any], settings: OperatorSettings,
                                  trainingjobs: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """What a ModelDeployment renders to (its Deployment, Service and HPA), without a cluster.

    A model from a TrainingJob in the same files is previewed at that job's output location (where
    the trainer writes model.onnx); any other TrainingJob's model is only known once it has succeeded.
    """
    from kiln_operator.serving import ModelRef, build_modeldeployment

    tj_name = ((md.get("spec") or {}).get("model") or {}).get("trainingJob")
    tj = (trainingjobs or {}).get(tj_name or "")
    output = (((tj or {}).get("spec") or {}).get("output") or {}).get("uri")
    if tj_name and output:
        return build_modeldeployment(md, settings, ModelRef(output.rstrip("/") + "/model.onnx", "", tj_name))
    return build_modeldeployment(md, settings, model=None)
