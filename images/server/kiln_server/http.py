"""A small, fast HTTP/1.1 server: an asyncio Protocol on httptools' parser (llhttp), run on uvloop.

Transport only: it hands each complete request to an `Application` (messages.py; `app.App` in
the server) and writes the `Response` it returns, now or later through a `Deferred`; even the
body of its own error answers comes from `Application.error_response`.

Why not an ASGI server: the same `App` served by uvicorn (httptools + uvloop) or granian through
a raw ASGI adapter costs about 1.4x (uvicorn) and 2x (granian) the server CPU per request
(docs/benchmarks.md, "Why the server has its own HTTP layer"), and the model server's headline
is throughput.

Supported: keep-alive, pipelining (responses in request order, reading paused when too many
requests or bytes are queued, and a client that stops reading its answers dropped after the
request timeout), Content-Length and chunked request bodies (both limited by `max_body_bytes`; an
announced Content-Length over the limit is refused with 413 before the body is read; chunked
trailers are read and ignored), `Expect: 100-continue` (HTTP/1.1 only, sent once the earlier
pipelined answers are written), HEAD on every GET route, exactly one `Host` on HTTP/1.1, idle and
slow-request timeouts, and a graceful drain for SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from email.utils import formatdate

import httptools

from kiln_server.messages import Application, Request, Response

log = logging.getLogger("kiln_server.http")

REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
}
_STATUS_LINES = {code: f"HTTP/1.1 {code} {reason}\r\n".encode() for code, reason in REASONS.items()}
_MAX_PIPELINE = 32
_MAX_HEADER_BYTES = 64 * 1024
_MAX_URL_BYTES = 8192
# Reading pauses once this many body bytes of pipelined requests wait (or _MAX_PIPELINE requests):
# a client that sends and does not read pins at most this plus one request, not 33 bodies.
_MAX_QUEUED_BYTES = 4 * 1024 * 1024


class _Reject(Exception):
    """Why a request is refused while it is parsed: the status and message of the error answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.app = server.app
        # The parser holds this protocol (its callbacks) and this protocol the parser: a cycle that
        # connection_lost breaks, so a closed connection's buffers go at once, not at the next full GC.
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Request] = deque()
        self.busy = False
        self.write_paused = False
        self.read_paused = False
        self.discarding = False
        self.peer_closed = False
        self.in_message = False
        self.last_activity = time.monotonic()
        self.message_start = 0.0
        self.stalled_since = 0.0  # when the client stopped reading our answers (write side paused)
        self.queued_bytes = 0  # request bodies parsed and not yet handled
        self._in_trailers = False
        self._expect_continue = False
        self._host_seen = False
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._pending_fail: Response | None = None
        self._reject: _Reject | None = None

    # --- connection events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Track the connection; TCP_NODELAY, since each answer is one small write that must not wait."""
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection; a deferred answer still due is only recorded (see `_deferred_done`)."""
        self.server.connections.discard(self)
        self.transport = None
        self.queue.clear()
        self.queued_bytes = 0
        self.parser = None
        self._body = []
        self._headers = {}
        self._pending_fail = None

    def pause_writing(self) -> None:
        """The client reads slower than we answer: stop handling its queued requests until it catches up."""
        self.write_paused = True
        self.stalled_since = time.monotonic()

    def resume_writing(self) -> None:
        """The write buffer drained: carry on with the queued requests."""
        self.write_paused = False
        self._drain()

    def data_received(self, data: bytes) -> None:
        """Feed the parser; an unreadable request is answered (4xx) and ends the connection."""
        parser = self.parser
        if self.discarding or parser is None:
            return
        self.last_activity = time.monotonic()
        try:
            parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            reject, self._reject = self._reject, None
            if reject is not None:
                self._fail(reject.status, reject.message)
            else:
                log.exception("HTTP parser callback failed")
                self._fail(500, "internal error while reading the request")
            return
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self.queue and not self.busy:
            self._drain()

    def eof_received(self) -> bool | None:
        """Half-closed clients still get answers to what they sent; the connection closes after."""
        self.peer_closed = True
        return True if (self.busy or self.queue) else None

    # --- httptools callbacks -----------------------------------------------------------------

    def _rejecting(self, status: int, message: str) -> _Reject:
        """Remember why parsing stops (httptools wraps callback exceptions, losing their type)."""
        self._reject = _Reject(status, message)
        return self._reject

    def on_message_begin(self) -> None:
        """A new request starts: reset the per-request buffers and start its slow-request clock."""
        self.in_message = True
        self.message_start = time.monotonic()
        self._url = b""
        self._headers = {}
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._in_trailers = False
        self._expect_continue = False
        self._host_seen = False

    def on_url(self, url: bytes) -> None:
        """Collect the URL (it may come in pieces), bounded."""
        self._url += url
        if len(self._url) > _MAX_URL_BYTES:
            raise self._rejecting(414, f"request URI is longer than {_MAX_URL_BYTES} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep one header under its lower-case name (the last one wins), bounded in total size.

        Chunked trailers arrive through here too, after the headers: they are counted and ignored
        (a trailer must not pose as a header such as Content-Type). A second Host is refused.
        """
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > _MAX_HEADER_BYTES:
            raise self._rejecting(431, "request headers are larger than 64 KiB")
        if self._in_trailers:
            return
        key = name.lower()
        if key == b"host":
            if self._host_seen:
                raise self._rejecting(400, "request has more than one Host header")
            self._host_seen = True
        self._headers[key] = value

    def on_headers_complete(self) -> None:
        """Refuse an announced body over the limit before reading it; answer `Expect: 100-continue`."""
        self._in_trailers = True
        parser = self.parser
        if not self._host_seen and parser is not None and parser.get_http_version() == "1.1":
            raise self._rejecting(400, "HTTP/1.1 request has no Host header")
        limit = self.server.max_body_bytes
        cl = self._headers.get(b"content-length")
        if cl is not None:
            try:
                announced = int(cl)
            except ValueError:
                raise self._rejecting(400, f"Content-Length {cl!r} is not a number") from None
            if announced > limit:
                raise self._rejecting(
                    413, f"request body of {announced} bytes is larger than the limit of {limit} bytes"
                )
        expect = self._headers.get(b"expect")
        if (expect is not None and expect.lower() == b"100-continue" and parser is not None
                and parser.get_http_version() == "1.1"):
            # HTTP/1.0 clients must have the expectation ignored (RFC 9110 10.1.1). The interim answer
            # may not overtake earlier pipelined answers: it waits in `_drain` until they are written.
            self._expect_continue = True
            self._send_continue()

    def _send_continue(self) -> None:
        """Write the awaited `100 Continue` once no earlier answer is outstanding."""
        if self._expect_continue and not self.queue and not self.busy and self.transport is not None:
            self._expect_continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        """Collect body pieces (Content-Length or chunked), bounded by `max_body_bytes`."""
        self._body_size += len(body)
        if self._body_size > self.server.max_body_bytes:
            raise self._rejecting(
                413, f"request body is larger than the limit of {self.server.max_body_bytes} bytes"
            )
        self._body.append(body)

    def on_message_complete(self) -> None:
        """Queue the complete request; stop reading when too many pipelined requests or bytes wait."""
        self.in_message = False
        self._expect_continue = False  # the body is here: no interim answer is due any more
        parser = self.parser
        if parser is None:
            return
        url = self._url
        qpos = url.find(b"?")
        if qpos >= 0:
            path, query = url[:qpos].decode("latin-1"), url[qpos + 1 :].decode("latin-1")
        else:
            path, query = url.decode("latin-1"), ""
        parts = self._body
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        self._body = []  # the request owns the body now; the connection must not pin it
        self.queue.append(Request(parser.get_method(), path, query, self._headers, body, parser.should_keep_alive()))
        self.queued_bytes += len(body)
        if (
            len(self.queue) > _MAX_PIPELINE or self.queued_bytes > _MAX_QUEUED_BYTES
        ) and self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    # --- request processing ------------------------------------------------------------------

    def _drain(self) -> None:
        """Handle queued requests in order; an async handler blocks the queue until it answers."""
        while self.queue and not self.busy and not self.write_paused and self.transport is not None:
            req = self.queue.popleft()
            self.queued_bytes -= len(req.body)
            result = self.app.handle(req)
            if type(result) is Response:
                self._send(req, result)
            elif result.response is not None:
                self._send(req, result.response)
            else:
                self.busy = True
                self.server.inflight += 1
                result.callback = lambda resp, r=req: self._deferred_done(resp, r)
        transport = self.transport
        if transport is None:
            return
        if self.read_paused and len(self.queue) <= _MAX_PIPELINE // 2 and self.queued_bytes <= _MAX_QUEUED_BYTES // 2:
            self.read_paused = False
            transport.resume_reading()
        if self.busy or self.queue:
            return
        if self._pending_fail is not None:  # a parse error behind the answered requests: answer it last
            resp, self._pending_fail = self._pending_fail, None
            self._send_final(resp)
            return
        self._send_continue()
        if self.peer_closed:
            transport.close()

    def _deferred_done(self, resp: Response, req: Request) -> None:
        """An inference answer arrived: send it, then the queued requests (or a parse error held back)."""
        self.busy = False
        self.server.inflight -= 1
        if self.transport is None:
            self.app.record(req, resp)
            return
        self._send(req, resp)
        self._drain()

    def _send(self, req: Request, resp: Response, final: bool = False) -> None:
        """Write one response in a single write (small bodies); close after it unless keep-alive holds."""
        transport = self.transport
        self.app.record(req, resp)
        if transport is None:
            return
        keep = req.keep_alive and not self.server.draining and not final
        head = b"".join(
            (
                _STATUS_LINES.get(resp.status) or f"HTTP/1.1 {resp.status} Unknown\r\n".encode(),
                b"content-type: ",
                resp.content_type,
                b"\r\ncontent-length: ",
                str(len(resp.body)).encode(),
                b"\r\n",
                self.server.date_line,
                resp.extra,
                b"\r\n" if keep else b"connection: close\r\n\r\n",
            )
        )
        body = resp.body if req.method != b"HEAD" else b""
        if len(body) < 16384:
            transport.write(head + body)
        else:
            transport.writelines((head, body))
        self.last_activity = time.monotonic()
        if not keep and not final:
            self.queue.clear()
            transport.close()

    def _fail(self, status: int, message: str) -> None:
        """Answer an unreadable request, then stop reading requests from this connection.

        Requests parsed before the bad bytes (same read, pipelined) are answered first, in order;
        the error comes last. The write side is shut after it but bytes still arriving are read and
        dropped for a moment, so the client sees the status instead of a reset while it is still sending.
        """
        if self.transport is None:
            return
        self._pending_fail = self.app.error_response(status, message)
        self.discarding = True
        self.in_message = False
        self._expect_continue = False
        self._drain()

    def _send_final(self, resp: Response) -> None:
        """Write a last answer and shut the write side (the read side discards until the client closes)."""
        transport = self.transport
        self._send(Request(b"", "", "", {}, b"", True), resp, final=True)
        if transport is not None and not transport.is_closing():
            if transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def idle_check(self, now: float, keep_alive: float, request_timeout: float) -> None:
        """Close idle keep-alive connections, answer too-slow requests with 408, drop non-reading clients.

        A client that pipelines requests but does not read the answers holds at most its queued
        requests (bounded in count and bytes) and the transport's write buffer; once it has not
        read for `request_timeout` it is disconnected.
        """
        if self.transport is None:
            return
        if self.write_paused and now - self.stalled_since > request_timeout:
            log.info("closing a connection whose client stopped reading its answers")
            self.transport.abort()
        elif self.discarding and not self.busy and now - self.last_activity > 2.0:
            self.transport.close()
        elif self.in_message and now - self.message_start > request_timeout:
            self._fail(408, f"request not received within {request_timeout:g} s")
        elif not self.in_message and not self.busy and not self.queue and now - self.last_activity > keep_alive:
            self.transport.close()

    def close_if_idle(self) -> None:
        """During a drain: close connections that have nothing in flight."""
        if self.transport is not None and not self.busy and not self.queue and not self.in_message:
            self.transport.close()


