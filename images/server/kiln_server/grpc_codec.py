"""Open Inference Protocol gRPC messages <-> numpy: decode a `ModelInferRequest`, encode a `ModelInferResponse`.

Kept apart from the service (grpc_service.py) so the conversion rules read in one place. Inputs
come either all as `raw_input_contents` (one bytes entry per input, the layout of the binary tensor
extension, decoded by the same `protocol` code as HTTP's binary tensors) or all as typed
`contents` (the repeated field matching the datatype). The answer mirrors the request: raw in, raw
out; typed in, typed out (unless an output is FP16, which has no typed field, so then all are raw).
Every client mistake raises `ProtocolError` (status 400 or 413), which the service maps to
INVALID_ARGUMENT or RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln_server import grpc_predict_v2_pb2
from kiln_server.protocol import (
    DATATYPE_TO_NUMPY,
    ProtocolError,
    TensorSpec,
    _check_shape,
    _elements,
    _from_binary,
    _raw_bytes,
)

pb: Any = grpc_predict_v2_pb2  # messages are built at import time: no static attributes to check

# V2 datatype -> (InferTensorContents field, allowed value range or None)
_TYPED_FIELD: dict[str, tuple[str, tuple[int, int] | None]] = {
    "BOOL": ("bool_contents", None),
    "INT8": ("int_contents", (-(2**7), 2**7 - 1)),
    "INT16": ("int_contents", (-(2**15), 2**15 - 1)),
    "INT32": ("int_contents", None),
    "INT64": ("int64_contents", None),
    "UINT8": ("uint_contents", (0, 2**8 - 1)),
    "UINT16": ("uint_contents", (0, 2**16 - 1)),
    "UINT32": ("uint_contents", None),
    "UINT64": ("uint64_contents", None),
    "FP32": ("fp32_contents", None),
    "FP64": ("fp64_contents", None),
    "BYTES": ("bytes_contents", None),
}
_ALL_FIELDS = sorted({f for f, _ in _TYPED_FIELD.values()})


@dataclass(slots=True)
class GrpcInfer:
    """A decoded, validated gRPC inference request."""

    feeds: dict[str, np.ndarray]
    outputs: list[str]
    rows: int
    raw: bool


def decode_request(
    req: Any, inputs: dict[str, TensorSpec], outputs: dict[str, TensorSpec], default_outputs: list[str], max_elements: int
) -> GrpcInfer:
    """Validate `req` (a ModelInferRequest) against the model; arrays keyed by input name."""
    raw_contents = req.raw_input_contents
    if raw_contents and len(raw_contents) != len(req.inputs):
        raise ProtocolError(400, f"raw_input_contents has {len(raw_contents)} entries but the request has {len(req.inputs)} inputs")
    if not req.inputs:
        raise ProtocolError(400, "request needs 'inputs': a non-empty list of tensors")
    feeds: dict[str, np.ndarray] = {}
    total = 0
    rows = -1
    for i, item in enumerate(req.inputs):
        name = item.name
        spec = inputs.get(name)
        if spec is None:
            raise ProtocolError(400, f"unknown input '{name}'; the model's inputs are {sorted(inputs)}")
        if name in feeds:
            raise ProtocolError(400, f"input '{name}' is given twice")
        if item.datatype != spec.datatype:
            if item.datatype not in DATATYPE_TO_NUMPY:
                raise ProtocolError(400, f"input '{name}': unsupported datatype {item.datatype!r}")
            raise ProtocolError(400, f"input '{name}': datatype {item.datatype} does not match the model's {spec.datatype}")
        shape = list(item.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(400, f"input '{name}': 'shape' must be non-negative integers, got {shape}")
        _check_shape(name, shape, spec)
        count = _elements(shape)
        total += count
        if total > max_elements:
            raise ProtocolError(413, f"request has more than {max_elements} tensor elements (the server's --max-elements)")
        if raw_contents:
            if item.HasField("contents"):
                raise ProtocolError(400, f"input '{name}': typed contents cannot be mixed with raw_input_contents")
            feeds[name] = _from_binary(name, memoryview(raw_contents[i]), spec, shape, count)
        else:
            feeds[name] = _from_typed(name, item.contents, spec, shape, count)
        if rows < 0:
            rows = shape[0] if shape else 1
    missing = [n for n in inputs if n not in feeds]
    if missing:
        raise ProtocolError(400, f"missing input(s) {missing}; the model needs {sorted(inputs)}")
    names = _requested(req, outputs, default_outputs)
    return GrpcInfer(feeds, names, max(rows, 0), bool(raw_contents))


def _requested(req: Any, outputs: dict[str, TensorSpec], default_outputs: list[str]) -> list[str]:
    """The outputs asked for, checked; all of the model's when the request names none."""
    names: list[str] = []
    for o in req.outputs:
        if o.name not in outputs:
            raise ProtocolError(400, f"unknown output '{o.name}'; the model's outputs are {sorted(outputs)}")
        if o.name in names:
            raise ProtocolError(400, f"output '{o.name}' is requested twice")
        names.append(o.name)
    return names or default_outputs


def _from_typed(name: str, contents: Any, spec: TensorSpec, shape: list[int], count: int) -> np.ndarray:
    """One input from its typed `contents`: the field of its datatype, the right count, values in range."""
    entry = _TYPED_FIELD.get(spec.datatype)
    if entry is None:  # FP16 has no typed field in the protocol
        raise ProtocolError(400, f"input '{name}': datatype {spec.datatype} can only be sent as raw_input_contents")
    field, bounds = entry
    others = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
    if others:
        raise ProtocolError(400, f"input '{name}': datatype {spec.datatype} takes {field}, but the request sets {others[0]}")
    values = getattr(contents, field)
    if len(values) != count:
        raise ProtocolError(400, f"input '{name}': {field} has {len(values)} elements but shape {shape} needs {count}")
    if spec.datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        try:
            arr[:] = [v.decode("utf-8") for v in values]
        except UnicodeDecodeError:
            raise ProtocolError(400, f"input '{name}': a BYTES element is not UTF-8") from None
        return arr.reshape(shape)
    if bounds is not None and count:
        lo, hi = min(values), max(values)
        if lo < bounds[0] or hi > bounds[1]:
            raise ProtocolError(400, f"input '{name}': a value is out of range for {spec.datatype}")
    return np.fromiter(values, dtype=spec.dtype, count=count).reshape(shape)


def encode_response(
    model_name: str, model_version: str, request_id: str, specs: list[TensorSpec], arrays: list[np.ndarray], raw: bool
) -> Any:
    """A ModelInferResponse with the outputs raw (`raw_output_contents`) or typed (`contents`)."""
    resp = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request_id)
    raw = raw or any(s.datatype not in _TYPED_FIELD for s in specs)
    for spec, arr in zip(specs, arrays, strict=True):
        out = resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=arr.shape)
        if raw:
            resp.raw_output_contents.append(_raw_bytes(arr))
            continue
        field = getattr(out.contents, _TYPED_FIELD[spec.datatype][0])
        flat = arr.reshape(-1)
        if spec.datatype == "BYTES":
            field.extend(x if isinstance(x, bytes) else str(x).encode("utf-8") for x in flat)
        else:
            field.extend(flat.tolist())
    return resp
