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
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from kiln_server import settings as settings_mod
from kiln_server.auth import AuthError
from kiln_server.auth import from_settings as auth_from_settings
from kiln_server.settings import Settings, SettingsError

if TYPE_CHECKING:
    from kiln_server.model import LoadResult, OnnxModel

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
        self.state = ServingState(self.handle, s.max_body_bytes, s.max_elements)
        self.metrics = Metrics(self.name, s.version)
        app = App(V2Handler(self.state, _version()), V1Handler(self.state), self.metrics, self.name, s.version, s.access_log,
                  auth=auth_from_settings(s.auth_token_file, s.auth_open_routes))
        self.server = HttpServer(app, s.max_body_bytes, s.keep_alive_timeout_s, s.request_timeout_s)
        self.stop = asyncio.Event()
        self.exit_code = 0

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
        result = await asyncio.get_running_loop().run_in_executor(None, self._load_blocking)
        seconds = result.seconds if result is not None else time.perf_counter() - start
        if self.handle.ready and result is not None and result.model is not None:
            self._ready(result.model, seconds)
        else:
            self._failed(seconds)

    def _ready(self, model: OnnxModel, seconds: float) -> None:
        """Start the batcher (inference may begin) and log the model and the serving settings."""
        from kiln_server.batching import Batcher

        s, metrics = self.s, self.metrics
        batcher = Batcher(
            model, s.inference_threads, s.max_batch_size, s.max_latency_ms, metrics.observe_batch,
            may_grow=self.server.has_idle_connection,
        )
        self.state.set_ready(batcher)
        metrics.track_inflight(lambda: batcher.inflight)
        metrics.set_loaded(seconds, True)
        meta = model.metadata()
        fields = {
            "event": "model_ready", "model_name": self.name, "model_version": s.version, "model": s.model,
            "path": model.path, "sha256": model.sha256, "inputs": meta["inputs"], "outputs": meta["outputs"],
            "providers": model.providers, "load_seconds": round(seconds, 4), "host": s.host, "port": self.server.port,
            "max_batch_size": s.max_batch_size, "max_latency_ms": s.max_latency_ms, "batching": batcher.enabled,
        }
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
    await server.start(s.host, s.port)
    log.info(
        "listening",
        extra={"fields": {"event": "listening", "host": s.host, "port": server.port, "model_name": svc.name}},
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, svc.stop.set)
    load_task = loop.create_task(svc.load())
    await svc.stop.wait()
    log.info("draining", extra={"fields": {"event": "shutdown", "inflight": server.inflight}})
    state.draining = True
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
