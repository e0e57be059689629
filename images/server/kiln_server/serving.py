"""The serving state V1 and V2 share: the model's lifecycle, its batcher, draining, and request limits.

One object, owned by neither protocol, so each protocol reads readiness and the not-ready reason
from the same place and formats it its own way. Also here: what both protocols do to a request
body before decoding it (`decode_body`), the queue bound and deadline every inference request
gets (`admit`), and how both classify an ONNX Runtime failure (`inference_failure`), since both
must answer those alike.
"""

from __future__ import annotations

import logging
import math
import time
import zlib

from kiln_server.batching import Batcher, DeadlineExceeded
from kiln_server.messages import Request
from kiln_server.model import ModelHandle, OnnxModel
from kiln_server.protocol import ProtocolError

log = logging.getLogger("kiln_server.serving")

DEADLINE_HEADER = b"x-request-deadline-ms"
_RETRY_AFTER = b"retry-after: 1\r\n"


def _client_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exceptions for input a loaded model cannot run on (imported late: onnxruntime is heavy).

    InvalidArgument is a refused feed; Fail is an operator failing on values that passed the
    signature check (e.g. inputs whose unnamed dims do not broadcast): both are the input's doing,
    since the same model runs on other inputs.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    return (s.InvalidArgument, s.Fail)


class ServingState:
    """The one served model as both protocols see it: loaded or not, draining or not, and its limits."""

    def __init__(
        self, handle: ModelHandle, max_body_bytes: int, max_elements: int, max_queue: int = 0,
        request_deadline_ms: float = 0.0,
    ) -> None:
        self.handle = handle
        self.batcher: Batcher | None = None
        self.max_body_bytes = max_body_bytes
        self.max_elements = max_elements
        self.max_queue = max_queue
        self.request_deadline_s = request_deadline_ms / 1000.0
        self.draining = False
        self.shed = 0  # inference requests refused with 503 because the queue was full
        self._client_errors = _client_errors()

    def set_ready(self, batcher: Batcher) -> None:
        """Called once the model is loaded: inference may start."""
        self.batcher = batcher

    @property
    def model(self) -> OnnxModel | None:
        """The loaded model, once there is one (metadata stays available while draining)."""
        batcher = self.batcher
        return batcher.model if batcher is not None else None

    @property
    def serving(self) -> bool:
        """Ready to run inference (loaded and not draining)."""
        return self.batcher is not None and not self.draining

    @property
    def unavailable_reason(self) -> str:
        """Why inference is refused right now: shutting down, or the model's load state."""
        if self.draining:
            return "server is shutting down"
        if self.handle.ready:  # loaded, not yet serving: the warmup runs
            return f"model '{self.handle.name}' is warming up"
        return self.handle.reason

    def admit(self, req: Request, batcher: Batcher) -> float:
        """Shed when the queue is full (503 + Retry-After, at once); else the request's deadline (0 = none).

        The deadline is the tighter of `--request-deadline-ms` and the client's `X-Request-Deadline-Ms`,
        counted from when the request was complete, as a `time.monotonic()` value.
        """
        if self.max_queue and batcher.inflight >= self.max_queue:
            self.shed += 1
            raise ProtocolError(
                503, f"the server's queue is full ({self.max_queue} inference requests); retry later", _RETRY_AFTER
            )
        budget = self.request_deadline_s
        raw = req.headers.get(DEADLINE_HEADER)
        if raw is not None:
            try:
                asked = float(raw) / 1000.0
            except ValueError:
                asked = -1.0
            if not (math.isfinite(asked) and asked > 0):
                raise ProtocolError(400, f"X-Request-Deadline-Ms {raw.decode('latin-1')!r} is not a number of milliseconds > 0")
            budget = asked if budget == 0 else min(budget, asked)
        if budget == 0:
            return 0.0
        return time.monotonic() + budget - (time.perf_counter() - req.t0)

    def decode_body(self, req: Request) -> bytes:
        """The request body with any `Content-Encoding: gzip|deflate` undone, bounded by `max_body_bytes`."""
        enc = req.headers.get(b"content-encoding")
        if enc is None or enc.strip().lower() == b"identity":
            return req.body
        kind = enc.strip().lower()
        if kind not in (b"gzip", b"deflate"):
            raise ProtocolError(400, f"Content-Encoding {enc.decode('latin-1')!r} is not supported (gzip, deflate)")
        limit = self.max_body_bytes
        d = zlib.decompressobj(zlib.MAX_WBITS | 16 if kind == b"gzip" else zlib.MAX_WBITS)
        try:
            out = d.decompress(req.body, limit + 1)
        except zlib.error as exc:
            raise ProtocolError(400, f"request body is not valid {kind.decode()}: {exc}") from None
        if len(out) > limit or d.unconsumed_tail:
            raise ProtocolError(413, f"decompressed request body is larger than the limit of {limit} bytes")
        return out

    def inference_failure(self, exc: BaseException) -> tuple[int, str]:
        """Status and message for a failed inference: input the model rejects is the client's (400),
        a deadline that passed in the queue 504, the rest 500."""
        if type(exc) is DeadlineExceeded:
            return 504, f"{exc} (deadline: --request-deadline-ms or X-Request-Deadline-Ms)"
        if isinstance(exc, self._client_errors):
            return 400, f"the model rejected the input: {str(exc).strip()[:500]}"
        log.warning("inference failed: %s", exc)
        return 500, f"inference failed: {str(exc).strip()[:500]}"
