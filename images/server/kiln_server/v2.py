"""The server's V2 handler: Open Inference Protocol (KServe V2) health, metadata and inference.

Each public method takes a `Request` and returns a `Response`, or for inference a `Deferred` that
is resolved when the batcher has the outputs. Client mistakes raise `ProtocolError`, which the app
turns into the V2 error document (`error_response`) with the right 4xx status. The model, its
batcher and readiness live in the `ServingState` this handler shares with V1.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from kiln_server.messages import JSON, Deferred, Request, Response
from kiln_server.model import OnnxModel
from kiln_server.protocol import ProtocolError, encode_infer_response, error_body, parse_infer_request
from kiln_server.serving import ServingState

log = logging.getLogger("kiln_server.v2")

OCTET = b"application/octet-stream"
_JSON_TYPES = frozenset({b"application/json", b"text/json"})
_BINARY_TYPES = frozenset({b"application/octet-stream", b"application/json", b"application/vnd.sagemaker-triton.binary+json"})
_LIVE = Response(200, b'{"live":true}')
_READY = Response(200, b'{"ready":true}')


def error_response(status: int, message: str) -> Response:
    """The V2 error document `{"error": message}` with `status`; the router's and the transport's errors use it too."""
    return Response(status, error_body(message))


def not_ready(state: ServingState) -> Response:
    """503 naming why the model cannot serve."""
    return Response(503, orjson.dumps({"error": state.unavailable_reason, "ready": False}))


class V2Handler:
    """Routes of the V2 protocol for the one model this server serves."""

    def __init__(self, state: ServingState, server_version: str) -> None:
        self.state = state
        self._server_metadata = Response(
            200,
            orjson.dumps({"name": "kiln", "version": server_version, "extensions": ["binary_tensor_data"]}),
        )
        # Encoded on first use once the model is loaded, then answered as they are.
        self._metadata: Response | None = None
        self._model_ready: Response | None = None

    # --- health and metadata -----------------------------------------------------------------

    def live(self, req: Request) -> Response:
        """Liveness: the process and its event loop answer."""
        return _LIVE

    def ready(self, req: Request) -> Response:
        """Server readiness: every model it serves (here: one) is loaded."""
        return _READY if self.state.serving else not_ready(self.state)

    def server_metadata(self, req: Request) -> Response:
        """`GET /v2`: name, version, extensions."""
        return self._server_metadata

    def model_ready(self, req: Request) -> Response:
        """`GET /v2/models/{m}/ready`."""
        model = self.state.model
        if model is None or not self.state.serving:
            return not_ready(self.state)
        resp = self._model_ready
        if resp is None:
            resp = self._model_ready = Response(200, orjson.dumps({"name": model.name, "ready": True}))
        return resp

    def model_metadata(self, req: Request) -> Response:
        """`GET /v2/models/{m}`: inputs and outputs as the model declares them (also while draining)."""
        resp = self._metadata
        if resp is None:
            model = self.state.model
            if model is None:
                return Response(503, orjson.dumps({"error": self.state.handle.reason, "ready": False}))
            resp = self._metadata = Response(200, model.metadata_json)
        return resp

    # --- inference ---------------------------------------------------------------------------

    def infer(self, req: Request) -> Response | Deferred:
        """`POST /v2/models/{m}/infer`: validate, queue for (batched) ORT, encode JSON or binary."""
        state = self.state
        batcher = state.batcher
        if batcher is None or state.draining:
            return not_ready(state)
        deadline = state.admit(req, batcher)
        model = batcher.model
        header_length = _header_length(req.headers)
        body = state.decode_body(req)
        parsed = parse_infer_request(body, header_length, model.inputs, model.outputs, state.max_elements)
        if parsed.outputs is None:
            names = model.output_names
            binary = [parsed.binary_output] * len(names)
        else:
            names = [o.name for o in parsed.outputs]
            binary = [o.binary for o in parsed.outputs]
        deferred = Deferred()
        rid = parsed.id

        def done(arrays: list[Any] | None, exc: BaseException | None) -> None:
            deferred.resolve(self._respond(model, arrays, exc, names, binary, rid))

        batcher.submit(parsed.inputs, names, parsed.rows, done, deadline)
        return deferred

    def _respond(
        self,
        model: OnnxModel,
        arrays: list[Any] | None,
        exc: BaseException | None,
        names: list[str],
        binary: list[bool],
        rid: str | None,
    ) -> Response:
        """Encode the outputs (on the loop, when the batcher delivers them), or the failure."""
        if exc is not None or arrays is None:
            return error_response(*self.state.inference_failure(exc or RuntimeError("no result")))
        outs = model.outputs
        try:
            body, head_len = encode_infer_response(
                model.name, model.version, rid, [(outs[n], a, b) for n, a, b in zip(names, arrays, binary, strict=True)]
            )
        except Exception:
            log.exception("encoding the response failed")
            return error_response(500, "internal error while encoding the response")
        if head_len is None:
            return Response(200, body, JSON)
        return Response(200, body, OCTET, b"inference-header-content-length: %d\r\n" % head_len)


def _header_length(headers: dict[bytes, bytes]) -> int | None:
    """Check Content-Type against the request kind; the binary extension's JSON header length, if any."""
    hl_raw = headers.get(b"inference-header-content-length")
    ctype = headers.get(b"content-type")
    if ctype is not None and ctype != b"application/json":
        base = ctype.split(b";", 1)[0].strip().lower()
        allowed = _JSON_TYPES if hl_raw is None else _BINARY_TYPES
        if base not in allowed:
            want = "application/json" if hl_raw is None else "application/octet-stream"
            raise ProtocolError(400, f"Content-Type {ctype.decode('latin-1')!r} is not supported for inference; use {want}")
    if hl_raw is None:
        return None
    try:
        return int(hl_raw)
    except ValueError:
        raise ProtocolError(400, f"Inference-Header-Content-Length {hl_raw!r} is not a number") from None
