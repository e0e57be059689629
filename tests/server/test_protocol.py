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


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the server filters it too (protocol.py)
@pytest.mark.parametrize(
    ("datatype", "data", "shape", "needle"),
    [
        ("FP32", [1, 2], [1, 3], "2 elements"),
        ("FP32", [1, "a", 3], [1, 3], "must be numbers, got strings"),
        # Position does not matter (black-box finding: only a first null or "2" was refused).
        ("FP32", [1, 2, None], [1, 3], "must be numbers, got mixed or null values"),
        ("FP32", [None, 2, 3], [1, 3], "must be numbers"),
        ("FP32", [1, "2", 3], [1, 3], "must be numbers, got strings"),
        ("FP32", [[1, 2, 3], [4, 5, None]], [2, 3], "must be numbers"),
        ("FP32", [[1, 2, 3], [4, "5", 6]], [2, 3], "must be numbers"),
        ("FP32", [1, 1e39, 3], [1, 3], "out of range for FP32"),
        ("FP32", [[1e39, 2, 3]], [1, 3], "out of range for FP32"),
        ("FP16", [1, 70000, 3], [1, 3], "out of range for FP16"),
        ("FP32", [1, [2, 3]], [1, 3], "regular array"),
        ("FP32", [[1, 2, 3], [4, 5]], [2, 3], "regular array"),
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


def test_non_finite_outputs_go_binary_in_v2_and_as_strings_in_v1() -> None:
    """JSON has no NaN/Infinity (orjson would write null, which is not a V2 number): documented forms."""
    spec = TensorSpec("y", "FP32", [-1, 3])
    finite = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    body, head_len = protocol.encode_infer_response("m", "1", None, [(spec, finite, False)])
    assert head_len is None and orjson.loads(body)["outputs"][0]["data"] == [1.0, 2.0, 3.0]
    bad = np.array([[np.nan, np.inf, -1.0]], dtype=np.float32)
    body, head_len = protocol.encode_infer_response("m", "1", None, [(spec, bad, False)])
    assert head_len is not None
    entry = orjson.loads(body[:head_len])["outputs"][0]
    assert "data" not in entry and entry["parameters"]["binary_data_size"] == 12
    got = np.frombuffer(body[head_len:], dtype=np.float32)
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -1.0
    assert protocol.json_safe(bad) == [["NaN", "Infinity", -1.0]]
    assert protocol.json_safe(finite) is finite


def test_inputs_sharing_a_named_dim_must_agree() -> None:
    """Black-box finding: a [1,3] and a [2,3] input to one Add reached ONNX Runtime and came back as a 500."""
    specs = {n: TensorSpec(n, "FP32", [-1, 3], ("batch", None)) for n in ("a", "b")}
    doc = {"inputs": [
        {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
        {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
    ]}
    with pytest.raises(ProtocolError, match=r"input 'b': dimension 0 \('batch'\) is 2 but input 'a' gives 'batch' = 1") as info:
        parse_infer_request(orjson.dumps(doc), None, specs, OUT, 100)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        ([1.0, -2.5, 3e3], np.float32, True),
        ([3e38, 3e38], np.float32, True),  # finite, but the dot product overflows: the exact test decides
        ([1e300, 1e300], np.float64, True),
        ([1.0, np.nan, 2.0], np.float32, False),
        ([1.0, 2.0, np.inf], np.float64, False),
        ([-np.inf], np.float32, False),
        ([1.0, np.nan], np.float16, False),  # no BLAS dot for float16: the exact test
        ([1.0, 2.0], np.float16, True),
        ([], np.float32, True),
        ([1, 2], np.int64, True),
    ],
)
def test_all_finite_agrees_with_numpy(values: list[float], dtype: Any, expected: bool) -> None:
    arr = np.array(values, dtype=dtype)
    assert protocol.all_finite(arr) is expected
    assert protocol.all_finite(arr.reshape(1, -1)) is expected
    if arr.size > 1:
        assert protocol.all_finite(np.repeat(arr, 2)[::2]) is expected  # not contiguous


def test_all_finite_random_arrays_match_isfinite() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        arr = (rng.standard_normal(rng.integers(1, 50)) * 10.0 ** rng.integers(-5, 40)).astype(np.float32)
        if rng.random() < 0.3:
            arr[rng.integers(0, arr.size)] = rng.choice([np.nan, np.inf, -np.inf])
        assert protocol.all_finite(arr) == bool(np.isfinite(arr).all())
