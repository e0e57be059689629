"""Operator settings: one dataclass, filled from flags and `KILN_<FIELD>` environment variables by the
shared core's reader (`kiln.settings`); a flag wins over its variable."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field

from kiln import settings as reader
from kiln.policy import Policy, load_policy_env, load_policy_file
from kiln.settings import option

TRIAL_MODES = ("auto", "indexed", "jobs")
"""The values of `trial_mode`."""


@dataclass
class Features:
    """What the connected API server supports (read at startup from /version and discovery)."""

    job_suspend: bool = True
    """batch/v1 Job `spec.suspend` (Kubernetes 1.21+)."""
    indexed_jobs: bool = True
    """Job `completionMode: Indexed` (1.21+), needed for multi-worker training."""
    indexed_trials: bool = True
    """Indexed Jobs on by default (beta in 1.22): parallel trials (`spec.tuning.parallelism`) run as one Indexed Job."""
    hpa_v2: bool = True
    """`autoscaling/v2` HorizontalPodAutoscaler (1.23+)."""
    http_route: str = "gateway.networking.k8s.io/v1"
    """The Gateway API HTTPRoute version served (`gateway.networking.k8s.io/v1` or `/v1beta1`), "" when none."""
    server_version: str = ""
    """The API server's gitVersion, for messages."""


@dataclass
class OperatorSettings:
    """Everything `kiln operator` can be told; defaults suit a cluster install via the Helm chart."""

    namespaces: list[str] = field(default_factory=list, metadata=option(
        "-n", "--namespace", metavar="NS", help="namespace to watch (repeatable, globs allowed); default: all"))
    """Namespaces to watch (globs allowed, e.g. `team-*`); empty means cluster-wide."""
    exclude_namespaces: list[str] = field(default_factory=list, metadata=option(
        "--exclude-namespace", metavar="NS", help="namespace glob to leave alone (repeatable)"))
    """Namespaces (globs) to leave alone even when watching cluster-wide, e.g. a team's own operator."""
    trainer_image: str = field(default="ghcr.io/kiln-dev/kiln-trainer:0.1.0", metadata=option("--trainer-image"))
    """Default image of training Jobs (a TrainingJob's `spec.image` overrides it)."""
    server_image: str = field(default="ghcr.io/kiln-dev/kiln-server:0.1.0", metadata=option("--server-image"))
    """Default image of model server Deployments."""
    server_gpu_image: str = field(default="", metadata=option("--server-gpu-image"))
    """Image of model servers whose ModelDeployment asks for GPUs (`resources.gpus > 0`): the server image
    built with onnxruntime-gpu on a CUDA base (images/server/Dockerfile, `--build-arg ORT_PACKAGE=...`).
    Empty: such a ModelDeployment is refused (unless it names `spec.image`), since the CPU image would
    reserve GPUs it never uses."""
    image_pull_policy: str = "IfNotPresent"
    """Pull policy for the default images."""
    reconcile_interval: float = field(default=5.0, metadata=option(
        "--reconcile-interval", kind="duration", help="seconds between periodic status reconciles of each resource"))
    """Seconds between status reconciliations of each resource (events trigger them sooner)."""
    watch_server_timeout: int = 300
    """Server-side watch timeout: the API server ends idle watches so they are re-established."""
    watch_client_timeout: int = 330
    """Client-side watch timeout: catches watches that went silent without being closed."""
    request_timeout: float = field(default=30.0, metadata=option(kind="duration"))
    """Timeout of single API requests."""
    liveness: str = field(default="http://0.0.0.0:8080/healthz", metadata=option(
        "--liveness", help="liveness endpoint URL ('' to disable)"))
    """Kopf liveness endpoint URL; empty disables it."""
    peering: str = field(default="", metadata=option(
        "--peering", help="Kopf peering name: run several replicas, one active (needs the kopf.dev peering CRDs)"))
    """Kopf peering name: replicas with the same name elect one active operator (standby replica)."""
    priority: int = field(default=0, metadata=option("--priority", help="peering priority"))
    """Peering priority of this replica; the highest active one works."""
    peering_lifetime: int = field(default=60, metadata=option(
        "--peering-lifetime", help="seconds a silent peer counts as alive: a standby takes over this long after the active replica died"))
    """Seconds a replica's peering entry stays valid without a keep-alive: how soon a standby takes
    over from a replica that died without saying goodbye (SIGKILL, node loss)."""
    metrics_port: int = field(default=0, metadata=option("--metrics-port", help="serve Prometheus /metrics on this port (0: off)"))
    """Port of the Prometheus /metrics endpoint; 0 disables it."""
    metrics_address: str = field(default="0.0.0.0", metadata=option("--metrics-address", help="address of the /metrics endpoint"))
    """Address the /metrics endpoint listens on."""
    field_manager: str = "kiln"
    """Field manager name for server-side apply."""
    network_policies: bool = True
    """Render a NetworkPolicy per ModelDeployment (ingress from `spec.networkPolicy.from`, default the same namespace)."""
    trainer_egress: list[str] = field(default_factory=list)
    """`CIDR:PORT` endpoints trainers may reach besides DNS (the API server, the S3 endpoint); when set (and
    network_policies), each TrainingJob gets an egress NetworkPolicy allowing only those."""
    trial_mode: str = field(default="auto", metadata=option(
        "--trial-mode", metavar="auto|indexed|jobs",
        help="how parallel tuning trials run: auto (an Indexed Job on 1.22+, else one Job per trial), indexed, jobs"))
    """How parallel trials (`spec.tuning.parallelism` > 1) run: `indexed` (one Indexed Job), `jobs` (one Job per
    trial, at most `parallelism` at once) or `auto`: indexed where the API server has Indexed Jobs on by default (1.22+)."""
    max_workers: int = 50
    """Concurrent API connections of the handlers (aiohttp pool: this + 4), and threads for blocking calls."""
    features: Features = field(default_factory=Features)
    policy: Policy = field(default_factory=Policy)
    """The admin's policy (`KILN_POLICY_FILE`, else the JSON in `KILN_POLICY`; default: the safe one)."""

    def tenant_policy(self) -> Policy:
        """The policy with Kiln's own images (this operator's defaults) always allowed."""
        return self.policy.with_own_images(self.trainer_image, self.server_image)

    def handles(self, namespace: str | None) -> bool:
        """False for namespaces excluded by `exclude_namespaces`."""
        return not any(fnmatch.fnmatchcase(namespace or "", pattern) for pattern in self.exclude_namespaces)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorSettings:
        """Settings from `KILN_<FIELD>` variables, e.g. KILN_NAMESPACES=a,b KILN_TRAINER_IMAGE=..."""
        out = reader.load(cls, env=environ)
        out.policy = policy_from_env(environ)
        return out


def policy_from_env(environ: Mapping[str, str] | None = None) -> Policy:
    """The admin's policy: the file in `KILN_POLICY_FILE`, else the JSON in `KILN_POLICY`, else the safe default."""
    import os

    env = os.environ if environ is None else environ
    if env.get("KILN_POLICY_FILE"):
        return load_policy_file(env["KILN_POLICY_FILE"])
    if env.get("KILN_POLICY"):
        return load_policy_env(env["KILN_POLICY"])
    return Policy()
