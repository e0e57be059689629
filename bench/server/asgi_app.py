"""Kiln's application (routes, V2/V1 handlers, batcher, metrics) behind raw ASGI, for bench/server/http_layers.py.

The same `App` and handlers `kiln serve` runs, with only the transport swapped: an ASGI server
(uvicorn, granian) parses HTTP and calls `app`, which turns the scope and body into a
`kiln_server.messages.Request`, calls `App.handle`, awaits a `Deferred` through a future and
sends the `Response` back. That isolates what the hand-written transport (kiln_server/http.py)
is worth.

Bench-only, not part of kiln_server: it has none of the transport's limits and lifecycle (body
size limit, slow-request 408, 100-continue, SIGTERM drain, liveness before the model loads:
the model loads at import), and nothing in Kiln needs it.

Configured like `kiln serve`, from `KILN_*` variables (at least `KILN_MODEL`):

    KILN_MODEL=mlp.onnx KILN_MODEL_NAME=mlp .venv/bin/python -m uvicorn asgi_app:app --app-dir bench/server \\
        --http httptools --loop uvloop --no-access-log
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from kiln_server import settings as settings_mod
from kiln_server.app import App
from kiln_server.batching import Batcher
from kiln_server.messages import Request, Response
from kiln_server.metrics import Metrics
from kiln_server.model import ModelHandle
from kiln_server.serving import ServingState
from kiln_server.v1 import V1Handler
from kiln_server.v2 import V2Handler

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_settings = settings_mod.from_args([])
_handle = ModelHandle(_settings.model_name, _settings.version)
_loaded = _handle.load(_settings.model, _settings.providers, _settings.intra_op_threads, _settings.sha256)
if _loaded.model is None:
    raise SystemExit(f"asgi_app: {_handle.reason}")
_state = ServingState(_handle, _settings.max_body_bytes, _settings.max_elements)
_metrics = Metrics(_settings.model_name, _settings.version)
kiln_app = App(V2Handler(_state, "0"), V1Handler(_state), _metrics, _settings.model_name, _settings.version)


def _start_batcher() -> None:
    """The batcher wakes the loop it was made on, so it is made on the loop that serves requests."""
    assert _loaded.model is not None
    s = _settings
    batcher = Batcher(_loaded.model, s.inference_threads, s.max_batch_size, s.max_latency_ms, _metrics.observe_batch)
    _state.set_ready(batcher)
    _metrics.set_loaded(_loaded.seconds, True)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI entry point: HTTP requests go to Kiln's App; lifespan events are acknowledged."""
    kind = scope["type"]
    if kind == "lifespan":
        await _lifespan(receive, send)
        return
    if kind != "http":
        return
    if _state.batcher is None:
        _start_batcher()
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    raw_path = scope.get("raw_path")
    path = raw_path.decode("latin-1") if raw_path else scope["path"]
    req = Request(scope["method"].encode(), path, scope["query_string"].decode("latin-1"), dict(scope["headers"]), body, True)
    result = kiln_app.handle(req)
    if type(result) is Response:
        resp = result
    elif result.response is not None:
        resp = result.response
    else:
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        result.callback = future.set_result
        resp = await future
    headers = [(b"content-type", resp.content_type), (b"content-length", str(len(resp.body)).encode())]
    if resp.extra:
        for line in resp.extra.decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower().encode(), value.strip().encode()))
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    await send({"type": "http.response.body", "body": resp.body})
    kiln_app.record(req, resp)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Start the batcher on the serving loop at startup; stop its threads at shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if _state.batcher is None:
                _start_batcher()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if _state.batcher is not None:
                _state.batcher.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
