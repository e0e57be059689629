"""Routing: maps method + path to the V2, V1 and metrics handlers, and turns errors into 4xx/5xx JSON.

`App` is the `messages.Application` the HTTP transport serves. The served model's routes are
precomputed as exact strings (one dict lookup per request); any other `/v2/models/...` or
`/v1/models/...` path goes through a slow parser only to say precisely which model or version is
unknown. Every error, the transport's included, is V2's `{"error": message}` document
(`v2.error_response`), which V1 shares.
"""

from __future__ import annotations

import json
import logging
import time
from urllib.parse import quote, unquote

from kiln_server.auth import TokenAuth
from kiln_server.messages import Deferred, Handler, Request, Response
from kiln_server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from kiln_server.metrics import Metrics
from kiln_server.protocol import ProtocolError
from kiln_server.v1 import V1Handler
from kiln_server.v2 import V2Handler, error_response

log = logging.getLogger("kiln_server.app")
access = logging.getLogger("kiln_server.access")

# path -> (route label, {method: handler})
RouteTable = dict[str, tuple[str, dict[bytes, Handler]]]


class App:
    """The request dispatcher the HTTP layer calls for every complete request."""

    def __init__(
        self, v2: V2Handler, v1: V1Handler, metrics: Metrics, model: str, version: str, access_log: bool = False,
        auth: TokenAuth | None = None,
    ) -> None:
        self.v2 = v2
        self.v1 = v1
        self.metrics = metrics
        self.model = model
        self.version = version
        self.access_log = access_log
        self.routes: RouteTable = {}
        self.auth = auth
        self._build_routes()

    def _add(self, path: str, label: str, methods: dict[bytes, Handler]) -> None:
        """One route under its path and, if different, its percent-encoded form (clients differ)."""
        self.routes[path] = (label, methods)
        encoded = quote(path, safe="/:")
        if encoded != path:
            self.routes[encoded] = (label, methods)

    def _build_routes(self) -> None:
        """Every route of the served model, labelled with its template for the metrics."""
        v2, v1 = self.v2, self.v1
        get, post = b"GET", b"POST"
        self._add("/v2/health/live", "/v2/health/live", {get: v2.live})
        self._add("/v2/health/ready", "/v2/health/ready", {get: v2.ready})
        self._add("/v2", "/v2", {get: v2.server_metadata})
        self._add("/metrics", "/metrics", {get: self.render_metrics})
        for base, suffix in ((f"/v2/models/{self.model}", ""), (f"/v2/models/{self.model}/versions/{self.version}", "/versions/{version}")):
            self._add(base, f"/v2/models/{{model}}{suffix}", {get: v2.model_metadata})
            self._add(f"{base}/ready", f"/v2/models/{{model}}{suffix}/ready", {get: v2.model_ready})
            self._add(f"{base}/infer", f"/v2/models/{{model}}{suffix}/infer", {post: v2.infer})
        self._add(f"/v1/models/{self.model}", "/v1/models/{model}", {get: v1.model_status})
        self._add(f"/v1/models/{self.model}:predict", "/v1/models/{model}:predict", {post: v1.predict})

    # --- dispatch ----------------------------------------------------------------------------

    def handle(self, req: Request) -> Response | Deferred:
        """Route one request; returns a Response, or a Deferred one for inference."""
        if self.auth is not None and (refused := self.auth.check(req)) is not None:
            return refused
        route = self.routes.get(req.path)
        if route is None and "%" in req.path:
            # Any percent-encoding of the same path routes alike (`%6Dlp`, lower-case hex escapes).
            route = self.routes.get(unquote(req.path))
        if route is None:
            return self._unrouted(req)
        label, methods = route
        req.route = label
        handler = methods.get(req.method)
        if handler is None and req.method == b"HEAD":
            handler = methods.get(b"GET")  # the transport writes the GET answer's head only
        if handler is None:
            allowed = ", ".join(m.decode() for m in methods) + (", HEAD" if b"GET" in methods else "")
            resp = error_response(405, f"method {req.method.decode('latin-1')} is not allowed on {req.path}; use {allowed}")
            resp.extra = f"allow: {allowed}\r\n".encode()
            return resp
        try:
            return handler(req)
        except ProtocolError as exc:
            resp = error_response(exc.status, exc.message)
            resp.extra = exc.extra
            return resp
        except Exception:
            log.exception("handler for %s failed", label)
            return error_response(500, "internal server error")

    def error_response(self, status: int, message: str) -> Response:
        """The transport's errors (malformed, too large, too slow) in the same document as the handlers'."""
        return error_response(status, message)

    def _unrouted(self, req: Request) -> Response:
        """Precise 404s for other models or versions; plain 404 for anything else."""
        path = unquote(req.path)
        parts = path.strip("/").split("/")
        msg = f"no route {req.method.decode('latin-1')} {req.path}"
        if len(parts) >= 3 and parts[0] == "v2" and parts[1] == "models":
            name = parts[2]
            rest = parts[3:]
            if name != self.model:
                msg = f"unknown model '{name}'; this server serves '{self.model}'"
            elif len(rest) >= 2 and rest[0] == "versions" and rest[1] != self.version:
                msg = f"model '{name}' has no version '{rest[1]}'; it serves version '{self.version}'"
            req.route = "/v2/models/{model}/*"
        elif len(parts) >= 3 and parts[0] == "v1" and parts[1] == "models":
            name = parts[2].split(":", 1)[0]
            if name != self.model:
                msg = f"unknown model '{name}'; this server serves '{self.model}'"
            req.route = "/v1/models/{model}*"
        return error_response(404, msg)

    def render_metrics(self, req: Request) -> Response:
        """`GET /metrics`: Prometheus text exposition."""
        return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)

    def record(self, req: Request, resp: Response) -> None:
        """Called by the HTTP layer for every response written: metrics and optional access log."""
        elapsed = time.perf_counter() - req.t0
        self.metrics.observe_request(req.route, resp.status, elapsed)
        if self.access_log:
            access.info(
                json.dumps(
                    {
                        "event": "request",
                        "method": req.method.decode("latin-1"),
                        "path": req.path,
                        "status": resp.status,
                        "ms": round(elapsed * 1000, 3),
                    }
                )
            )
