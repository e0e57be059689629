"""Regression tests for the defects a black-box attack suite found (issue 18), each against a real server.

Raw sockets where the bytes on the wire are the point (pipelining, malformed tails, Expect,
trailers, Host); `requests` elsewhere. Numbers in the comments refer to the issue's list.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from support import models
from support.server import Server, post_bytes, raw_connection, read_response, start_server

pytestmark = pytest.mark.server

INFER = "/v2/models/mlp/infer"


def _mlp_body(value: float = 0.5) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [value] * 1000}]}).encode()


# --- 1: a valid request followed by malformed bytes in the same read ----------------------------


def test_valid_request_answered_before_the_malformed_bytes_behind_it(mlp_server: Server) -> None:
    sock, f = raw_connection(mlp_server.port)
    with sock:
        sock.sendall(post_bytes(INFER, _mlp_body()) + b"GARBAGE \x00\x01 NOT HTTP\r\n\r\n")
        first = read_response(f)
        assert first.status == 200, first.body
        assert json.loads(first.body)["outputs"][0]["shape"] == [1, 10]
        second = read_response(f)
        assert second.status == 400 and b"malformed HTTP request" in second.body
        assert f.read() == b""  # then the server closes


def test_pipelined_requests_before_the_malformed_bytes_all_answered_in_order(mlp_server: Server) -> None:
    sock, f = raw_connection(mlp_server.port)
    with sock:
        live = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        sock.sendall(live + post_bytes(INFER, _mlp_body()) + live + b"\x16\x03\x01 tls hello")
        assert [read_response(f).status for _ in range(4)] == [200, 200, 200, 400]


# --- 2: no client input gives a 500 -------------------------------------------------------------


def test_inputs_with_differing_named_first_dims_are_400(two_io_server: Server) -> None:
    doc = {"inputs": [
        {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]},
        {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]},
    ]}
    r = two_io_server.infer(doc)
    assert r.status_code == 400, r.text
    assert "inputs sharing a dimension must agree" in r.json()["error"]
    r = two_io_server.post("/v1/models/two:predict", json={"instances": [{"a": [1, 2, 3], "b": [1, 2]}]})
    assert r.status_code == 400, r.text


@pytest.fixture(scope="module")
def unnamed_server(server_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    path = models.unnamed_dims_add(tmp_path_factory.mktemp("unnamed") / "add.onnx")
    s = start_server(path, "add", server_tmp)
    yield s
    s.stop()


def test_failure_inside_onnx_runtime_on_client_input_is_400(unnamed_server: Server) -> None:
    """Unnamed dims cannot be checked up front: ONNX Runtime's FAIL on the input is still the client's 400."""
    doc = {"inputs": [
        {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [1] * 6},
        {"name": "b", "shape": [3, 3], "datatype": "FP32", "data": [1] * 9},
    ]}
    r = unnamed_server.infer(doc)
    assert r.status_code == 400, r.text
    assert "the model rejected the input" in r.json()["error"] and "broadcast" in r.json()["error"]
    ok = unnamed_server.infer({"inputs": [{**doc["inputs"][0]}, {**doc["inputs"][0], "name": "b"}]})
    assert ok.status_code == 200 and ok.json()["outputs"][0]["data"] == [2.0] * 6


# --- 3 and 6: strict numbers wherever they are; non-finite values ------------------------------


@pytest.mark.parametrize("bad", [None, "2"])
@pytest.mark.parametrize("position", [0, 500, 999])
def test_null_or_string_anywhere_in_fp32_data_is_400(mlp_server: Server, bad: object, position: int) -> None:
    flat: list[object] = [0.5] * 1000
    flat[position] = bad
    for data in (flat, [flat]):  # flat and nested
        r = mlp_server.infer({"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": data}]})
        assert r.status_code == 400, r.text
        assert "must be numbers" in r.json()["error"]
    r = mlp_server.post("/v1/models/mlp:predict", json={"instances": [flat]})
    assert r.status_code == 400, r.text
    assert "must be numbers" in r.json()["error"]


def test_fp32_overflow_is_400_in_v2_and_v1(mlp_server: Server) -> None:
    flat = [0.5] * 1000
    flat[3] = 1e39
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": flat}]})
    r = mlp_server.post(INFER, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "out of range for FP32" in r.json()["error"], r.text
    r = mlp_server.post("/v1/models/mlp:predict", data=json.dumps({"instances": [flat]}))
    assert r.status_code == 400 and "out of range for FP32" in r.json()["error"], r.text


@pytest.fixture(scope="module")
def sqrt_server(server_tmp: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(models.sqrt_model(tmp_path_factory.mktemp("sqrt") / "sqrt.onnx"), "sqrt", server_tmp)
    yield s
    s.stop()


def test_non_finite_outputs_are_sent_in_a_valid_form(sqrt_server: Server) -> None:
    doc = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [4, -1, 0]}]}
    r = sqrt_server.infer(doc)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])  # strict JSON: no null, no NaN token
    by_name = {o["name"]: o for o in head["outputs"]}
    offset = n
    values = {}
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        values[o["name"]] = np.frombuffer(r.content[offset : offset + size], dtype=np.float32)
        offset += size
    assert "data" not in by_name["root"] and values["root"][0] == 2.0 and np.isnan(values["root"][1])
    assert values["inverse"][2] == np.inf and values["inverse"][1] == -1.0
    finite = sqrt_server.infer({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [4, 1, 9]}]})
    assert "inference-header-content-length" not in finite.headers
    assert finite.json()["outputs"][0]["data"] == [2.0, 1.0, 3.0]
    v1 = sqrt_server.post("/v1/models/sqrt:predict", json={"instances": [[4, -1, 0]]})
    assert v1.status_code == 200
    pred = json.loads(v1.text)["predictions"][0]  # json.loads would accept NaN; check the text has none
    assert pred["root"] == [2.0, "NaN", 0.0] and pred["inverse"] == [0.25, -1.0, "Infinity"]
    assert "NaN," not in v1.text.replace('"NaN"', "") and "null" not in v1.text


# --- 7: HTTP details -----------------------------------------------------------------------------


def test_chunked_trailers_are_not_headers(mlp_server: Server) -> None:
    # Trailers claiming an encoding and a content type must not change how the (plain JSON) body is read.
    body = _mlp_body()
    sock, f = raw_connection(mlp_server.port)
    with sock:
        sock.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + b"%x\r\n" % len(body) + body + b"\r\n0\r\nContent-Encoding: gzip\r\nContent-Type: text/plain\r\n\r\n"
        )
        r = read_response(f)
    assert r.status == 200, r.body
    assert json.loads(r.body)["outputs"][0]["shape"] == [1, 10]


def test_expect_continue_only_for_http11_and_after_earlier_answers(mlp_server: Server) -> None:
    body = _mlp_body()
    sock, f = raw_connection(mlp_server.port)
    with sock:  # HTTP/1.0: the expectation is ignored (no 100), the body is read as usual
        sock.sendall(
            f"POST {INFER} HTTP/1.0\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        r = read_response(f)
        assert r.status == 200, (r.status, r.body)
    sock, f = raw_connection(mlp_server.port)
    with sock:  # pipelined: the 100 for the second request may not overtake the first one's answer
        second_head = (
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(post_bytes(INFER, body) + second_head)
        assert read_response(f).status == 200
        assert read_response(f).status == 100
        sock.sendall(body)
        assert read_response(f).status == 200


@pytest.mark.parametrize(
    ("head", "needle"),
    [
        (b"GET /v2/health/live HTTP/1.1\r\n\r\n", b"no Host header"),
        (b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"more than one Host"),
    ],
)
def test_http11_needs_exactly_one_host(mlp_server: Server, head: bytes, needle: bytes) -> None:
    sock, f = raw_connection(mlp_server.port)
    with sock:
        sock.sendall(head)
        r = read_response(f)
    assert r.status == 400 and needle in r.body


def test_head_answers_like_get_without_a_body(mlp_server: Server) -> None:
    get = mlp_server.get("/v2/models/mlp")
    sock, f = raw_connection(mlp_server.port)
    with sock:
        sock.sendall(b"HEAD /v2/models/mlp HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        head = read_response(f, head_only=True)
        after = read_response(f)  # the next answer starts right after the head: no body was written
    assert head.status == 200 and int(head.headers["content-length"]) == len(get.content)
    assert after.status == 200 and after.body == b'{"live":true}'
    r = requests.post(mlp_server.url + "/v2/models/mlp", timeout=5)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"


def test_long_uri_is_414(mlp_server: Server) -> None:
    r = mlp_server.get("/v2/health/live?" + "a" * 9000)
    assert r.status_code == 414 and "longer than 8192" in r.json()["error"]


@pytest.mark.parametrize("path", ["/v2/models/%6Dlp/ready", "/v2/models/%6dlp/ready", "/v2/%68ealth/live", "/v2/models/mlp%2fready"])
def test_percent_encoded_paths_route(mlp_server: Server, path: str) -> None:
    sock, f = raw_connection(mlp_server.port)
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        r = read_response(f)
    assert r.status == 200, (path, r.body)


# --- 4 and 5: connections that pin memory ---------------------------------------------------------


@pytest.fixture(scope="module")
def strict_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    """Short request timeout, so a client that stops reading is dropped quickly."""
    s = start_server(model_dir / "mlp.onnx", "mlp", server_tmp, "--request-timeout", "1")
    yield s
    s.stop()


def test_client_that_never_reads_its_answers_is_disconnected(strict_server: Server) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills quickly
    sock.connect(("127.0.0.1", strict_server.port))
    sock.settimeout(0.5)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 64
    deadline = time.monotonic() + 30
    dropped = False
    with sock:
        while time.monotonic() < deadline:
            try:
                sock.sendall(request)
            except TimeoutError:
                continue  # the server stopped reading (its queue is full): wait for the timeout
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
    assert dropped, "a client that never reads kept its connection (and the server's memory)"
    assert strict_server.get("/v2/health/live").status_code == 200


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def roomy_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    """Default body limit (64 MiB), so 3 MB bodies are read."""
    s = start_server(model_dir / "mlp.onnx", "mlp", server_tmp)
    yield s
    s.stop()


def test_closed_connections_release_their_bodies(roomy_server: Server) -> None:
    """Rounds of 20 connections each sending 3 MB and closing: RSS must level off, not grow per round.

    With the protocol <-> parser reference cycle every closed connection kept its last body until
    a full GC pass (issue 18: 74 -> 257 MiB); freed by reference counting, the memory is reused
    round after round. POST on a GET route: the body is read whole, then answered 405 unparsed.
    """
    body = b"x" * (3 * 1024 * 1024)
    request = f"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    rss = []
    for _ in range(8):
        conns = [raw_connection(roomy_server.port) for _ in range(20)]
        for sock, _f in conns:
            sock.sendall(request)
        for sock, f in conns:
            assert read_response(f).status == 405
            sock.close()
        rss.append(_rss_mib(roomy_server.proc.pid))
    assert rss[-1] - rss[1] < 30, f"server RSS grows with closed connections (MiB per round): {rss}"
