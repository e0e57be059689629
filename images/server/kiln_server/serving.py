"""The serving state V1 and V2 share: the model's lifecycle, its batcher, draining, and request limits.

One object, owned by neither protocol, so each protocol reads readiness and the not-ready reason
from the same place and formats it its own way. Also here: what both protocols do to a request
body before decoding it (`decode_body`) and how both classify an ONNX Runtime failure
(`inference_failure`), since both must answer those alike.
"""

from __future__ import annotations

import logging
import zlib

from kiln_server.batching import Batcher
from kiln_server.messages import Request
from kiln_server.model import ModelHandle, OnnxModel
from kiln_server.protocol import ProtocolError

log = logging.getLogger("kiln_server.serving")


def _invalid_argument() -> type[BaseException]:
    """ONNX Runtime's exception for input a model refuses (imported late: onnxruntime is heavy)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    invalid: type[BaseException] = s.InvalidArgument
    return invalid


class ServingState:
    """The one served model as both protocols see it: loaded or not, draining or not, and its limits."""

    def __init__(self, handle: ModelHandle, max_body_bytes: int, max_elements: int) -> None:
        self.handle = handle
        self.batcher: Batcher | None = None
        self.max_body_bytes = max_body_bytes
        self.max_elements = max_elements
        self.draining = False
        self._invalid_arg = _invalid_argument()

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
        return "server is shutting down" if self.draining else self.handle.reason

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
        """Status and message for a failed inference: input the model rejects is the client's (400), the rest 500."""
        if isinstance(exc, self._invalid_arg):
            return 400, f"the model rejected the input: {str(exc).strip()[:500]}"
        log.warning("inference failed: %s", exc)
        return 500, f"inference failed: {str(exc).strip()[:500]}"
