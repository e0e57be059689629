"""Prometheus metrics of the operator itself (`kiln operator --metrics-port PORT`, path /metrics).

What an operator of Kiln needs to see: how many reconciles ran and how they ended, how long they took,
what the API server answered, whether watches keep restarting, how much work is queued, what state
the resources are in, and whether this replica is the active one or a standby.

Gauges of resource state are computed at scrape time from the controllers' caches (no API calls);
counters are process-wide. One registry of our own, so a test or an embedding process never sees
another library's metrics mixed in.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter("kiln_operator_reconciles_total", "Reconciles run, by resource kind and result (success, error).",
                     ["kind", "result"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("kiln_operator_reconcile_duration_seconds", "Time one reconcile took, by resource kind.",
                              ["kind"], registry=REGISTRY,
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
IN_FLIGHT = Gauge("kiln_operator_reconciles_in_flight", "Reconciles running right now, by kind.", ["kind"], registry=REGISTRY)
API_REQUESTS = Counter("kiln_operator_api_requests_total",
                       "Requests to the Kubernetes API by the controllers, by verb and HTTP response code "
                       "(code 0: no response, the API server was unreachable).", ["verb", "code"], registry=REGISTRY)
WATCH_RESTARTS = Counter("kiln_operator_watch_restarts_total",
                         "Watch streams that had to be re-established (resource version expired, or silent too long), by resource.",
                         ["resource"], registry=REGISTRY)
WATCH_STARTS = Counter("kiln_operator_watch_starts_total", "Watch streams started, by resource.", ["resource"], registry=REGISTRY)
STATUS_WRITES = Counter("kiln_operator_status_writes_total", "Status patches written, by kind.", ["kind"], registry=REGISTRY)
OPERATOR_RESTARTS = Counter("kiln_operator_restarts_total", "Times the Kopf operator was started again after it stopped on an error.",
                            registry=REGISTRY)
LEADER = Gauge("kiln_operator_leader", "1 while this replica does the work, 0 while it is a paused standby (Kopf peering).",
               registry=REGISTRY)
LEADER_CHANGES = Counter("kiln_operator_leader_transitions_total", "Times this replica paused or resumed (Kopf peering).",
                         ["to"], registry=REGISTRY)


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    """Count and time one reconcile; an exception counts as result=error and propagates."""
    IN_FLIGHT.labels(kind).inc()
    started = time.perf_counter()
    result = "error"
    try:
        yield
        result = "success"
    finally:
        IN_FLIGHT.labels(kind).dec()
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)
        RECONCILES.labels(kind, result).inc()


def api_request(verb: str, code: int) -> None:
    API_REQUESTS.labels(verb, str(code)).inc()


Source = Callable[[], Iterable[tuple[str, dict[str, str], float]]]
"""Yields (metric name, labels, value) from a controller's caches at scrape time."""


class StateCollector(Collector):
    """Gauges computed from the controllers' caches when Prometheus scrapes."""

    HELP = {
        "kiln_operator_trainingjobs": ("TrainingJobs this replica knows, by phase.", ["phase"]),
        "kiln_operator_modeldeployments": ("ModelDeployments this replica knows, by readiness (Ready condition).", ["ready"]),
        "kiln_operator_queue_depth": ("Resources marked for a reconcile that has not started yet, by kind.", ["kind"]),
    }

    def __init__(self) -> None:
        self.sources: dict[str, Source] = {}
        self.lock = threading.Lock()

    def set_source(self, name: str, source: Source) -> None:
        """Register (or replace, after an operator restart) one controller's source."""
        with self.lock:
            self.sources[name] = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {name: GaugeMetricFamily(name, text, labels=labels) for name, (text, labels) in self.HELP.items()}
        with self.lock:
            sources = list(self.sources.values())
        for source in sources:
            try:
                samples = list(source())
            except RuntimeError:  # a cache changed size under us (another thread): skip this scrape's sample
                continue
            for name, labels, value in samples:
                family = families[name]
                family.add_metric([labels[k] for k in self.HELP[name][1]], value)
        yield from families.values()


STATE = StateCollector()
REGISTRY.register(STATE)


class KopfLogTap(logging.Filter):
    """Counts what only Kopf's log records tell: watch (re)starts and peering pause/resume.

    Kopf has no hooks for these; its log messages are stable across releases (1.29-1.45). Debug
    records are let through only when the operator runs verbose.
    """

    WATCH = re.compile(r"(?:Starting|Restarting) the watch-stream for (\S+)|Watch-stream for (\S+) .*inactive")

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        match = self.WATCH.search(message)
        if match:
            resource = match.group(1) or match.group(2)
            (WATCH_STARTS if message.startswith("Starting") else WATCH_RESTARTS).labels(resource).inc()
        elif message.startswith("Pausing operations") or message.startswith("Pausing all operators"):
            LEADER.set(0)
            LEADER_CHANGES.labels("standby").inc()
        elif message.startswith("Resuming operations"):
            LEADER.set(1)
            LEADER_CHANGES.labels("leader").inc()
        return record.levelno > logging.DEBUG or self.verbose


def install(port: int, address: str, verbose: bool, peering: bool) -> Any:
    """Tap Kopf's logs and, with a port, serve /metrics (a thread: scrapes never wait for the event loop)."""
    # With mandatory peering Kopf starts paused and logs "Resuming" once no higher-priority peer is alive.
    LEADER.set(0 if peering else 1)
    tap = KopfLogTap(verbose)
    for name in ("kopf._cogs.clients.watching", "kopf._core.engines.peering"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG)
        logger.addFilter(tap)
    if port:
        return start_http_server(port, addr=address, registry=REGISTRY)
    return None
