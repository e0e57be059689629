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
from typing import Any

from kiln_server import settings as settings_mod
from kiln_server.settings import Settings, SettingsError

log = logging.getLogger("kiln_server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
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
    try:
        from importlib.metadata import version

        return version("kiln")
    except Exception:
        return "0"


async def serve(s: Settings) -> int:
    """Run the server until SIGTERM/SIGINT (exit 0) or a load failure with exit-on-load-failure (exit 1)."""
    from kiln_server.app import App
    from kiln_server.batching import Batcher
    from kiln_server.fetch import FetchError, fetch, resolve_local
    from kiln_server.http import HttpServer
    from kiln_server.metrics import Metrics
    from kiln_server.model import ModelHandle
    from kiln_server.v1 import V1Handler
    from kiln_server.v2 import V2Handler

    loop = asyncio.get_running_loop()
    name = s.model_name
    handle = ModelHandle(name, s.version)
    metrics = Metrics(name, s.version)
    v2 = V2Handler(handle, _version(), s.max_body_bytes, s.max_elements)
    v1 = V1Handler(v2)
    app = App(v2, v1, metrics, name, s.version, s.access_log)
    server = HttpServer(app, s.max_body_bytes, s.keep_alive_timeout_s, s.request_timeout_s)
    await server.start(s.host, s.port)
    log.info(
        "listening",
        extra={"fields": {"event": "listening", "host": s.host, "port": server.port, "model_name": name}},
    )

    stop = asyncio.Event()
    exit_code = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def load() -> Any:
        local = resolve_local(s.model, s.pvc_root)
        if local is None:
            try:
                local = str(fetch(s.model, s.cache_dir.rstrip("/") + "/", sha256=s.sha256 or None).path)
            except FetchError as exc:
                handle.fail(str(exc))
                return None
        return handle.load(local, s.providers, s.intra_op_threads, s.sha256)

    async def load_model() -> None:
        nonlocal exit_code
        start = time.perf_counter()
        result = await loop.run_in_executor(None, load)
        seconds = result.seconds if result is not None else time.perf_counter() - start
        if handle.ready and result is not None and result.model is not None:
            model = result.model
            batcher = Batcher(
                model, s.inference_threads, s.max_batch_size, s.max_latency_ms, metrics.observe_batch,
                may_grow=server.has_idle_connection,
            )
            v2.set_ready(batcher)
            metrics.track_inflight(lambda: batcher.inflight)
            metrics.set_loaded(seconds, True)
            log.info(
                "model ready",
                extra={
                    "fields": {
                        "event": "model_ready",
                        "model_name": name,
                        "model_version": s.version,
                        "model": s.model,
                        "path": model.path,
                        "sha256": model.sha256,
                        "inputs": model.metadata()["inputs"],
                        "outputs": model.metadata()["outputs"],
                        "providers": model.providers,
                        "load_seconds": round(seconds, 4),
                        "host": s.host,
                        "port": server.port,
                        "max_batch_size": s.max_batch_size,
                        "max_latency_ms": s.max_latency_ms,
                        "batching": batcher.enabled,
                    }
                },
            )
            if s.max_batch_size > 1 and not batcher.enabled:
                log.warning(
                    "dynamic batching is off: the model's inputs and outputs do not all have a variable dim 0",
                    extra={"fields": {"event": "batching_disabled", "model_name": name}},
                )
        else:
            metrics.set_loaded(seconds, False)
            log.error(
                "model load failed",
                extra={
                    "fields": {
                        "event": "model_load_failed",
                        "model_name": name,
                        "model": s.model,
                        "reason": handle.reason,
                        "port": server.port,
                        "exit": s.exit_on_load_failure,
                    }
                },
            )
            if s.exit_on_load_failure:
                exit_code = 1
                stop.set()

    load_task = loop.create_task(load_model())
    await stop.wait()
    log.info("draining", extra={"fields": {"event": "shutdown", "inflight": server.inflight}})
    v2.draining = True
    clean = await server.drain(s.graceful_timeout_s)
    if not load_task.done():
        load_task.cancel()
    if v2.batcher is not None:
        v2.batcher.close()
    log.info("stopped", extra={"fields": {"event": "stopped", "clean": clean, "exit_code": exit_code}})
    return exit_code


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kiln serve ARGS`; returns the process exit status."""
    try:
        s = settings_mod.from_args(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"kiln serve: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help (0) or a bad flag (2)
        return int(exc.code or 0)
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
