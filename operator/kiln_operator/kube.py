"""Thin, blocking Kubernetes API helpers over the official client's ApiClient.

The handlers make their API calls through `aiokube`; this module holds what both share (credentials
from `configure`, resource paths, `error_message`) and the blocking calls the operator makes at
startup (`server_version`, `api_versions`), which the tests and the benches use as their client too.
Why not the typed APIs: Kiln handles its objects as plain dicts (rendered from templates).
"""

from __future__ import annotations

import json
import threading
import warnings
from typing import Any

import kubernetes
import urllib3
from kubernetes.client.exceptions import ApiException

from kiln import GROUP, VERSION

PLURALS: dict[tuple[str, str], str] = {
    ("v1", "Service"): "services",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Secret"): "secrets",
    ("v1", "Pod"): "pods",
    ("v1", "Event"): "events",
    ("v1", "Namespace"): "namespaces",
    ("v1", "PersistentVolumeClaim"): "persistentvolumeclaims",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("batch/v1", "Job"): "jobs",
    ("apps/v1", "Deployment"): "deployments",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    ("autoscaling/v2beta2", "HorizontalPodAutoscaler"): "horizontalpodautoscalers",
    (f"{GROUP}/{VERSION}", "TrainingJob"): "trainingjobs",
    (f"{GROUP}/{VERSION}", "ModelDeployment"): "modeldeployments",
}

_client: kubernetes.client.ApiClient | None = None
_lock = threading.Lock()


def configure(kubeconfig: str | None = None, pool_size: int = 32, timeout: float = 30.0) -> kubernetes.client.ApiClient:
    """Load credentials (in-cluster first, then kubeconfig) and make the shared ApiClient."""
    global _client
    config = kubernetes.client.Configuration()
    try:
        if kubeconfig:
            raise kubernetes.config.ConfigException("kubeconfig given")
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
    if not config.verify_ssl:
        # The user chose insecure-skip-tls-verify; warning on every request adds nothing.
        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    config.connection_pool_maxsize = pool_size
    config.retries = 2
    with _lock:
        _client = kubernetes.client.ApiClient(config)
        _client.user_agent = "kiln-operator"
    _DEFAULTS["timeout"] = timeout
    return _client


_DEFAULTS: dict[str, float] = {"timeout": 30.0}


def client() -> kubernetes.client.ApiClient:
    if _client is None:
        return configure()
    return _client


def path(api_version: str, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    plural = PLURALS[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    url = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        url += f"/{name}"
    if sub:
        url += f"/{sub}"
    return url


def call(method: str, url: str, body: Any = None, query: list[tuple[str, Any]] | None = None,
         content_type: str = "application/json") -> dict[str, Any]:
    """One API call returning the decoded JSON body; raises ApiException on HTTP errors."""
    api = client()
    headers = {"Accept": "application/json", "Content-Type": content_type}
    method, full_url, headers, body, _ = api.param_serialize(
        method, url, query_params=query or [], header_params=headers, body=body, auth_settings=["BearerToken"])
    resp = api.call_api(method, full_url, header_params=headers, body=body, _request_timeout=_DEFAULTS["timeout"])
    raw = resp.read()
    if not 200 <= resp.status < 300:
        raise ApiException(status=resp.status, reason=resp.reason, body=raw.decode("utf-8", "replace"))
    decoded: dict[str, Any] = json.loads(raw) if raw else {}  # API bodies are objects
    return decoded


def get(api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    """The object, or None if it does not exist."""
    try:
        return call("GET", path(api_version, kind, namespace, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def list_objects(api_version: str, kind: str, namespace: str | None, selector: str | None = None) -> list[dict[str, Any]]:
    query = [("labelSelector", selector)] if selector else []
    return list(call("GET", path(api_version, kind, namespace), query=query).get("items") or [])


def patch(api_version: str, kind: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    return call("PATCH", path(api_version, kind, namespace, name), body, content_type="application/merge-patch+json")


def delete(api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background") -> bool:
    """Delete; dependents go by garbage collection. False if it was already gone."""
    try:
        call("DELETE", path(api_version, kind, namespace, name),
             {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation})
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise


def server_version() -> dict[str, Any]:
    return call("GET", "/version")


def api_versions() -> set[str]:
    """All served group/versions, e.g. {'v1', 'batch/v1', 'autoscaling/v2', ...}."""
    out = {"v1"}
    for group in call("GET", "/apis").get("groups") or []:
        for v in group.get("versions") or []:
            out.add(v["groupVersion"])
    return out


def error_message(exc: ApiException) -> str:
    """The API server's own message from an error response."""
    try:
        body = json.loads(exc.body or "{}")
        return str(body.get("message") or exc.reason)
    except (ValueError, TypeError):
        return str(exc.reason or exc)
