"""The V1 (TensorFlow Serving style, KServe V1) handler: model status and `:predict` with instances.

`{"instances": [row, ...]}` where a row is one input's value (single-input models) or an object
`{input_name: value}` (multi-input models). Predictions come back one per row: the output's
value (single-output models) or `{output_name: value}`.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import orjson

from kiln_server.http import Deferred, Request, Response
from kiln_server.protocol import ProtocolError, TensorSpec, error_body, tensor_from_json
from kiln_server.v2 import V2Handler, decode_body, not_ready

log = logging.getLogger("kiln_server.v1")


class V1Handler:
    """Routes of the V1 protocol, sharing the V2 handler's model and batcher."""

    def __init__(self, v2: V2Handler) -> None:
        self.v2 = v2

    def model_status(self, req: Request) -> Response:
        """`GET /v1/models/{m}`: `{"name", "ready"}`; 503 while not ready."""
        name = self.v2.handle.name
        if self.v2.serving:
            return Response(200, orjson.dumps({"name": name, "ready": True}))
        reason = not_ready(self.v2.handle, self.v2.draining)
        return Response(503, orjson.dumps({"name": name, "ready": False, "error": orjson.loads(reason.body)["error"]}))

    def predict(self, req: Request) -> Response | Deferred:
        """`POST /v1/models/{m}:predict`."""
        batcher = self.v2.batcher
        if batcher is None or self.v2.draining:
            return not_ready(self.v2.handle, self.v2.draining)
        model = batcher.model
        ctype = req.headers.get(b"content-type")
        if ctype is not None and ctype.split(b";", 1)[0].strip().lower() not in (b"application/json", b"text/json"):
            raise ProtocolError(400, f"Content-Type {ctype.decode('latin-1')!r} is not supported; use application/json")
        try:
            doc = orjson.loads(decode_body(req, self.v2.max_body_bytes))
        except orjson.JSONDecodeError as exc:
            raise ProtocolError(400, f"request body is not valid JSON: {exc}") from None
        if type(doc) is not dict or type(doc.get("instances")) is not list or not doc["instances"]:
            raise ProtocolError(400, "V1 predict needs {\"instances\": [...]} with at least one instance")
        instances: list[Any] = doc["instances"]
        specs = list(model.inputs.values())
        columns: dict[str, list[Any]]
        if len(specs) == 1:
            columns = {specs[0].name: instances}
        else:
            columns = {s.name: [] for s in specs}
            for row in instances:
                if type(row) is not dict:
                    raise ProtocolError(
                        400, f"this model has inputs {sorted(columns)}: each instance must be an object naming them"
                    )
                for s in specs:
                    if s.name not in row:
                        raise ProtocolError(400, f"an instance lacks input '{s.name}'")
                    columns[s.name].append(row[s.name])
                extra = set(row) - set(columns)
                if extra:
                    raise ProtocolError(400, f"unknown input(s) {sorted(extra)}; the model's inputs are {sorted(columns)}")
        n = len(instances)
        feeds: dict[str, np.ndarray] = {}
        total = 0
        for s in specs:
            feeds[s.name] = arr = self._column(s, columns[s.name], n)
            total += arr.size
            if total > self.v2.max_elements:
                raise ProtocolError(413, f"request has more than {self.v2.max_elements} tensor elements")
        names = model.output_names
        deferred = Deferred()

        def done(arrays: list[Any] | None, exc: BaseException | None) -> None:
            deferred.resolve(self._respond(arrays, exc, names))

        batcher.submit(feeds, names, n, done)
        return deferred

    @staticmethod
    def _column(spec: TensorSpec, values: list[Any], n: int) -> np.ndarray:
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
        if exc is not None or arrays is None:
            return self.v2.inference_error(exc or RuntimeError("no result"))
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


def _plain(arr: Any) -> Any:
    if isinstance(arr, np.ndarray) and arr.dtype.kind in "biuf":
        return np.ascontiguousarray(arr)
    if isinstance(arr, np.ndarray):
        return arr.tolist()
    return arr.item() if isinstance(arr, np.generic) else arr
