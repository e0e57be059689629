"""Every client mistake gets the exact 4xx and a message naming the problem; none yields a 500."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from support import models
from support.server import Server, start_server

pytestmark = pytest.mark.server


def _inp(**over: Any) -> dict[str, Any]:
    base = {"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.0] * 1000}
    base.update(over)
    return base


def _err(r: requests.Response, status: int, *needles: str) -> str:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert r.headers["content-type"] == "application/json"
    msg = r.json()["error"]
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_unknown_model_404(mlp_server: Server) -> None:
    _err(mlp_server.get("/v2/models/other"), 404, "unknown model 'other'", "'mlp'")
    _err(mlp_server.get("/v2/models/other/ready"), 404, "unknown model 'other'")
    _err(mlp_server.post("/v2/models/other/infer", json={"inputs": [_inp()]}), 404, "unknown model 'other'")


def test_unknown_version_404(mlp_server: Server) -> None:
    _err(mlp_server.get("/v2/models/mlp/versions/2"), 404, "no version '2'")
    _err(mlp_server.post("/v2/models/mlp/versions/2/infer", json={"inputs": [_inp()]}), 404, "no version '2'")


def test_unknown_route_404(mlp_server: Server) -> None:
    _err(mlp_server.get("/nope"), 404, "no route GET /nope")
    _err(mlp_server.get("/v2/models/mlp/infer/extra"), 404)


def test_wrong_method_405(mlp_server: Server) -> None:
    r = mlp_server.get("/v2/models/mlp/infer")
    _err(r, 405, "method GET is not allowed", "POST")
    assert r.headers["allow"] == "POST"
    _err(mlp_server.post("/v2/health/live"), 405, "use GET")
    _err(requests.delete(mlp_server.url + "/v2/models/mlp", timeout=5), 405, "DELETE")


def test_malformed_json_400(mlp_server: Server) -> None:
    r = mlp_server.post("/v2/models/mlp/infer", data=b'{"inputs": [', headers={"Content-Type": "application/json"})
    _err(r, 400, "not valid JSON")
    r = mlp_server.post("/v2/models/mlp/infer", data=b"[1, 2]", headers={"Content-Type": "application/json"})
    _err(r, 400, "JSON object")
    _err(mlp_server.infer({"inputs": []}), 400, "non-empty list")
    _err(mlp_server.infer({"inputs": [_inp()], "id": 5}), 400, "'id' must be a string")


def test_wrong_content_type_400(mlp_server: Server) -> None:
    body = json.dumps({"inputs": [_inp()]})
    r = mlp_server.post("/v2/models/mlp/infer", data=body, headers={"Content-Type": "text/plain"})
    _err(r, 400, "Content-Type 'text/plain'", "application/json")
    r = mlp_server.post("/v2/models/mlp/infer", data={"a": "b"})  # form-encoded
    _err(r, 400, "application/x-www-form-urlencoded")


def test_wrong_input_name_400(mlp_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp(name="pixels")]}), 400, "unknown input 'pixels'", "['input']")


def test_missing_input_400(two_io_server: Server) -> None:
    doc = {"inputs": [{"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
    _err(two_io_server.infer(doc), 400, "missing input(s) ['b']")


def test_input_given_twice_400(mlp_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp(), _inp()]}), 400, "given twice")


def test_datatype_mismatch_400(mlp_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp(datatype="FP64")]}), 400, "datatype FP64", "FP32")
    _err(mlp_server.infer({"inputs": [_inp(datatype="COMPLEX")]}), 400, "unsupported datatype 'COMPLEX'")


def test_bytes_rejected_for_numeric_model_400(mlp_server: Server) -> None:
    r = mlp_server.infer({"inputs": [_inp(datatype="BYTES", data=["x"] * 1000)]})
    _err(r, 400, "datatype BYTES", "FP32")


def test_shape_mismatch_400(mlp_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp(shape=[1, 999], data=[0.0] * 999)]}), 400, "shape [1, 999]", "[-1, 1000]")
    _err(mlp_server.infer({"inputs": [_inp(shape=[1000], data=[0.0] * 1000)]}), 400, "shape [1000]")
    _err(mlp_server.infer({"inputs": [_inp(shape=[1, -1000])]}), 400, "non-negative integers")
    _err(mlp_server.infer({"inputs": [_inp(shape="1x1000")]}), 400, "'shape' must be a list")


def test_element_count_mismatch_400(mlp_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp(data=[0.0] * 999)]}), 400, "999 elements", "needs 1000")
    _err(mlp_server.infer({"inputs": [_inp(shape=[2, 1000])]}), 400, "1000 elements", "needs 2000")


def test_bad_data_values_400(mlp_server: Server, int64_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp(data=["a"] * 1000)]}), 400, "must be numbers")
    ragged = [[0.0] * 1000, [0.0] * 999]
    _err(mlp_server.infer({"inputs": [_inp(shape=[2, 1000], data=ragged)]}), 400, "regular array")
    doc = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1.5, 2, 3, 4]}]}
    _err(int64_server.infer(doc), 400, "must be integers")
    doc = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": ["1", 2, 3, 4]}]}
    _err(int64_server.infer(doc), 400, "must be numbers", "strings")
    doc = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [2**70, 2, 3, 4]}]}
    _err(int64_server.infer(doc), 400, "ids")


def test_unknown_output_400(mlp_server: Server) -> None:
    _err(mlp_server.infer({"inputs": [_inp()], "outputs": [{"name": "logits"}]}), 400, "unknown output 'logits'")


def test_body_over_limit_413(mlp_server: Server) -> None:
    # mlp_server runs with --max-body-bytes 200000
    big = {"inputs": [_inp(shape=[40, 1000], data=[0.123456] * 40000)]}
    r = mlp_server.post("/v2/models/mlp/infer", data=json.dumps(big), headers={"Content-Type": "application/json"})
    _err(r, 413, "larger than the limit of 200000 bytes")
    assert mlp_server.get("/v2/health/live").status_code == 200


def test_content_length_announced_413_immediately(mlp_server: Server) -> None:
    """Content-Length alone triggers the 413: the server answers before any body byte is sent."""
    with socket.create_connection(("127.0.0.1", mlp_server.port), timeout=5) as s:
        s.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        start = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        assert time.monotonic() - start < 3
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"10000000000 bytes is larger than the limit of 200000 bytes" in data


def test_chunked_body_over_limit_413(mlp_server: Server) -> None:
    def chunks():
        for _ in range(30):
            yield b"x" * 10000

    r = mlp_server.post("/v2/models/mlp/infer", data=chunks(), headers={"Content-Type": "application/json"})
    _err(r, 413, "larger than the limit")


def test_too_many_elements_413(mlp_server: Server) -> None:
    # mlp_server runs with --max-elements 20000: the declared shape alone is refused
    r = mlp_server.infer({"inputs": [_inp(shape=[30, 1000], data=[0] * 10)]})
    _err(r, 413, "more than 20000 tensor elements", "--max-elements")


def test_malformed_http_400(mlp_server: Server) -> None:
    with socket.create_connection(("127.0.0.1", mlp_server.port), timeout=5) as s:
        s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
        data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"malformed HTTP request" in data


def test_bad_binary_header_400(mlp_server: Server) -> None:
    body = json.dumps({"inputs": [_inp()]}).encode()
    for value, needle in ((b"abc", "is not a number"), (str(len(body) + 5).encode(), "outside the body")):
        r = mlp_server.post(
            "/v2/models/mlp/infer", data=body, headers={"Inference-Header-Content-Length": value.decode()}
        )
        _err(r, 400, needle)


def test_binary_size_mismatch_400(mlp_server: Server) -> None:
    head = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "parameters": {"binary_data_size": 400}}]}
    ).encode()
    r = mlp_server.post(
        "/v2/models/mlp/infer", data=head + b"\0" * 400, headers={"Inference-Header-Content-Length": str(len(head))}
    )
    _err(r, 400, "binary_data_size is 400 bytes", "needs 4000")
    head2 = json.dumps(
        {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "parameters": {"binary_data_size": 4000}}]}
    ).encode()
    r = mlp_server.post(
        "/v2/models/mlp/infer", data=head2 + b"\0" * 100, headers={"Inference-Header-Content-Length": str(len(head2))}
    )
    _err(r, 400, "overruns the request body")


def test_unsupported_content_encoding_400(mlp_server: Server) -> None:
    r = mlp_server.post("/v2/models/mlp/infer", data=b"{}", headers={"Content-Encoding": "br"})
    _err(r, 400, "Content-Encoding 'br'")


def test_server_survives_garbage(mlp_server: Server) -> None:
    """A burst of odd requests never produces a 500, and the server keeps serving."""
    odd: list[Any] = [
        None, 1, "x", [], {}, {"inputs": None}, {"inputs": [None]}, {"inputs": [{"name": 3}]},
        {"inputs": [_inp(data=None)]}, {"inputs": [_inp(data={"a": 1})]}, {"inputs": [_inp(parameters=[])]},
        {"inputs": [_inp()], "outputs": "all"}, {"inputs": [_inp()], "outputs": [{"name": "probabilities"}] * 2},
        {"inputs": [_inp()], "parameters": []}, {"inputs": [_inp(data=[[[[]]]])]},
    ]
    for doc in odd:
        r = mlp_server.post("/v2/models/mlp/infer", data=json.dumps(doc), headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (doc, r.status_code, r.text)
        assert r.json()["error"]
    assert mlp_server.get("/v2/health/ready").status_code == 200
    assert "code=\"500\"" not in mlp_server.metrics()


def test_data_the_model_rejects_at_run_time_400(server_tmp: Path, tmp_path: Path) -> None:
    """Valid shapes and types, but values the model cannot take (Gather index out of range): 400, not 500."""
    s = start_server(models.gather(tmp_path / "gather.onnx"), "gather", server_tmp)
    try:
        ok = s.infer({"inputs": [{"name": "idx", "shape": [2], "datatype": "INT64", "data": [3, 0]}]})
        assert ok.status_code == 200
        assert ok.json()["outputs"][0]["data"] == [6.0, 7.0, 0.0, 1.0]
        bad = s.infer({"inputs": [{"name": "idx", "shape": [1], "datatype": "INT64", "data": [9]}]})
        _err(bad, 400, "the model rejected the input", "out of data bounds")
        assert s.get("/v2/health/ready").status_code == 200
        raw = [line for line in s.log_path.read_text().splitlines() if line.strip()]
        assert all(line.startswith("{") for line in raw), raw  # only JSON lines on the log
    finally:
        s.stop()
