"""Prometheus metrics on `/metrics`, in prometheus_client's text format.

Labelled children are cached per (route, code) because `labels()` costs a lock and a tuple
lookup each time, which shows up at several thousand requests per second.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, exposition, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The classic text format every Prometheus understands (newer clients default to a 1.0.0 label).
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", "text/plain; version=0.0.4; charset=utf-8").encode()


class Metrics:
    """The server's metric families, in a registry of their own (no process/platform collectors mixed in
    unless asked), plus fast paths for the per-request updates."""

    def __init__(self, model: str, version: str) -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.version = version
        self.requests = Counter(
            "kiln_requests", "HTTP requests by route template and status code.", ["route", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kiln_request_duration_seconds", "Time from the end of a request to its response being written.",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            "kiln_batch_size", "Rows per ONNX Runtime call (dynamic batching merges requests).", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.batch_requests = Histogram(
            "kiln_batch_requests", "Requests merged per ONNX Runtime call.", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.load_seconds = Gauge(
            "kiln_model_load_seconds", "Seconds the last model load took (file check + session).",
            ["model", "version"], registry=self.registry,
        )
        self.ready = Gauge(
            "kiln_model_ready", "1 when the model is loaded and serving, else 0.", ["model", "version"],
            registry=self.registry,
        )
        self.ready.labels(model, version).set(0)
        self.inflight = Gauge(
            "kiln_inflight_requests", "Inference requests queued for or running in ONNX Runtime.",
            registry=self.registry,
        )
        self._req_children: dict[tuple[str, int], Counter] = {}
        self._lat_children: dict[str, Histogram] = {}
        self._batch_rows = self.batch_size.labels(model)
        self._batch_reqs = self.batch_requests.labels(model)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        """Count one response and record its latency."""
        key = (route, code)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self.requests.labels(route, str(code))
        child.inc()
        lat = self._lat_children.get(route)
        if lat is None:
            lat = self._lat_children[route] = self.latency.labels(route)
        lat.observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        """Record one ONNX Runtime call's size."""
        self._batch_rows.observe(rows)
        self._batch_reqs.observe(requests)

    def track_inflight(self, count: Callable[[], float]) -> None:
        """Read the in-flight count at scrape time (no per-request cost)."""
        self.inflight.set_function(count)

    def set_loaded(self, seconds: float, ready: bool) -> None:
        """Record the outcome of a load."""
        self.load_seconds.labels(self.model, self.version).set(seconds)
        self.ready.labels(self.model, self.version).set(1 if ready else 0)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)
