"""The server's V2 handler: Open Inference Protocol (KServe V2) health, metadata and inference.

Each public method takes a `Request` and returns a `Response` (or, for inference, a coroutine
resolving to one). Client mistakes raise `ProtocolError`, which the app turns into
`{"error": ...}` with the right 4xx status.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

import orjson

from kiln_server.batching import Batcher
from kiln_server.http import JSON, Deferred, Request, Response
from kiln_server.model import ModelHandle
from kiln_server.protocol import ProtocolError, encode_infer_response, error_body, parse_infer_request

log = logging.getLogger("kiln_server.v2")

OCTET = b"application/octet-stream"
_JSON_TYPES = frozenset({b"application/json", b"text/json"})
_BINARY_TYPES = frozenset({b"application/octet-stream", b"application/json", b"application/vnd.sagemaker-triton.binary+json"})
_LIVE = Response(200, b'{"live":true}')
_READY = Response(200, b'{"ready":true}')


def _ort_errors() -> tuple[type[BaseException], tuple[type[BaseException], ...]]:
    from onnxruntime.capi import onnxruntime_pybind11_state as s

    return s.InvalidArgument, (s.Fail, s.RuntimeException, s.NotImplemented, s.EPFail)


def not_ready(handle: ModelHandle, draining: bool) -> Response:
    """503 naming why the model cannot serve."""
    reason = "server is shutting down" if draining else handle.reason
    return Response(503, orjson.dumps({"error": reason, "ready": False}))


def decode_body(req: Request, limit: int) -> bytes:
    """The request body with any `Content-Encoding: gzip|deflate` undone, bounded by `limit` bytes."""
    enc = req.headers.get(b"content-encoding")
    if enc is None or enc.strip().lower() == b"identity":
        return req.body
    kind = enc.strip().lower()
    if kind not in (b"gzip", b"deflate"):
        raise ProtocolError(400, f"Content-Encoding {enc.decode('latin-1')!r} is not supported (gzip, deflate)")
    d = zlib.decompressobj(zlib.MAX_WBITS | 16 if kind == b"gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(req.body, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(400, f"request body is not valid {kind.decode()}: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(413, f"decompressed request body is larger than the limit of {limit} bytes")
    return out


class V2Handler:
    """Routes of the V2 protocol for the one model this server serves."""

    def __init__(self, handle: ModelHandle, server_version: str, max_body_bytes: int, max_elements: int) -> None:
        self.handle = handle
        self.batcher: Batcher | None = None
        self.max_body_bytes = max_body_bytes
        self.max_elements = max_elements
        self.draining = False
        self._invalid_arg, self._ort_fail = _ort_errors()
        self._server_metadata = Response(
            200,
            orjson.dumps({"name": "kiln", "version": server_version, "extensions": ["binary_tensor_data"]}),
        )
        self._metadata: Response | None = None
        self._model_ready: Response | None = None

    def set_ready(self, batcher: Batcher) -> None:
        """Called once the model is loaded: precompute the metadata responses."""
        model = batcher.model
        self.batcher = batcher
        self._metadata = Response(200, model.metadata_json)
        self._model_ready = Response(200, orjson.dumps({"name": model.name, "ready": True}))

    @property
    def serving(self) -> bool:
        """Ready to run inference (loaded and not draining)."""
        return self.batcher is not None and not self.draining

    # --- health and metadata -----------------------------------------------------------------

    def live(self, req: Request) -> Response:
        """Liveness: the process and its event loop answer."""
        return _LIVE

    def ready(self, req: Request) -> Response:
        """Server readiness: every model it serves (here: one) is loaded."""
        return _READY if self.serving else not_ready(self.handle, self.draining)

    def server_metadata(self, req: Request) -> Response:
        """`GET /v2`: name, version, extensions."""
        return self._server_metadata

    def model_ready(self, req: Request) -> Response:
        """`GET /v2/models/{m}/ready`."""
        if self.serving and self._model_ready is not None:
            return self._model_ready
        return not_ready(self.handle, self.draining)

    def model_metadata(self, req: Request) -> Response:
        """`GET /v2/models/{m}`: inputs and outputs as the model declares them."""
        if self._metadata is None:
            return not_ready(self.handle, False)
        return self._metadata

    # --- inference ---------------------------------------------------------------------------

    def infer(self, req: Request) -> Response | Deferred:
        """`POST /v2/models/{m}/infer`: validate, queue for (batched) ORT, encode JSON or binary."""
        batcher = self.batcher
        if batcher is None or self.draining:
            return not_ready(self.handle, self.draining)
        model = batcher.model
        headers = req.headers
        hl_raw = headers.get(b"inference-header-content-length")
        ctype = headers.get(b"content-type")
        if ctype is not None and ctype != b"application/json":
            base = ctype.split(b";", 1)[0].strip().lower()
            allowed = _JSON_TYPES if hl_raw is None else _BINARY_TYPES
            if base not in allowed:
                want = "application/json" if hl_raw is None else "application/octet-stream"
                raise ProtocolError(
                    400, f"Content-Type {ctype.decode('latin-1')!r} is not supported for inference; use {want}"
                )
        header_length: int | None = None
        if hl_raw is not None:
            try:
                header_length = int(hl_raw)
            except ValueError:
                raise ProtocolError(400, f"Inference-Header-Content-Length {hl_raw!r} is not a number") from None
        body = decode_body(req, self.max_body_bytes)
        parsed = parse_infer_request(body, header_length, model.inputs, model.outputs, self.max_elements)
        if parsed.outputs is None:
            names = model.output_names
            binary = [parsed.binary_output] * len(names)
        else:
            names = [o.name for o in parsed.outputs]
            binary = [o.binary for o in parsed.outputs]
        deferred = Deferred()
        rid = parsed.id

        def done(arrays: list[Any] | None, exc: BaseException | None) -> None:
            deferred.resolve(self._respond(arrays, exc, names, binary, rid))

        batcher.submit(parsed.inputs, names, parsed.rows, done)
        return deferred

    def inference_error(self, exc: BaseException) -> Response:
        """Map an ONNX Runtime failure: input the model rejects is the client's (400), the rest 500."""
        if isinstance(exc, self._invalid_arg):
            return Response(400, error_body(f"the model rejected the input: {str(exc).strip()[:500]}"))
        log.warning("inference failed: %s", exc)
        return Response(500, error_body(f"inference failed: {str(exc).strip()[:500]}"))

    def _respond(
        self, arrays: list[Any] | None, exc: BaseException | None, names: list[str], binary: list[bool], rid: str | None
    ) -> Response:
        if exc is not None or arrays is None:
            return self.inference_error(exc or RuntimeError("no result"))
        model = self.batcher.model  # type: ignore[union-attr]
        outs = model.outputs
        try:
            body, head_len = encode_infer_response(
                model.name, model.version, rid, [(outs[n], a, b) for n, a, b in zip(names, arrays, binary, strict=True)]
            )
        except Exception:
            log.exception("encoding the response failed")
            return Response(500, error_body("internal error while encoding the response"))
        if head_len is None:
            return Response(200, body, JSON)
        return Response(200, body, OCTET, b"inference-header-content-length: %d\r\n" % head_len)
