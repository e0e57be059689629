"""`kiln serve` / `python -m kiln_server`: start the HTTP server, load the model, serve, drain on SIGTERM.

The socket opens before the model loads so the liveness probe passes during a slow load; the
ready routes answer 503 with the reason until the model is ready, and keep answering 503 with the
failure reason if loading fails (the process stays up to be inspected) unless
`--exit-on-load-failure` is given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from kiln_server import compiled_modules
from kiln_server import settings as settings_mod
from kiln_server.auth import AuthError
from kiln_server.auth import from_settings as auth_from_settings
from kiln_server.settings import Settings, SettingsError
from kiln_server.workers import worker_index

if TYPE_CHECKING:
    from kiln_server.grpc_service import GrpcServer
    from kiln_server.model import LoadResult, OnnxModel
    from kiln_server.workers import SharedMetrics

log = logging.getLogger("kiln_server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one JSON line (Kubernetes log collectors parse it as is)."""
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str) -> None:
    """JSON lines on stderr, which Kubernetes collects."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _version() -> str:
    """Kiln's installed version for `GET /v2`; "0" when run from sources without an install."""
    try:
        from importlib.metadata import version

        return version("kiln")
    except Exception:
        return "0"


class _Service:
    """The server's parts, wired once: routes over the shared serving state, metrics, the HTTP server.

    The socket opens before the model loads (`load` runs in the background), so liveness passes
    during a slow load and the ready routes say why they answer 503.
    """

    def __init__(self, s: Settings) -> None:
        from kiln_server.app import App
        from kiln_server.http import HttpServer
        from kiln_server.metrics import Metrics
        from kiln_server.model import ModelHandle
        from kiln_server.serving import ServingState
        from kiln_server.v1 import V1Handler
        from kiln_server.v2 import V2Handler

        self.s = s
        self.name = s.model_name
        self.handle = ModelHandle(self.name, s.version)
        self.state = ServingState(self.handle, s.max_body_bytes, s.max_elements, s.max_queue, s.request_deadline_ms)
        self.metrics = Metrics(self.name, s.version, s.revision)
        app = App(V2Handler(self.state, _version()), V1Handler(self.state), self.metrics, self.name, s.version, s.access_log,
                  auth=auth_from_settings(s.auth_token_file, s.auth_open_routes))
        self.server = HttpServer(app, s.max_body_bytes, s.keep_alive_timeout_s, s.request_timeout_s)
        self.stop = asyncio.Event()
        self.exit_code = 0
        self.worker = worker_index()
        self.grpc = self._grpc() if s.grpc_port else None
        self.shared_metrics = self._shared_metrics() if self.worker is not None else None

    def _grpc(self) -> GrpcServer:
        """The gRPC service on the shared state and metrics (imported only when enabled)."""
        from kiln_server.grpc_service import GrpcServer, InferenceService

        self.grpc_service = InferenceService(self.state, _version(), self.metrics)
        return GrpcServer(self.grpc_service, self.s.max_body_bytes, reuse_port=self.worker is not None)

    def _shared_metrics(self) -> SharedMetrics | None:
        """`--workers`: this worker's part of the pod-wide /metrics."""
        from kiln_server.workers import METRICS_DIR_ENV, SharedMetrics

        folder = os.environ.get(METRICS_DIR_ENV)
        if not folder or self.worker is None:
            return None
        metrics = self.metrics

        def answered() -> float:
            grpc_counts = self.grpc_service.metrics.counts if self.grpc is not None else {}
            return float(sum(metrics.request_counts.values()) + sum(grpc_counts.values()))

        shared = SharedMetrics(metrics.registry, folder, self.worker, answered)
        metrics.render_hook = shared.render
        return shared

    def write_metrics_soon(self) -> None:
        """Once a second: this worker's snapshot for the others' scrapes."""
        if self.shared_metrics is not None:
            self.shared_metrics.write()
            asyncio.get_running_loop().call_later(1.0, self.write_metrics_soon)

    def _load_blocking(self) -> LoadResult | None:
        """Fetch (remote URIs) and open the model; runs in an executor thread. None: the fetch failed."""
        from kiln_server.fetch import FetchError, fetch, resolve_local

        s = self.s
        local = resolve_local(s.model, s.pvc_root)
        if local is None:
            try:
                local = str(fetch(s.model, s.cache_dir.rstrip("/") + "/", sha256=s.sha256 or None).path)
            except FetchError as exc:
                self.handle.fail(str(exc))
                return None
        return self.handle.load(local, s.providers, s.intra_op_threads, s.sha256)

    async def load(self) -> None:
        """Load in the background; then serve, or report the failure (and stop, with exit-on-load-failure)."""
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self._load_blocking)
        seconds = result.seconds if result is not None else time.perf_counter() - start
        if self.handle.ready and result is not None and result.model is not None:
            warm = await loop.run_in_executor(None, self._warmup_blocking, result.model)
            self._ready(result.model, seconds, warm)
        else:
            self._failed(seconds)

    def _warmup_blocking(self, model: OnnxModel) -> tuple[float, int, str]:
        """`--warmup` calls at each batch size the batcher will form; runs in an executor thread."""
        from kiln_server.warmup import batch_sizes, run_warmup

        sizes = batch_sizes(self.s.max_batch_size, self.s.max_batch_size > 1 and model.batchable)
        return run_warmup(model, self.s.warmup, sizes)

    def _ready(self, model: OnnxModel, seconds: float, warm: tuple[float, int, str]) -> None:
        """Start the batcher (inference may begin) and log the model, the warmup and the serving settings."""
        from kiln_server.batching import Batcher

        s, metrics = self.s, self.metrics
        warm_s, warm_calls, warm_error = warm
        metrics.warmup_seconds.labels(*metrics.model_values()).set(warm_s)
        may_grow = self.server.has_idle_connection
        if self.grpc is not None:
            http_may_grow, grpc_may_grow = may_grow, self.grpc_service.may_grow
            may_grow = lambda: http_may_grow() or grpc_may_grow()  # noqa: E731
        batcher = Batcher(
            model, s.inference_threads, s.max_batch_size, s.max_latency_ms, metrics.observe_batch,
            may_grow=may_grow, inline_max_s=s.inline_max_us / 1e6,
        )
        self.state.set_ready(batcher)
        metrics.track_inflight(lambda: batcher.inflight)
        metrics.track_overload(lambda: self.state.shed, lambda: batcher.expired, lambda: batcher.inline)
        metrics.set_loaded(seconds, True)
        metrics.set_providers(model.providers)
        meta = model.metadata()
        fields = {
            "event": "model_ready", "model_name": self.name, "model_version": s.version, "model_revision": s.revision, "model": s.model,
            "path": model.path, "sha256": model.sha256, "inputs": meta["inputs"], "outputs": meta["outputs"],
            "providers": model.providers, "load_seconds": round(seconds, 4), "host": s.host, "port": self.server.port,
            "max_batch_size": s.max_batch_size, "max_latency_ms": s.max_latency_ms, "batching": batcher.enabled,
            "warmup_seconds": round(warm_s, 4), "warmup_inferences": warm_calls, "max_queue": s.max_queue,
            "request_deadline_ms": s.request_deadline_ms, "inline_max_us": s.inline_max_us if not batcher.enabled else 0,
            "grpc_port": self.grpc.port if self.grpc is not None else None, "worker": self.worker,
        }
        if warm_error:
            fields["warmup_error"] = warm_error
            log.warning("warmup stopped: the model failed on synthetic inputs", extra={"fields": {
                "event": "warmup_failed", "model_name": self.name, "reason": warm_error}})
        log.info("model ready", extra={"fields": fields})
        if s.max_batch_size > 1 and not batcher.enabled:
            log.warning(
                "dynamic batching is off: the model's inputs and outputs do not all have a variable dim 0",
                extra={"fields": {"event": "batching_disabled", "model_name": self.name}},
            )

    def _failed(self, seconds: float) -> None:
        """Log why the model cannot serve; with exit-on-load-failure, stop with exit status 1."""
        s = self.s
        self.metrics.set_loaded(seconds, False)
        fields = {
            "event": "model_load_failed", "model_name": self.name, "model": s.model, "reason": self.handle.reason,
            "port": self.server.port, "exit": s.exit_on_load_failure,
        }
        log.error("model load failed", extra={"fields": fields})
        if s.exit_on_load_failure:
            self.exit_code = 1
            self.stop.set()