class HttpServer:
    """Listening socket, live connections, a one-second housekeeping tick, and the drain for SIGTERM."""

    def __init__(self, app: Application, max_body_bytes: int, keep_alive_s: float, request_timeout_s: float) -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.max_body_bytes = max_body_bytes
        self.keep_alive_s = keep_alive_s
        self.request_timeout_s = request_timeout_s
        self.connections: set[HttpProtocol] = set()
        self.inflight = 0
        self.draining = False
        self.date_line = b""
        self._server: asyncio.base_events.Server | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        """Once a second: refresh the Date header line and enforce the idle and request timeouts."""
        self.date_line = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"
        now = time.monotonic()
        for conn in list(self.connections):
            conn.idle_check(now, self.keep_alive_s, self.request_timeout_s)
        self._tick_handle = self.loop.call_later(1.0, self._tick)

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """Bind and listen (SO_REUSEADDR; SO_REUSEPORT for `--workers`; backlog sized for bursts)."""
        self._server = await self.loop.create_server(
            lambda: HttpProtocol(self), host=host, port=port, reuse_address=True, reuse_port=reuse_port or None, backlog=2048
        )

    def has_idle_connection(self) -> bool:
        """True when some open connection has no request waiting, so more requests may come soon."""
        return not self.draining and self.inflight < len(self.connections)

    @property
    def port(self) -> int:
        """The bound port (useful when asked for port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight requests finish (answers carry `connection: close`), then close.

        Returns True when everything finished within `timeout`.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + timeout
        clean = True
        while True:
            for conn in list(self.connections):
                conn.close_if_idle()
            if not self.connections:
                break
            if time.monotonic() > deadline:
                clean = False
                break
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        return clean
