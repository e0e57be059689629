"""The server side of S3: `python -m kiln_server.fetch s3://...` (the operator's init container) and
`kiln serve --model s3://...`, against the real SeaweedFS; a stalled store fails with a reason, in time."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import models
from support.seaweed import SeaweedFS, proxy
from support.server import start_server, wait_until

pytestmark = [pytest.mark.s3, pytest.mark.server]


def _fetch(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, list[dict[str, object]], float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "kiln_server.fetch", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    return proc.returncode, lines, time.monotonic() - start


def _upload_model(s3: SeaweedFS, tmp_path: Path) -> tuple[str, Path, str]:
    path = models.mlp(tmp_path / "src.onnx", features=8, hidden=4, classes=3)
    s3.client().upload_file(str(path), s3.test_bucket, "models/mlp/model.onnx")
    return f"s3://{s3.test_bucket}/models/mlp/model.onnx", path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_init_container_fetch_from_s3(s3: SeaweedFS, tmp_path: Path) -> None:
    uri, src, digest = _upload_model(s3, tmp_path)
    code, lines, _ = _fetch([uri, str(tmp_path / "models") + "/", "--sha256", digest], s3.env())
    assert code == 0, lines
    assert lines[-1]["event"] == "fetched" and lines[-1]["sha256"] == digest
    assert (tmp_path / "models" / "model.onnx").read_bytes() == src.read_bytes()

    code, lines, _ = _fetch([uri, str(tmp_path / "bad.onnx"), "--sha256", "1" * 64], s3.env())
    assert code == 3 and "ChecksumMismatch" in str(lines[-1]["reason"])
    code, lines, _ = _fetch([uri, str(tmp_path / "big.onnx"), "--max-bytes", "100"], s3.env())
    assert code == 1 and str(lines[-1]["reason"]).startswith("TooLarge: ")
    code, lines, _ = _fetch([uri, str(tmp_path / "k.onnx")], s3.env(secret="not-the-secret"))
    assert code == 1 and str(lines[-1]["reason"]).startswith("BadCredentials: ")
    code, lines, _ = _fetch([f"s3://{s3.test_bucket}/models/none.onnx", str(tmp_path / "n.onnx")], s3.env())
    assert code == 1 and str(lines[-1]["reason"]).startswith("NoSuchKey: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "src.onnx"]  # nothing half-written


def test_init_container_fetch_that_stalls_fails_in_time(s3: SeaweedFS, tmp_path: Path) -> None:
    uri, _, _ = _upload_model(s3, tmp_path)
    with proxy(("127.0.0.1", s3.s3_port), "stall") as stall:
        code, lines, took = _fetch([uri, str(tmp_path / "m.onnx"), "--timeout", "1", "--retries", "2"],
                                   s3.env(endpoint=stall.endpoint))
    assert code == 1
    assert [line["event"] for line in lines] == ["s3_retry", "s3_retry", "fetch_failed"]
    assert str(lines[-1]["reason"]).startswith("Timeout: ") and "after 3 attempts" in str(lines[-1]["reason"])
    assert took < 30, f"took {took:.1f}s"


def test_kiln_serve_model_from_s3(s3: SeaweedFS, tmp_path: Path) -> None:
    uri, src, digest = _upload_model(s3, tmp_path)
    server = start_server(uri, "mlp", tmp_path, "--cache-dir", str(tmp_path / "cache"), "--sha256", digest,
                          env=s3.env(), use_cli=True)
    try:
        x = np.random.default_rng(0).normal(size=(2, 8)).astype("float32")
        r = server.infer({"inputs": [{"name": "input", "shape": [2, 8], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        assert (tmp_path / "cache" / "model.onnx").read_bytes() == src.read_bytes()
    finally:
        server.stop()


def test_kiln_serve_missing_s3_model_says_why(s3: SeaweedFS, tmp_path: Path) -> None:
    server = start_server(f"s3://{s3.test_bucket}/nothing/model.onnx", "gone", tmp_path, "--cache-dir", str(tmp_path / "c"),
                          env=s3.env(), wait="live")
    try:
        body = wait_until(lambda: (r := server.get("/v2/health/ready")).status_code == 503 and "NoSuchKey" in r.text and r.text)
        assert "s3://" in body
    finally:
        server.stop()
