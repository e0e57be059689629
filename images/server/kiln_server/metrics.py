"""Prometheus metrics on `/metrics`, in prometheus_client's text format.

The per-request families (request counts, latency, batch sizes) are plain Python counters turned
into metric families only when scraped: prometheus_client's `labels().inc()` / `observe()` take a
lock and several calls each, which costs ~5% of the server's throughput at thousands of requests
per second. They are updated only on the event-loop thread, which also renders `/metrics`, so no
lock is needed. Rarely-changing gauges use prometheus_client directly.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The classic text format every Prometheus understands (newer clients default to a 1.0.0 label).
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", "text/plain; version=0.0.4; charset=utf-8").encode()


class _Histogram:
    """Bucket counts (non-cumulative, last slot = +Inf) and a running sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one value in its bucket."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative `(le, count)` pairs as Prometheus histograms expose them."""
        out: list[tuple[str, float]] = []
        acc = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            acc += n
            out.append((repr(float(bound)), acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out


class _Collector(Collector):
    """Turns the plain counters into metric families at scrape time (none of this runs per request)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        """The request, latency and batch families, from the counters as they are now."""
        m = self.m
        extra, values = m.extra_labels, m.extra_values
        requests = CounterMetricFamily(
            "kiln_requests", "HTTP requests by route template and status code.", labels=["route", "code", *extra]
        )
        for (route, code), n in sorted(m.request_counts.items()):
            requests.add_metric([route, str(code), *values], n)
        yield requests
        latency = HistogramMetricFamily(
            "kiln_request_duration_seconds",
            "Time from a complete request to its response being written.",
            labels=["route", *extra],
        )
        for route, h in sorted(m.latency.items()):
            latency.add_metric([route, *values], h.buckets(), h.total)
        yield latency
        for name, doc, h in (
            ("kiln_batch_size", "Rows per ONNX Runtime call (dynamic batching merges requests).", m.batch_rows),
            ("kiln_batch_requests", "Requests merged per ONNX Runtime call.", m.batch_reqs),
        ):
            fam = HistogramMetricFamily(name, doc, labels=["model", *extra])
            fam.add_metric([m.model, *values], h.buckets(), h.total)
            yield fam
        for name, doc, count in (
            ("kiln_requests_shed", "Inference requests refused with 503 because the queue was full (--max-queue).", m.shed),
            ("kiln_requests_expired", "Inference requests answered 504: their deadline passed while queued.", m.expired),
            ("kiln_inline_inferences", "ONNX Runtime calls run on the event loop (short calls, batching off).", m.inline),
        ):
            fam_c = CounterMetricFamily(name, doc, labels=["model", *extra])
            fam_c.add_metric([m.model, *values], count())
            yield fam_c


class Metrics:
    """The server's metric families, in a registry of their own, with cheap per-request updates."""

    def __init__(self, model: str, version: str, revision: str = "") -> None:
        self.registry = CollectorRegistry()
        self.model = model
        self.version = version
        # `--revision` (the operator passes the model's short digest): a `revision` label on the model and
        # request families, so a canary's series and the stable model's can be told apart and compared.
        self.extra_labels = ["revision"] if revision else []
        self.extra_values = [revision] if revision else []
        model_labels = ["model", "version", *self.extra_labels]
        self.request_counts: dict[tuple[str, int], int] = {}
        self.latency: dict[str, _Histogram] = {}
        self.batch_rows = _Histogram(BATCH_BUCKETS)
        self.batch_reqs = _Histogram(BATCH_BUCKETS)
        self.shed: Callable[[], float] = lambda: 0
        self.expired: Callable[[], float] = lambda: 0
        self.inline: Callable[[], float] = lambda: 0
        self.registry.register(_Collector(self))
        self.warmup_seconds = Gauge(
            "kiln_model_warmup_seconds", "Seconds the warmup inferences took before the model turned ready (--warmup).",
            model_labels, registry=self.registry,
        )
        # `--workers`: replaced by the pod-wide merge of every worker's samples (workers.SharedMetrics).
        self.render_hook: Callable[[], bytes] | None = None
        self.load_seconds = Gauge(
            "kiln_model_load_seconds", "Seconds the last model load took (file check + session).",
            model_labels, registry=self.registry,
        )
        self.ready = Gauge(
            "kiln_model_ready", "1 when the model is loaded and serving, else 0.", model_labels,
            registry=self.registry,
        )
        self.ready.labels(*self.model_values()).set(0)
        self.inflight = Gauge(
            "kiln_inflight_requests", "Inference requests queued for or running in ONNX Runtime.",
            registry=self.registry,
        )

    def model_values(self) -> list[str]:
        """The label values of the model gauges: model, version (and revision)."""
        return [self.model, self.version, *self.extra_values]

    def set_providers(self, providers: list[str]) -> None:
        """The ONNX Runtime execution providers the session uses, in priority order (1 each)."""
        gauge = Gauge(
            "kiln_model_execution_providers", "ONNX Runtime execution providers in use (1), e.g. CUDAExecutionProvider.",
            ["model", "provider"], registry=self.registry,
        )
        for p in providers:
            gauge.labels(self.model, p).set(1)

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        """Count one response and record its latency (event-loop thread only)."""
        key = (route, code)
        counts = self.request_counts
        counts[key] = counts.get(key, 0) + 1
        h = self.latency.get(route)
        if h is None:
            h = self.latency[route] = _Histogram(LATENCY_BUCKETS)
        h.observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        """Record one ONNX Runtime call's size (event-loop thread only)."""
        self.batch_rows.observe(rows)
        self.batch_reqs.observe(requests)

    def track_inflight(self, count: Callable[[], float]) -> None:
        """Read the in-flight count at scrape time (no per-request cost)."""
        self.inflight.set_function(count)

    def track_overload(self, shed: Callable[[], float], expired: Callable[[], float], inline: Callable[[], float]) -> None:
        """Read the shed (503), expired (504) and inline-call counts at scrape time."""
        self.shed = shed
        self.expired = expired
        self.inline = inline

    def set_loaded(self, seconds: float, ready: bool) -> None:
        """Record the outcome of a load."""
        self.load_seconds.labels(*self.model_values()).set(seconds)
        self.ready.labels(*self.model_values()).set(1 if ready else 0)

    def render(self) -> bytes:
        """The exposition text."""
        if self.render_hook is not None:
            return self.render_hook()
        return generate_latest(self.registry)
