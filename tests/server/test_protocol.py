"""The V2 decoder in-process: the simdjson fast path and the general path agree, and both refuse the same input."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from kiln_server import protocol
from kiln_server.protocol import JsonLoader, ProtocolError, TensorSpec, parse_infer_request

pytestmark = pytest.mark.server

SPECS = {
    "FP32": TensorSpec("x", "FP32", [-1, 3]),
    "FP64": TensorSpec("x", "FP64", [-1, 3]),
    "FP16": TensorSpec("x", "FP16", [-1, 3]),
    "INT8": TensorSpec("x", "INT8", [-1, 3]),
    "UINT8": TensorSpec("x", "UINT8", [-1, 3]),
    "INT64": TensorSpec("x", "INT64", [-1, 3]),
    "UINT64": TensorSpec("x", "UINT64", [-1, 3]),
    "BOOL": TensorSpec("x", "BOOL", [-1, 3]),
}
OUT = {"y": TensorSpec("y", "FP32", [-1])}


class _OrjsonOnly(JsonLoader):
    def __init__(self) -> None:
        self._parser = None


def _body(datatype: str, data: Any, shape: list[int]) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": shape, "datatype": datatype, "data": data}]}).encode()


def _both(datatype: str, data: Any, shape: list[int]) -> list[Any]:
    out = []
    for loader in (JsonLoader(), _OrjsonOnly()):
        try:
            req = parse_infer_request(_body(datatype, data, shape), None, {"x": SPECS[datatype]}, OUT, 10**6, loader)
            out.append(req.inputs["x"])
        except ProtocolError as exc:
            out.append((exc.status, exc.message))
    return out


@pytest.mark.skipif(protocol._simdjson is None, reason="pysimdjson not installed")
@pytest.mark.parametrize(
    ("datatype", "data", "shape"),
    [
        ("FP32", [0.1, 2, -3.5e-8, 1e30, 0, 7], [2, 3]),
        ("FP32", [[0.1, 2, 3], [4, 5, 6]], [2, 3]),
        ("FP64", [0.1, 2, -3.5e-300, 1e300, 0, 7], [2, 3]),
        ("FP16", [0.5, 2, -3, 1000, 0, 7], [2, 3]),
        ("INT8", [-128, 127, 0], [1, 3]),
        ("UINT8", [0, 255, 7], [1, 3]),
        ("INT64", [-(2**63), 2**63 - 1, 0], [1, 3]),
        ("UINT64", [2**64 - 1, 0, 1], [1, 3]),
        ("BOOL", [True, False, True], [1, 3]),
    ],
)
def test_fast_and_general_paths_agree(datatype: str, data: Any, shape: list[int]) -> None:
    fast, general = _both(datatype, data, shape)
    assert fast.dtype == general.dtype == SPECS[datatype].dtype
    assert fast.shape == general.shape == tuple(shape)
    np.testing.assert_array_equal(fast, general)


@pytest.mark.parametrize(
    ("datatype", "data", "shape", "needle"),
    [
        ("FP32", [1, 2], [1, 3], "2 elements"),
        ("FP32", [1, "a", 3], [1, 3], "regular array"),
        ("FP32", [1, [2, 3]], [1, 3], "regular array"),
        ("FP32", [[1, 2, 3], [4, 5]], [2, 3], "regular array"),
        ("FP32", [1, None, 3], [1, 3], ""),
        ("INT8", [1, 200, 3], [1, 3], "out of range for INT8"),
        ("UINT8", [1, -1, 3], [1, 3], "out of range for UINT8"),
        ("INT64", [1, 2.5, 3], [1, 3], "must be integers"),
        ("INT64", [1, 2**70, 3], [1, 3], ""),
        ("BOOL", [1, 0, 1], [1, 3], "must be booleans"),
    ],
)
def test_fast_and_general_paths_refuse_alike(datatype: str, data: Any, shape: list[int], needle: str) -> None:
    results = _both(datatype, data, shape)
    for res in results:
        if datatype == "FP32" and data == [1, None, 3]:
            # JSON null in float data: NaN on both paths (JSON has no NaN literal)
            assert isinstance(res, np.ndarray) and np.isnan(res[0, 1])
            continue
        assert isinstance(res, tuple), f"accepted {data!r} as {res!r}"
        status, message = res
        assert status == 400
        assert needle in message
    if isinstance(results[0], tuple):
        assert results[0] == results[1]


def test_invalid_json_message_names_position() -> None:
    with pytest.raises(ProtocolError, match=r"not valid JSON: .*line 1 column") as info:
        parse_infer_request(b'{"inputs": [1,', None, {"x": SPECS["FP32"]}, OUT, 100)
    assert info.value.status == 400


def test_loader_survives_a_live_document() -> None:
    """A parser whose previous document is still referenced is replaced, not an error."""
    loader = JsonLoader()
    first = loader.load(_body("FP32", [1, 2, 3], [1, 3]))
    second = loader.load(_body("FP32", [4, 5, 6], [1, 3]))
    assert orjson.loads(_body("FP32", [4, 5, 6], [1, 3]))["inputs"][0]["shape"] == second["inputs"][0]["shape"]
    assert first["inputs"][0]["name"] == "x"


def test_keys_with_escapes_fall_back_cleanly() -> None:
    """simdjson cannot look up keys containing \\u0000; the loader must still decode the request (fuzz finding)."""
    body = b'{"a\\u0000b": 1, "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3], "\\u0000": {}}]}'
    req = parse_infer_request(body, None, {"x": SPECS["FP32"]}, OUT, 100)
    np.testing.assert_array_equal(req.inputs["x"], np.array([[1, 2, 3]], dtype=np.float32))


@pytest.mark.skipif(protocol._simdjson is None, reason="pysimdjson not installed")
def test_tensor_data_stays_lazy_for_the_typed_buffer_path() -> None:
    # Regression: iterating simdjson objects with items() converted the data to Python floats, which
    # silently bypassed the typed-buffer path (same results, a third of the speed).
    body = json.dumps({"id": "x", "parameters": {"a": 1}, "inputs": [
        {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0.5, 1.5, 2.5, 3.5]}]}).encode()
    loader = JsonLoader()
    doc = loader.load(body)
    assert isinstance(doc["inputs"][0]["data"], protocol._simdjson.Array)
    assert doc["id"] == "x" and doc["parameters"] == {"a": 1} and doc["inputs"][0]["shape"] == [1, 4]
    del doc
    spec = {"input": TensorSpec("input", "FP32", [-1, 4])}
    req = parse_infer_request(body, None, spec, {}, 10_000, loader)
    np.testing.assert_array_equal(req.inputs["input"], np.array([[0.5, 1.5, 2.5, 3.5]], dtype=np.float32))
    # A key simdjson cannot look up again (an escape) still decodes, through orjson.
    assert loader.load(b'{"a\\u0000b": 1, "inputs": []}') == {"a\x00b": 1, "inputs": []}
