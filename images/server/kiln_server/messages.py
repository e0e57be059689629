"""The messages passed between the HTTP transport and the application, and the contract between them.

Neutral ground: `http.py` (the transport) and `app.py`, `v2.py`, `v1.py` (routing and protocols)
both import this module and not each other, so a protocol never depends on how bytes reach it and
the transport never knows a protocol's formats (it asks `Application.error_response` for those).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, final

JSON = b"application/json"


class Request:
    """A complete HTTP request as the app sees it (headers keyed by lower-case name)."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "route", "t0")

    def __init__(
        self, method: bytes, path: str, query: str, headers: dict[bytes, bytes], body: bytes, keep_alive: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.route = "other"  # the route template, set by the router: the metrics label
        self.t0 = time.perf_counter()


@final  # the transport tells the two apart by exact type (`type(r) is Response`)
class Response:
    """A complete HTTP response: status, body, content type and extra header lines."""

    __slots__ = ("body", "content_type", "extra", "status")

    def __init__(self, status: int, body: bytes, content_type: bytes = JSON, extra: bytes = b"") -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra  # pre-encoded "Name: value\r\n" lines


@final
class Deferred:
    """A response that comes later (inference): the handler calls `resolve` exactly once, on the loop.

    Cheaper than a coroutine + Task per request, which shows at thousands of requests per second.
    """

    __slots__ = ("callback", "response")

    def __init__(self) -> None:
        self.callback: Callable[[Response], None] | None = None
        self.response: Response | None = None

    def resolve(self, response: Response) -> None:
        """Deliver the response to the connection waiting for it (or keep it until one waits)."""
        cb = self.callback
        if cb is None:
            self.response = response
        else:
            self.callback = None
            cb(response)


Handler = Callable[[Request], "Response | Deferred"]
"""A route's handler: a Response now, or a Deferred one (inference)."""


class Application(Protocol):
    """What a transport needs from the application it serves (`app.App` is the one implementation)."""

    def handle(self, req: Request) -> Response | Deferred:
        """Answer one complete request."""
        ...

    def record(self, req: Request, resp: Response) -> None:
        """Account for a response the transport wrote (or could not write: the client left)."""
        ...

    def error_response(self, status: int, message: str) -> Response:
        """The body for an error the transport detects itself (malformed request, too large, too slow)."""
        ...
