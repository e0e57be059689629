"""Operator settings: one dataclass, filled from flags and `KILN_*` environment variables."""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field, fields


def _env_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass
class Features:
    """What the connected API server supports (read at startup from /version and discovery)."""

    job_suspend: bool = True
    """batch/v1 Job `spec.suspend` (Kubernetes 1.21+)."""
    indexed_jobs: bool = True
    """Job `completionMode: Indexed` (1.21+), needed for multi-worker training."""
    hpa_v2: bool = True
    """`autoscaling/v2` HorizontalPodAutoscaler (1.23+)."""
    server_version: str = ""
    """The API server's gitVersion, for messages."""


@dataclass
class OperatorSettings:
    """Everything `kiln operator` can be told; defaults suit a cluster install via the Helm chart."""

    namespaces: list[str] = field(default_factory=list)
    """Namespaces to watch (globs allowed, e.g. `team-*`); empty means cluster-wide."""
    exclude_namespaces: list[str] = field(default_factory=list)
    """Namespaces (globs) to leave alone even when watching cluster-wide, e.g. a team's own operator."""
    trainer_image: str = "ghcr.io/kiln-dev/kiln-trainer:0.1.0"
    """Default image of training Jobs (a TrainingJob's `spec.image` overrides it)."""
    server_image: str = "ghcr.io/kiln-dev/kiln-server:0.1.0"
    """Default image of model server Deployments."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy for the default images."""
    reconcile_interval: float = 5.0
    """Seconds between status reconciliations of each resource (events trigger them sooner)."""
    watch_server_timeout: int = 300
    """Server-side watch timeout: the API server ends idle watches so they are re-established."""
    watch_client_timeout: int = 330
    """Client-side watch timeout: catches watches that went silent without being closed."""
    request_timeout: float = 30.0
    """Timeout of single API requests."""
    liveness: str = "http://0.0.0.0:8080/healthz"
    """Kopf liveness endpoint URL; empty disables it."""
    peering: str = ""
    """Kopf peering name: replicas with the same name elect one active operator (standby replica)."""
    priority: int = 0
    """Peering priority of this replica; the highest active one works."""
    peering_lifetime: int = 60
    """Seconds a replica's peering entry stays valid without a keep-alive: how soon a standby takes
    over from a replica that died without saying goodbye (SIGKILL, node loss)."""
    metrics_port: int = 0
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    metrics_address: str = "0.0.0.0"
    """Address the /metrics endpoint listens on."""
    field_manager: str = "kiln"
    """Field manager name for server-side apply."""
    max_workers: int = 50
    """Concurrent API connections of the handlers (aiohttp pool: this + 4), and threads for blocking calls."""
    features: Features = field(default_factory=Features)

    def handles(self, namespace: str | None) -> bool:
        """False for namespaces excluded by `exclude_namespaces`."""
        return not any(fnmatch.fnmatchcase(namespace or "", pattern) for pattern in self.exclude_namespaces)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        """Settings from `KILN_<FIELD>` variables, e.g. KILN_NAMESPACES=a,b KILN_TRAINER_IMAGE=..."""
        env = dict(os.environ if environ is None else environ)
        out = cls()
        for f in fields(cls):
            key = "KILN_" + f.name.upper()
            if key not in env or f.name == "features":
                continue
            raw = env[key]
            current = getattr(out, f.name)
            value: object
            if isinstance(current, list):
                value = _env_list(raw)
            elif isinstance(current, bool):
                value = raw.lower() in ("1", "true", "yes")
            elif isinstance(current, int):
                value = int(raw)
            elif isinstance(current, float):
                value = float(raw)
            else:
                value = raw
            setattr(out, f.name, value)
        return out