async def serve(s: Settings) -> int:
    """Run the server until SIGTERM/SIGINT (exit 0) or a load failure with exit-on-load-failure (exit 1)."""
    loop = asyncio.get_running_loop()
    svc = _Service(s)
    server, state = svc.server, svc.state
    await server.start(s.host, s.port, reuse_port=svc.worker is not None)
    if svc.grpc is not None:
        await svc.grpc.start(s.host, s.grpc_port)
    fields: dict[str, Any] = {"event": "listening", "host": s.host, "port": server.port, "model_name": svc.name,
                              "compiled": compiled_modules()}
    if svc.grpc is not None:
        fields["grpc_port"] = svc.grpc.port
    if svc.worker is not None:
        fields.update(worker=svc.worker, pid=os.getpid())
    log.info("listening", extra={"fields": fields})
    svc.write_metrics_soon()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, svc.stop.set)
    load_task = loop.create_task(svc.load())
    await svc.stop.wait()
    log.info("draining", extra={"fields": {"event": "shutdown", "inflight": server.inflight}})
    state.draining = True
    if svc.grpc is not None:
        grpc_drain = loop.create_task(svc.grpc.drain(s.graceful_timeout_s))
        clean = await server.drain(s.graceful_timeout_s)
        await grpc_drain
    else:
        clean = await server.drain(s.graceful_timeout_s)
    if not load_task.done():
        load_task.cancel()
    if state.batcher is not None:
        state.batcher.close()
    log.info("stopped", extra={"fields": {"event": "stopped", "clean": clean, "exit_code": svc.exit_code}})
    return svc.exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kiln serve ARGS`; returns the process exit status."""
    try:
        s = settings_mod.from_args(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2)
        return int(exc.code or 0)
    try:
        auth_from_settings(s.auth_token_file, s.auth_open_routes)  # a bad token file stops here, before the socket opens
    except AuthError as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(s.log_level)
    if s.workers > 1 and worker_index() is None:
        from kiln_server.workers import supervise

        return supervise(sys.argv[1:] if argv is None else list(argv), s.workers, s.intra_op_threads, s.graceful_timeout_s)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is in the server extra on Linux
        loop_factory = None
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return int(runner.run(serve(s)))
    except OSError as exc:
        log.error("cannot listen", extra={"fields": {"event": "listen_failed", "reason": str(exc), "port": s.port}})
        return 1


if __name__ == "__main__":
    sys.exit(main())
