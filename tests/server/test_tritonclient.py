"""Interoperability with a V2 client written by others: `tritonclient.http`, JSON and binary tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from support.server import Server, ort_session
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.server


def _client(server: Server) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}", connection_timeout=10, network_timeout=30)


def test_health_and_metadata(mlp_server: Server) -> None:
    c = _client(mlp_server)
    assert c.is_server_live()
    assert c.is_server_ready()
    assert c.is_model_ready("mlp")
    assert c.is_model_ready("mlp", "1")
    assert not c.is_model_ready("other")
    meta = c.get_model_metadata("mlp")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1000]}]
    assert c.get_server_metadata()["name"] == "kiln"
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        c.get_model_metadata("other")


@pytest.mark.parametrize("binary_in", [False, True])
@pytest.mark.parametrize("binary_out", [False, True])
def test_infer_json_and_binary(mlp_server: Server, model_dir: Path, binary_in: bool, binary_out: bool) -> None:
    x = np.random.default_rng(11).standard_normal((4, 1000)).astype(np.float32)
    expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)
    res = _client(mlp_server).infer("mlp", [inp], outputs=[out], request_id="t-1")
    got = res.as_numpy("probabilities")
    assert got.dtype == np.float32
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    response = res.get_response()
    assert response["id"] == "t-1"
    assert response["model_name"] == "mlp"
    if binary_out:
        assert response["outputs"][0]["parameters"]["binary_data_size"] == 4 * 10 * 4
    else:
        assert "data" in response["outputs"][0]


def test_default_outputs_come_back_binary(two_io_server: Server) -> None:
    """Without `outputs`, tritonclient asks `binary_data_output: true` for every output."""
    a = np.array([[1, 2, 3], [4, 0, 0]], dtype=np.float32)
    b = np.ones((2, 3), dtype=np.float32)
    ia = httpclient.InferInput("a", [2, 3], "FP32")
    ia.set_data_from_numpy(a)
    ib = httpclient.InferInput("b", [2, 3], "FP32")
    ib.set_data_from_numpy(b, binary_data=False)  # mixed: one binary, one JSON
    res = _client(two_io_server).infer("two", [ia, ib], model_version="1")
    np.testing.assert_array_equal(res.as_numpy("sum"), a + b)
    np.testing.assert_array_equal(res.as_numpy("argmax"), np.array([2, 0], dtype=np.int64))
    assert all("binary_data_size" in o["parameters"] for o in res.get_response()["outputs"])


def test_int64_bool_binary(int64_server: Server) -> None:
    ids = np.array([[1, -2, 3, 0], [5, 6, -7, 8]], dtype=np.int64)
    inp = httpclient.InferInput("ids", [2, 4], "INT64")
    inp.set_data_from_numpy(ids)
    res = _client(int64_server).infer("ints", [inp])
    np.testing.assert_array_equal(res.as_numpy("doubled"), ids * 2)
    np.testing.assert_array_equal(res.as_numpy("is_positive"), ids > 0)


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_tensors(strings_server: Server, binary: bool) -> None:
    text = np.array(["alpha", "β", ""], dtype=np.object_)
    inp = httpclient.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(text, binary_data=binary)
    out = httpclient.InferRequestedOutput("echo", binary_data=binary)
    res = _client(strings_server).infer("strings", [inp], outputs=[out])
    got = res.as_numpy("echo")
    decoded = [v.decode() if isinstance(v, bytes) else v for v in got.tolist()]
    assert decoded == ["alpha", "β", ""]


def test_errors_surface_in_client(mlp_server: Server) -> None:
    inp = httpclient.InferInput("input", [1, 999], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 999), dtype=np.float32))
    with pytest.raises(InferenceServerException, match=r"shape \[1, 999\]"):
        _client(mlp_server).infer("mlp", [inp])


def test_gzip_request_body(mlp_server: Server, model_dir: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 1000)).astype(np.float32)
    inp = httpclient.InferInput("input", [1, 1000], "FP32")
    inp.set_data_from_numpy(x)
    res = _client(mlp_server).infer("mlp", [inp], request_compression_algorithm="gzip")
    expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(res.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-7)


def test_raw_binary_request_matches_json(mlp_server: Server) -> None:
    """The wire format itself: JSON header, then raw little-endian floats; binary response when asked."""
    x = np.arange(1000, dtype=np.float32) / 1000
    head = json.dumps(
        {
            "inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "parameters": {"binary_data_size": 4000}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    r = mlp_server.post(
        "/v2/models/mlp/infer",
        data=head + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:n])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 40}
    binary_probs = np.frombuffer(r.content[n:], dtype=np.float32)
    j = mlp_server.infer({"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": x.tolist()}]})
    np.testing.assert_array_equal(binary_probs, np.array(j.json()["outputs"][0]["data"], dtype=np.float32))
