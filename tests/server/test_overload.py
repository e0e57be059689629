"""Warmup before ready, the bounded queue (503 + Retry-After) and request deadlines (504), on real servers.

The model is the deliberately slow one, with a row count sized here so one request takes about
`T` seconds; overload comes from many more concurrent clients (real sockets) than the queue holds.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from support import models
from support.server import Server, ort_session, start_server, wait_until

pytestmark = pytest.mark.server

T = 0.08  # target seconds per request


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, float]:
    """The slow model, the rows that make one request take about T here, and that request's measured time."""
    path = models.slow(tmp_path_factory.mktemp("slow") / "slow.onnx")
    sess = ort_session(path)
    probe = np.ones((64, 256), dtype=np.float32)
    sess.run(None, {"x": probe})
    start = time.perf_counter()
    sess.run(None, {"x": probe})
    per_row = (time.perf_counter() - start) / 64
    rows = int(min(max(T / per_row, 4), 20000))
    return path, rows, per_row * rows


BIG_BODY = 1 << 30
"""The long requests here carry 20 x `rows` rows of 1 KiB; on a quiet machine `rows` is large (a fast row) and
the body passes the default 64 MiB limit: the request would get 413 at once and never be in flight."""


def _request(rows: int) -> tuple[bytes, dict[str, str]]:
    x = np.ones((rows, 256), dtype=np.float32)
    head = json.dumps({
        "inputs": [{"name": "x", "shape": [rows, 256], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()
    return head + x.tobytes(), {"Inference-Header-Content-Length": str(len(head))}


def _clients(url: str, body: bytes, headers: dict[str, str], clients: int, seconds: float) -> list[tuple[int, float, str]]:
    """`clients` threads, each on its own keep-alive connection, sending requests back to back for `seconds`.

    A client told 503 backs off for the Retry-After it was given, scaled down (a real client's behaviour).
    """
    results: list[tuple[int, float, str]] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        with requests.Session() as session:
            start.wait()
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                r = session.post(url, data=body, headers=headers, timeout=60)
                took = time.perf_counter() - t0
                with lock:
                    results.append((r.status_code, took, r.headers.get("retry-after", "")))
                if r.status_code == 503:
                    time.sleep(float(r.headers["retry-after"]) / 20)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    return results


def _counter(text: str, name: str) -> float:
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


@pytest.fixture(scope="module")
def queue_server(slow: tuple[Path, int, float], server_tmp: Path) -> Iterator[Server]:
    s = start_server(slow[0], "slow", server_tmp, "--max-queue", "4", "--max-elements", str(10**8), "--inline-max-us", "250",
                     "--max-body-bytes", str(BIG_BODY))
    yield s
    s.stop()


def test_full_queue_sheds_with_503_and_retry_after_and_latency_stays_bounded(
    queue_server: Server, slow: tuple[Path, int, float]
) -> None:
    _, rows, t = slow
    body, headers = _request(rows)
    results = _clients(queue_server.url + "/v2/models/slow/infer", body, headers, clients=24, seconds=3.0)
    ok = [took for status, took, _ in results if status == 200]
    shed = [(took, ra) for status, took, ra in results if status == 503]
    assert {status for status, _, _ in results} <= {200, 503}, results
    assert ok and shed, f"expected both answers under overload: {len(ok)} ok, {len(shed)} shed"
    assert all(ra == "1" for _, ra in shed)
    # Never unbounded: a served request waited behind at most the 4 queued ones (generous for a shared CPU).
    assert max(ok) < 6 * (5 * t) + 1.0, (max(ok), t)
    # Shed at once, without waiting for the queue.
    assert np.median([took for took, _ in shed]) < max(t, 0.05) * 2 + 0.2
    text = queue_server.metrics()
    assert _counter(text, "kiln_requests_shed_total") == len(shed)
    assert f'kiln_requests_total{{code="503",route="/v2/models/{{model}}/infer"}} {float(len(shed))}' in text
    r = queue_server.post("/v2/models/slow/infer", data=body, headers=headers)
    assert r.status_code == 200, "the server recovers once the load is gone"


@pytest.fixture(scope="module")
def deadline_server(slow: tuple[Path, int, float], server_tmp: Path) -> Iterator[Server]:
    s = start_server(slow[0], "slow", server_tmp, "--max-queue", "0", "--request-deadline-ms", "200", "--max-elements", str(10**8),
                     "--max-body-bytes", str(BIG_BODY))
    yield s
    s.stop()


def test_requests_past_their_deadline_get_504_and_are_counted(
    deadline_server: Server, slow: tuple[Path, int, float]
) -> None:
    _, rows, t = slow
    body, headers = _request(rows)
    results = _clients(deadline_server.url + "/v2/models/slow/infer", body, headers, clients=16, seconds=3.0)
    ok = [took for status, took, _ in results if status == 200]
    late = [took for status, took, _ in results if status == 504]
    assert {status for status, _, _ in results} <= {200, 504}, results
    assert ok and late, f"{len(ok)} ok, {len(late)} expired"
    # An expired request is answered when its turn comes, skipping other expired ones at no cost:
    # at most the deadline plus the request running then (generous for a shared CPU).
    assert max(late) < 0.2 + 6 * t + 1.0, (max(late), t)
    text = deadline_server.metrics()
    assert _counter(text, "kiln_requests_expired_total") == len(late)
    r = deadline_server.post("/v2/models/slow/infer", data=body, headers=headers)
    assert r.status_code == 200


def test_client_deadline_header(queue_server: Server, slow: tuple[Path, int, float]) -> None:
    _, rows, _t = slow
    body, headers = _request(rows)
    url = queue_server.url + "/v2/models/slow/infer"
    r = requests.post(url, data=body, headers={**headers, "X-Request-Deadline-Ms": "abc"}, timeout=30)
    assert r.status_code == 400 and "X-Request-Deadline-Ms" in r.json()["error"]
    r = requests.post(url, data=body, headers={**headers, "X-Request-Deadline-Ms": "60000"}, timeout=30)
    assert r.status_code == 200
    # Behind a request already computing (about 20 T), a 1 ms budget has passed before its turn: 504, not run.
    before = _counter(queue_server.metrics(), "kiln_requests_expired_total")
    results: dict[str, int] = {}
    long_body, long_headers = _request(rows * 20)
    blocker = threading.Thread(
        target=lambda: results.setdefault("first", requests.post(url, data=long_body, headers=long_headers, timeout=60).status_code)
    )
    blocker.start()
    wait_until(lambda: "kiln_inflight_requests 1.0" in queue_server.metrics(), timeout=20, interval=0.005)
    r = requests.post(url, data=body, headers={**headers, "X-Request-Deadline-Ms": "1"}, timeout=30)
    blocker.join(timeout=60)
    assert r.status_code == 504 and "deadline" in r.json()["error"], r.text
    assert results["first"] == 200
    assert _counter(queue_server.metrics(), "kiln_requests_expired_total") == before + 1
    v1 = requests.post(queue_server.url + "/v1/models/slow:predict", json={"instances": [[0.0] * 256]},
                       headers={"X-Request-Deadline-Ms": "-5"}, timeout=30)
    assert v1.status_code == 400


def test_warmup_runs_before_ready_at_each_batch_size(slow: tuple[Path, int, float], server_tmp: Path) -> None:
    path = slow[0]
    s = start_server(path, "slow", server_tmp, "--warmup", "3", "--max-batch-size", "512", wait="live")
    try:
        def warming() -> bool:
            r = s.get("/v2/health/ready")
            if r.status_code == 200:
                raise AssertionError("ready before the warmup was seen")
            return "warming up" in r.json()["error"]

        wait_until(warming, timeout=60, interval=0.01)
        assert s.get("/v2/health/live").status_code == 200  # liveness holds during the warmup
        s.wait_ready(timeout=120)
        ready = next(line for line in s.log_lines() if line.get("event") == "model_ready")
        assert ready["warmup_inferences"] == 3 * 10  # batch sizes 1, 2, 4, ..., 256, 512
        assert ready["warmup_seconds"] > 0
        text = s.metrics()
        assert _counter(text, "kiln_model_warmup_seconds") == pytest.approx(ready["warmup_seconds"], abs=1e-3)
        assert 'kiln_batch_size_count{model="slow"} 0.0' in text  # warmup calls are not traffic
    finally:
        s.stop()


def test_warmup_zero_and_default(mlp_server: Server, slow: tuple[Path, int, float], server_tmp: Path) -> None:
    ready = next(line for line in mlp_server.log_lines() if line.get("event") == "model_ready")
    assert ready["warmup_inferences"] == 3 and ready["max_queue"] == 1024
    s = start_server(slow[0], "slow", server_tmp, "--warmup", "0")
    try:
        ready = next(line for line in s.log_lines() if line.get("event") == "model_ready")
        assert ready["warmup_inferences"] == 0 and ready["warmup_seconds"] == 0
    finally:
        s.stop()


@pytest.fixture(scope="module")
def no_inline_server(model_dir: Path, server_tmp: Path) -> Iterator[Server]:
    s = start_server(model_dir / "mlp.onnx", "mlp", server_tmp, "--inline-max-us", "0")
    yield s
    s.stop()


def test_fast_model_runs_inline_and_a_slow_one_never_blocks_liveness(
    mlp_server: Server, no_inline_server: Server, queue_server: Server, slow: tuple[Path, int, float]
) -> None:
    """By default a lone short call runs on the event loop (no thread hand-off); a slow model's stay in the thread."""
    doc = {"inputs": [{"name": "input", "shape": [1, 1000], "datatype": "FP32", "data": [0.5] * 1000}]}
    for server in (mlp_server, no_inline_server):
        for _ in range(20):
            assert server.infer(doc).status_code == 200
    # Inline at all (how many depends on the CPU: a call slowed by a busy, shared machine sends the
    # next few to the thread, since the estimate is wall time, which is what would stall the loop).
    assert _counter(mlp_server.metrics(), "kiln_inline_inferences_total") >= 1  # on by default
    assert _counter(no_inline_server.metrics(), "kiln_inline_inferences_total") == 0  # --inline-max-us 0
    _, rows, t = slow
    body, headers = _request(rows * 20)  # about 20 T of compute in one call
    url = queue_server.url + "/v2/models/slow/infer"
    done: dict[str, int] = {}
    worker = threading.Thread(target=lambda: done.setdefault("status", requests.post(url, data=body, headers=headers, timeout=60).status_code))
    worker.start()
    wait_until(lambda: "kiln_inflight_requests 1.0" in queue_server.metrics(), timeout=20, interval=0.005)
    t0 = time.perf_counter()
    assert queue_server.get("/v2/health/live").status_code == 200
    live_s = time.perf_counter() - t0
    still_running = "kiln_inflight_requests 1.0" in queue_server.metrics()
    worker.join(timeout=60)
    assert done["status"] == 200
    assert still_running, "the slow call finished before liveness was asked; the check proves nothing"
    assert live_s < 10 * t, (live_s, t)
    assert _counter(queue_server.metrics(), "kiln_inline_inferences_total") == 0
