"""`kiln operator`: run the Kopf operator with Kiln's settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from kiln import GROUP, kube
from kiln import settings as settings_reader
from kiln.policy import PolicyError, load_policy_file
from kiln_operator import metrics
from kiln_operator.settings import TRIAL_MODES, Features, OperatorSettings, policy_from_env

log = logging.getLogger("kiln.operator")
ROUTE_VERSIONS = ("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
"""HTTPRoute versions the operator renders, newest first (v1beta1: Gateway API before 1.0)."""


def detect_features(settings: OperatorSettings) -> Features:
    """Read what the API server supports, so the operator degrades clearly on older clusters."""
    client = kube.blocking()
    version = client.server_version()
    git = str(version.get("gitVersion", ""))
    match = re.match(r"v?(\d+)\.(\d+)", git)
    minor = int(match.group(2)) if match and match.group(1) == "1" else 99
    groups = client.api_versions()
    route = next((v for v in ROUTE_VERSIONS if v in groups), "")
    return Features(job_suspend=minor >= 21, indexed_jobs=minor >= 21, indexed_trials=minor >= 22,
                    hpa_v2="autoscaling/v2" in groups, http_route=route, server_version=git)


def parse_args(argv: list[str], environ: Mapping[str, str] | None = None) -> tuple[OperatorSettings, argparse.Namespace]:
    """Settings from flags, then `KILN_*` variables (kiln.settings), then defaults; and the other flags."""
    p = argparse.ArgumentParser(prog="kiln operator", description="Run the Kiln operator (Kopf).")
    settings_reader.add_arguments(p, OperatorSettings)
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then KUBECONFIG)")
    p.add_argument("--policy", metavar="FILE", help="YAML file with the chart's `policy:` values (default: KILN_POLICY_FILE, "
                   "else the JSON in KILN_POLICY, else the safe defaults)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    found = settings_reader.values(OperatorSettings, args, os.environ if environ is None else environ)
    found["policy"] = load_policy_file(args.policy) if args.policy else policy_from_env(environ)
    if args.all_namespaces:
        found["namespaces"] = []
    if found.get("trial_mode", "auto") not in TRIAL_MODES:
        p.error(f"--trial-mode/KILN_TRIAL_MODE={found['trial_mode']!r}: use one of {', '.join(TRIAL_MODES)}")
    return OperatorSettings(**found), args


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """A diff base that is never built: Kiln has no change-detecting handlers (on.create/update/...).

    Kopf builds a deep-copied "essence" of every object on every watch event to detect changes; with
    only event handlers nothing reads it, and under a burst it was a tenth of the operator's CPU.
    `build_registry` refuses to use this if a change handler is ever registered.
    """

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()


def has_change_handlers(registry: kopf.OperatorRegistry) -> bool:
    """Whether any resource has Kopf change handlers (which need a real diff base)."""
    return any(True for _ in registry._changing.get_all_handlers())


def build_registry(settings: OperatorSettings) -> kopf.OperatorRegistry:
    """A registry with Kiln's handlers and the Kopf settings they rely on."""
    from kiln_operator.modeldeployment import controller as modeldeployment
    from kiln_operator.trainingjob import controller as trainingjob

    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Idle watches can go silent without an error (nolar/kopf#585): bound them on both sides.
        settings.watching.server_timeout = ops.watch_server_timeout
        settings.watching.client_timeout = ops.watch_client_timeout
        settings.watching.connect_timeout = 30
        settings.networking.request_timeout = ops.request_timeout
        # Keep Kopf's bookkeeping out of `status` (a structural schema would prune it).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = (
            kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration") if change_handlers
            else NoDiffBase(prefix=GROUP, key="last-handled-configuration"))
        settings.persistence.finalizer = f"{GROUP}/finalizer"
        # Kiln posts its own transition events; Kopf's per-handler chatter would cost an API call each.
        settings.posting.level = logging.WARNING
        settings.execution.max_workers = ops.max_workers
        # Blocking API calls run in threads: size the pool for many objects at once, not for the CPU count.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=ops.max_workers, thread_name_prefix="kiln-api"))
        settings.peering.standalone = not ops.peering
        if ops.peering:
            settings.peering.name = ops.peering
            settings.peering.priority = ops.priority
            settings.peering.mandatory = True
            settings.peering.lifetime = ops.peering_lifetime

    @kopf.on.cleanup(registry=registry)
    async def close_api_session(**_: Any) -> None:
        await kube.api().close()
        log.info("API calls made: %s", dict(kube.api().calls.most_common()))

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A custom registry does not inherit Kopf's default login handlers.
        return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)

    ops = settings
    trainingjob.register(registry, settings)
    modeldeployment.register(registry, settings)
    change_handlers = has_change_handlers(registry)
    return registry


def main(argv: list[str] | None = None) -> int:
    try:
        settings, args = parse_args(list(argv or []))
    except PolicyError as exc:
        print(f"kiln operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if not args.verbose:
        # Kopf logs "Handler ... succeeded" for every watch event; Kiln logs the transitions itself.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    client = kube.configure(args.kubeconfig, pool_size=settings.max_workers + 4, timeout=settings.request_timeout,
                            user_agent="kiln-operator")
    client.observe = metrics.api_request
    settings.features = detect_features(settings)
    metrics.install(settings.metrics_port, settings.metrics_address, args.verbose, bool(settings.peering))
    log.info("kiln operator starting: namespaces=%s server=%s features=%s", settings.namespaces or "all",
             settings.features.server_version, settings.features)
    delay = 1.0
    while True:
        started = time.monotonic()
        try:
            kopf.run(
                registry=build_registry(settings),
                clusterwide=not settings.namespaces,
                namespaces=settings.namespaces,
                standalone=not settings.peering,
                peering_name=settings.peering or None,
                priority=settings.priority,
                liveness_endpoint=settings.liveness or None,
            )
            return 0  # a signal stopped it
        except Exception as exc:
            # Kopf gives up when a watch fails hard, e.g. a CRD route answering 404 for a moment while a
            # restarted API server re-registers custom resources. Start over instead of exiting: state
            # lives in the cluster, and the caches refill from the first listing.
            delay = 1.0 if time.monotonic() - started > 60 else min(delay * 2, 30.0)
            metrics.OPERATOR_RESTARTS.inc()
            log.error("the operator stopped (%s: %s); starting again in %.0f s", type(exc).__name__, exc, delay)
            time.sleep(delay)
