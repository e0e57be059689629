"""Every V2 and V1 route of a real server process: health, metadata, versions, JSON inference, V1 predict."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from support.server import Server, ort_session

pytestmark = pytest.mark.server

GOLDEN = Path(__file__).parent / "golden"


def test_health_routes(mlp_server: Server) -> None:
    live = mlp_server.get("/v2/health/live")
    assert live.status_code == 200
    assert live.json() == {"live": True}
    ready = mlp_server.get("/v2/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}


def test_server_metadata(mlp_server: Server) -> None:
    r = mlp_server.get("/v2")
    assert r.status_code == 200
    doc = r.json()
    assert doc["name"] == "kiln"
    assert "binary_tensor_data" in doc["extensions"]
    assert doc["version"]


def test_model_metadata_matches_golden(mlp_server: Server) -> None:
    expected = json.loads((GOLDEN / "mlp_metadata.json").read_text())
    for route in ("/v2/models/mlp", "/v2/models/mlp/versions/1"):
        r = mlp_server.get(route)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        assert r.json() == expected


def test_two_io_metadata_matches_golden(two_io_server: Server) -> None:
    expected = json.loads((GOLDEN / "two_io_metadata.json").read_text())
    assert two_io_server.get("/v2/models/two").json() == expected


def test_model_ready_routes(mlp_server: Server) -> None:
    for route in ("/v2/models/mlp/ready", "/v2/models/mlp/versions/1/ready"):
        r = mlp_server.get(route)
        assert r.status_code == 200
        assert r.json() == {"name": "mlp", "ready": True}


def test_infer_json_matches_onnxruntime(mlp_server: Server, model_dir: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 1000)).astype(np.float32)
    expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]
    for version in (None, "1"):
        r = mlp_server.infer(
            {"id": "req-42", "inputs": [{"name": "input", "shape": [3, 1000], "datatype": "FP32", "data": x.ravel().tolist()}]},
            version=version,
        )
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["model_name"] == "mlp"
        assert doc["model_version"] == "1"
        assert doc["id"] == "req-42"
        (out,) = doc["outputs"]
        assert out["name"] == "probabilities"
        assert out["datatype"] == "FP32"
        assert out["shape"] == [3, 10]
        np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(3, 10), expected, rtol=1e-6, atol=1e-7)


def test_infer_nested_data_equals_flat(two_io_server: Server) -> None:
    golden = json.loads((GOLDEN / "two_io_infer.json").read_text())
    r = two_io_server.infer(golden["request"])
    assert r.status_code == 200, r.text
    assert r.json() == golden["response"]


def test_infer_no_id_means_no_id_in_response(two_io_server: Server) -> None:
    r = two_io_server.infer(
        {"inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
            {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
        ]}
    )
    assert r.status_code == 200
    assert "id" not in r.json()


def test_outputs_selection(two_io_server: Server) -> None:
    doc = {
        "inputs": [
            {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 9, 3]},
            {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [0, 0, 0]},
        ],
        "outputs": [{"name": "argmax"}],
    }
    r = two_io_server.infer(doc)
    assert r.status_code == 200, r.text
    outs = r.json()["outputs"]
    assert [o["name"] for o in outs] == ["argmax"]
    assert outs[0] == {"name": "argmax", "datatype": "INT64", "shape": [1], "data": [1]}


def test_int64_and_bool_outputs(int64_server: Server) -> None:
    r = int64_server.infer({"inputs": [{"name": "ids", "shape": [2, 4], "datatype": "INT64", "data": [[1, -2, 3, 0], [2**40, -5, 7, 8]]}]})
    assert r.status_code == 200, r.text
    outs = {o["name"]: o for o in r.json()["outputs"]}
    assert outs["doubled"] == {"name": "doubled", "datatype": "INT64", "shape": [2, 4], "data": [2, -4, 6, 0, 2**41, -10, 14, 16]}
    assert outs["is_positive"]["datatype"] == "BOOL"
    assert outs["is_positive"]["data"] == [True, False, True, False, True, False, True, True]


def test_bytes_json_roundtrip(strings_server: Server) -> None:
    r = strings_server.infer({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "héllo", ""]}]})
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    assert out == {"name": "echo", "datatype": "BYTES", "shape": [3], "data": ["a", "héllo", ""]}


def test_env_configured_version(small_server: Server) -> None:
    assert small_server.get("/v2/models/small").json()["versions"] == ["7"]
    assert small_server.get("/v2/models/small/versions/7/ready").status_code == 200
    r = small_server.get("/v2/models/small/versions/1/ready")
    assert r.status_code == 404
    assert "no version '1'" in r.json()["error"]


def test_v1_status_and_predict(mlp_server: Server, model_dir: Path) -> None:
    r = mlp_server.get("/v1/models/mlp")
    assert r.status_code == 200
    assert r.json() == {"name": "mlp", "ready": True}
    x = np.random.default_rng(9).standard_normal((2, 1000)).astype(np.float32)
    expected = ort_session(model_dir / "mlp.onnx").run(None, {"input": x})[0]
    r = mlp_server.post("/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    preds = np.array(r.json()["predictions"], dtype=np.float32)
    assert preds.shape == (2, 10)
    np.testing.assert_allclose(preds, expected, rtol=1e-6, atol=1e-7)


def test_v1_multi_input_predict(two_io_server: Server) -> None:
    r = two_io_server.post(
        "/v1/models/two:predict",
        json={"instances": [{"a": [1, 2, 3], "b": [1, 1, 1]}, {"a": [0, 0, 9], "b": [0, 0, 0]}]},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "predictions": [{"sum": [2.0, 3.0, 4.0], "argmax": 2}, {"sum": [0.0, 0.0, 9.0], "argmax": 2}]
    }


def test_v1_unknown_model_and_bad_instances(mlp_server: Server) -> None:
    r = mlp_server.get("/v1/models/nope")
    assert r.status_code == 404
    assert "unknown model 'nope'" in r.json()["error"]
    r = mlp_server.post("/v1/models/mlp:predict", json={"instances": [[1.0, 2.0]]})
    assert r.status_code == 400
    assert "shape [1, 2]" in r.json()["error"]
    r = mlp_server.post("/v1/models/mlp:predict", json={"rows": []})
    assert r.status_code == 400
    assert "instances" in r.json()["error"]


def test_keep_alive_and_pipelining(mlp_server: Server) -> None:
    """Two requests written back to back on one connection get two answers, in order."""
    import socket

    with socket.create_connection(("127.0.0.1", mlp_server.port), timeout=5) as s:
        req = (
            b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /v2/models/nope HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        s.sendall(req)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)
    assert statuses == [b"200", b"404", b"200"]
    assert b'"live":true' in data
    assert data.rstrip().endswith(b"}")


def test_chunked_request_body_is_accepted(two_io_server: Server) -> None:
    body = json.dumps({"inputs": [
        {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
        {"name": "b", "shape": [1, 3], "datatype": "FP32", "data": [1, 1, 1]},
    ]}).encode()

    def chunks():  # requests sends a generator with Transfer-Encoding: chunked
        yield body[:10]
        yield body[10:]

    r = two_io_server.post("/v2/models/two/infer", data=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [2.0, 3.0, 4.0]


def test_half_closed_client_gets_answer_then_close(mlp_server: Server) -> None:
    """A client that sends a request and shuts its write side gets the answer, then the server closes."""
    import socket

    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.0] * 1000}]}).encode()
    head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    with socket.create_connection(("127.0.0.1", mlp_server.port), timeout=5) as s:
        s.sendall(head % len(body) + body)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):  # returns b"" only when the server closes; times out otherwise
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    assert b'"probabilities"' in data
