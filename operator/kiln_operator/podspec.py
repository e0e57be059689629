"""The parts of a pod spec both resources render the same way: security contexts, resources,
tolerations, owner references and PersistentVolumeClaim URIs."""

from __future__ import annotations

import re
from typing import Any

from kiln import API_VERSION
from kiln.spec import ServingSpec, Storage, TrainingJobSpec
from kiln_operator.templating import RenderError

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
"""Where `pvc://CLAIM/PATH` claims are mounted in every pod: PVC_ROOT/CLAIM/PATH."""
GPU_RESOURCE = "nvidia.com/gpu"


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


def resources(spec: TrainingJobSpec | ServingSpec) -> dict[str, Any]:
    """Requests equal limits for cpu and memory (predictable placement); GPUs as limits."""
    res = spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    for key, value in (("cpu", res.cpu), ("memory", res.memory)):
        if value is not None:
            limits[key] = requests[key] = str(value)
    if res.gpus > 0:
        limits[GPU_RESOURCE] = res.gpus
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def tolerations(spec: TrainingJobSpec | ServingSpec) -> list[dict[str, Any]]:
    """The user's tolerations, plus the GPU taint's when GPUs are requested."""
    out = [t.to_dict() for t in spec.scheduling.tolerations or []]
    if spec.resources.gpus > 0 and not any(t.get("key") == GPU_RESOURCE for t in out):
        out.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    return out


STORAGE_SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False), ("AWS_SESSION_TOKEN", True),
                       ("AWS_REGION", True), ("AWS_ENDPOINT_URL_S3", True), ("AWS_ENDPOINT_URL", True))
"""Keys read from `spec.storage.secretName` (key, optional): a Secret without the two credentials keeps
the pod in CreateContainerConfigError with the kubelet's reason, shown in status."""


def storage_env(storage: Storage | None) -> list[dict[str, Any]]:
    """The AWS_* variables of `spec.storage` (Secret keys, endpoint, region), for the pods that touch S3 only.
    Empty without `spec.storage`: the AWS default chain (IRSA / workload identity) applies."""
    if storage is None:
        return []
    env: list[dict[str, Any]] = []
    endpoint, region, secret = storage.endpoint, storage.region, storage.secret_name
    for key, optional in STORAGE_SECRET_KEYS if secret else ():
        if (key.startswith("AWS_ENDPOINT_URL") and endpoint) or (key == "AWS_REGION" and region):
            continue  # the spec's own field wins over the Secret's key
        env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}})
    if endpoint:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint})
    if region:
        env.append({"name": "AWS_REGION", "value": region})
    return env
