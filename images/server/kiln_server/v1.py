"""The V1 (TensorFlow Serving style, KServe V1) handler: model status and `:predict` with instances.

`{"instances": [row, ...]}` where a row is one input's value (single-input models) or an object
`{input_name: value}` (multi-input models). Predictions come back one per row: the output's
value (single-output models) or `{output_name: value}`. Errors use the same `{"error": message}`
document as V2 (TensorFlow Serving's shape too). The model, batcher and readiness come from the
`ServingState` shared with V2.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import orjson

from kiln_server.messages import Deferred, Request, Response
from kiln_server.protocol import ProtocolError, TensorSpec, error_body, json_safe, tensor_from_json
from kiln_server.serving import ServingState

log = logging.getLogger("kiln_server.v1")
_JSON_TYPES = (b"application/json", b"text/json")


class V1Handler:
    """Routes of the V1 protocol for the one model this server serves."""

    def __init__(self, state: ServingState) -> None:
        self.state = state

    def model_status(self, req: Request) -> Response:
        """`GET /v1/models/{m}`: `{"name", "ready"}`; 503 with the reason while not ready."""
        state = self.state
        name = state.handle.name
        if state.serving:
            return Response(200, orjson.dumps({"name": name, "ready": True}))
        return Response(503, orjson.dumps({"name": name, "ready": False, "error": state.unavailable_reason}))

    def predict(self, req: Request) -> Response | Deferred:
        """`POST /v1/models/{m}:predict`: instances -> one input column each -> (batched) ORT -> predictions."""
        state = self.state
        batcher = state.batcher
        if batcher is None or state.draining:
            return Response(503, orjson.dumps({"error": state.unavailable_reason, "ready": False}))
        deadline = state.admit(req, batcher)
        model = batcher.model
        ctype = req.headers.get(b"content-type")
        if ctype is not None and ctype.split(b";", 1)[0].strip().lower() not in _JSON_TYPES:
            raise ProtocolError(400, f"Content-Type {ctype.decode('latin-1')!r} is not supported; use application/json")
        try:
            doc = orjson.loads(state.decode_body(req))
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(400, f"request body is not valid JSON: {exc}") from None
        if type(doc) is not dict or type(doc.get("instances")) is not list or not doc["instances"]:
            raise ProtocolError(400, "V1 predict needs {\"instances\": [...]} with at least one instance")
        instances: list[Any] = doc["instances"]
        specs = list(model.inputs.values())
        columns = _columns(specs, instances)
        n = len(instances)
        feeds: dict[str, np.ndarray] = {}
        total = 0
        for s in specs:
            feeds[s.name] = arr = self._column(s, columns[s.name], n)
            total += arr.size
            if total > state.max_elements:
                raise ProtocolError(413, f"request has more than {state.max_elements} tensor elements")
        names = model.output_names
        deferred = Deferred()

        def done(arrays: list[Any] | None, exc: BaseException | None) -> None:
            deferred.resolve(self._respond(arrays, exc, names))

        batcher.submit(feeds, names, n, done, deadline)
        return deferred

    @staticmethod
    def _column(spec: TensorSpec, values: list[Any], n: int) -> np.ndarray:
        """One input's values across the instances as a tensor, its shape checked against the model's."""
        if spec.datatype == "BYTES":
            shape = [n]
            count = n
        else:
            try:
                probe = np.array(values)
            except (ValueError, TypeError, OverflowError) as exc:
                raise ProtocolError(400, f"input '{spec.name}': instances are not a regular array: {exc}") from None
            shape = list(probe.shape)
            count = int(probe.size)
        if len(shape) != len(spec.shape) or any(e not in (-1, d) for e, d in zip(spec.shape, shape, strict=True)):
            raise ProtocolError(
                400, f"input '{spec.name}': instances have shape {shape}, the model needs {spec.shape} (-1 = any)"
            )
        return tensor_from_json(spec.name, values, spec, shape, count)

    def _respond(self, arrays: list[Any] | None, exc: BaseException | None, names: list[str]) -> Response:
        """Encode the predictions (on the loop, when the batcher delivers them), or the failure."""
        if exc is not None or arrays is None:
            status, message = self.state.inference_failure(exc or RuntimeError("no result"))
            return Response(status, error_body(message))
        try:
            if len(arrays) == 1:
                body = orjson.dumps({"predictions": _plain(arrays[0])}, option=orjson.OPT_SERIALIZE_NUMPY)
            else:
                rows = [{n: _plain(a[i]) for n, a in zip(names, arrays, strict=True)} for i in range(len(arrays[0]))]
                body = orjson.dumps({"predictions": rows}, option=orjson.OPT_SERIALIZE_NUMPY)
        except Exception:
            log.exception("encoding the V1 response failed")
            return Response(500, error_body("internal error while encoding the response"))
        return Response(200, body)


def _columns(specs: list[TensorSpec], instances: list[Any]) -> dict[str, list[Any]]:
    """Instances -> one list of values per input (multi-input instances must name every input)."""
    if len(specs) == 1:
        return {specs[0].name: instances}
    columns: dict[str, list[Any]] = {s.name: [] for s in specs}
    for row in instances:
        if type(row) is not dict:
            raise ProtocolError(400, f"this model has inputs {sorted(columns)}: each instance must be an object naming them")
        for s in specs:
            if s.name not in row:
                raise ProtocolError(400, f"an instance lacks input '{s.name}'")
            columns[s.name].append(row[s.name])
        extra = set(row) - set(columns)
        if extra:
            raise ProtocolError(400, f"unknown input(s) {sorted(extra)}; the model's inputs are {sorted(columns)}")
    return columns


def _plain(arr: Any) -> Any:
    """A prediction as orjson can write it: numeric arrays as they are, others as lists or scalars."""
    if isinstance(arr, np.ndarray) and arr.dtype.kind in "biuf":
        return json_safe(np.ascontiguousarray(arr))  # NaN/Infinity as strings: JSON has no such numbers
    if isinstance(arr, np.ndarray):
        return arr.tolist()
    if isinstance(arr, np.floating) and not np.isfinite(arr):
        return json_safe(np.array([arr]))[0]
    return arr.item() if isinstance(arr, np.generic) else arr
