"""Start, load failures, integrity checks, background loading, metrics, and graceful SIGTERM."""

from __future__ import annotations

import hashlib
import http.server
import json
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from support import models
from support.fetchrules import LOOPBACK_FETCH
from support.server import Server, ort_session, start_server, wait_until

pytestmark = pytest.mark.server


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _failed_line(server: Server) -> dict:
    def find() -> dict | None:
        return next((line for line in server.log_lines() if line.get("event") == "model_load_failed"), None)

    return wait_until(find, timeout=15)


def test_start_log_line(mlp_server: Server, model_dir: Path) -> None:
    (line,) = [line for line in mlp_server.log_lines() if line.get("event") == "model_ready"]
    assert line["model_name"] == "mlp"
    assert line["sha256"] == _sha(model_dir / "mlp.onnx")
    assert line["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1000]}]
    assert line["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert line["providers"] == ["CPUExecutionProvider"]
    assert line["load_seconds"] >= 0
    assert line["port"] == mlp_server.port
    assert line["level"] == "INFO"


def test_missing_model_not_ready_and_keeps_running(server_tmp: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nothing-here.onnx"
    s = start_server(missing, "ghost", server_tmp, wait="live")
    try:
        line = _failed_line(s)
        assert "does not exist" in line["reason"]
        assert str(missing) in line["reason"]
        assert line["level"] == "ERROR"
        r = s.get("/v2/health/ready")
        assert r.status_code == 503
        assert "does not exist" in r.json()["error"]
        r = s.get("/v2/models/ghost/ready")
        assert r.status_code == 503
        r = s.post("/v2/models/ghost/infer", json={"inputs": []})
        assert r.status_code == 503
        assert "does not exist" in r.json()["error"]
        assert s.get("/v2/models/ghost").status_code == 503
        assert s.get("/v1/models/ghost").json()["ready"] is False
        assert s.get("/v2/health/live").status_code == 200
        assert 'kiln_model_ready{model="ghost",version="1"} 0.0' in s.metrics()
        assert s.proc.poll() is None  # still running: no crash loop without explanation
    finally:
        s.stop()


def test_corrupt_model_not_ready_with_reason(server_tmp: Path, tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"this is not a protobuf" * 10)
    s = start_server(bad, "corrupt", server_tmp, wait="live")
    try:
        line = _failed_line(s)
        assert "ONNX Runtime cannot load" in line["reason"]
        r = s.get("/v2/health/ready")
        assert r.status_code == 503
        assert "cannot load" in r.json()["error"]
        assert s.proc.poll() is None
    finally:
        s.stop()


def test_exit_on_load_failure(server_tmp: Path, tmp_path: Path) -> None:
    s = start_server(tmp_path / "missing.onnx", "gone", server_tmp, "--exit-on-load-failure", wait="none")
    assert s.proc.wait(timeout=30) == 1
    assert any(line.get("event") == "model_load_failed" for line in s.log_lines())


def test_sha256_mismatch_refused(model_dir: Path, server_tmp: Path) -> None:
    s = start_server(model_dir / "small.onnx", "small", server_tmp, "--sha256", "0" * 64, wait="live")
    try:
        line = _failed_line(s)
        assert "sha256 mismatch" in line["reason"]
        assert "0" * 64 in line["reason"]
        r = s.get("/v2/health/ready")
        assert r.status_code == 503
        assert "sha256 mismatch" in r.json()["error"]
    finally:
        s.stop()


def test_sha256_match_and_pvc_uri(model_dir: Path, server_tmp: Path, tmp_path: Path) -> None:
    claim = tmp_path / "pvc" / "models-claim" / "v3"
    claim.mkdir(parents=True)
    (claim / "m.onnx").write_bytes((model_dir / "small.onnx").read_bytes())
    s = start_server(
        "pvc://models-claim/v3/m.onnx", "pvcmodel", server_tmp,
        env={"KILN_PVC_ROOT": str(tmp_path / "pvc"), "KILN_MODEL_SHA256": _sha(model_dir / "small.onnx")},
    )
    try:
        (line,) = [x for x in s.log_lines() if x.get("event") == "model_ready"]
        assert line["path"] == str(claim / "m.onnx")
        assert s.get("/v2/models/pvcmodel/ready").status_code == 200
    finally:
        s.stop()


class _SlowModelHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    gate = threading.Event()

    def do_GET(self) -> None:
        self.gate.wait(20)
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


def test_background_load_live_before_ready(model_dir: Path, server_tmp: Path) -> None:
    """The socket opens before the model arrives: live=200 and ready=503 'loading' during a slow load."""
    _SlowModelHandler.payload = (model_dir / "small.onnx").read_bytes()
    _SlowModelHandler.gate.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowModelHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{httpd.server_address[1]}/models/small.onnx"
    s = start_server(uri, "remote", server_tmp, "--cache-dir", str(server_tmp / "cache"), wait="live", env=LOOPBACK_FETCH)
    try:
        r = s.get("/v2/health/ready")
        assert r.status_code == 503
        assert "loading" in r.json()["error"]
        _SlowModelHandler.gate.set()
        s.wait_ready()
        assert s.get("/v2/models/remote").json()["inputs"][0]["shape"] == [-1, 8]
    finally:
        _SlowModelHandler.gate.set()
        s.stop()
        httpd.shutdown()


def test_metrics_content(mlp_server: Server) -> None:
    mlp_server.infer({"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.0] * 1000}]})
    mlp_server.get("/v2/models/unknown")
    text = mlp_server.metrics()
    assert mlp_server.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'kiln_requests_total{code="200",route="/v2/models/{model}/infer"}' in text
    assert 'kiln_requests_total{code="404",route="/v2/models/{model}/*"}' in text
    assert 'kiln_request_duration_seconds_bucket{le="0.005",route="/v2/models/{model}/infer"}' in text
    assert 'kiln_batch_size_bucket{le="1.0",model="mlp"}' in text
    assert 'kiln_model_ready{model="mlp",version="1"} 1.0' in text
    assert 'kiln_model_load_seconds{model="mlp",version="1"}' in text


@pytest.fixture
def slow_model(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A deliberately slow model and a batch size that makes one request take about 1.5 s here."""
    path = models.slow(tmp_path / "slow.onnx")
    sess = ort_session(path)
    probe = np.ones((64, 256), dtype=np.float32)
    sess.run(None, {"x": probe})
    start = time.perf_counter()
    sess.run(None, {"x": probe})
    per_row = (time.perf_counter() - start) / 64
    yield path, int(min(max(1.5 / per_row, 64), 60000))


def test_sigterm_lets_inflight_request_finish(slow_model: tuple[Path, int], server_tmp: Path) -> None:
    path, rows = slow_model
    s = start_server(path, "slow", server_tmp, "--max-body-bytes", str(256 * 1024 * 1024), "--max-elements", str(10**9))
    try:
        x = np.ones((rows, 256), dtype=np.float32)
        head = json.dumps(
            {
                "inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
                "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
            }
        ).encode()

        def call() -> requests.Response:
            return requests.post(
                s.url + "/v2/models/slow/infer", data=head + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(head))}, timeout=60,
            )

        with ThreadPoolExecutor(max_workers=1) as pool:
            fut = pool.submit(call)
            # SIGTERM only once the request is being computed (the server counts it in flight).
            wait_until(lambda: s.get("/v2/health/live").status_code == 200 and _inflight_started(s), timeout=20)
            s.proc.send_signal(signal.SIGTERM)
            r = fut.result(timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers.get("connection") == "close"
        n = int(r.headers["inference-header-content-length"])
        y = np.frombuffer(r.content[n:], dtype=np.float32)
        assert y.size == rows * 256
        assert s.proc.wait(timeout=30) == 0
        events = [line.get("event") for line in s.log_lines()]
        assert "shutdown" in events
        stopped = next(line for line in s.log_lines() if line.get("event") == "stopped")
        assert stopped["clean"] is True
    finally:
        s.stop()


def _inflight_started(s: Server) -> bool:
    """True once the server has begun computing: the slow request occupies the inference thread."""
    text = s.metrics()
    return "kiln_inflight_requests 1.0" in text
