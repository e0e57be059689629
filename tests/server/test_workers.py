"""`--workers N`: processes sharing the ports, one /metrics for the pod, SIGTERM stops all, dead workers come back.

Real `kiln serve --workers 2` processes; connections are opened fresh each time so the kernel's
SO_REUSEPORT hashing spreads them over the workers. Every wait polls a condition with a deadline.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
from kiln_server import settings as settings_mod
from kiln_server.settings import SettingsError
from kiln_server.workers import merge
from support.server import Server, free_port, start_server, wait_until

pytestmark = pytest.mark.server

_WORKER = re.compile(r'^kiln_worker_requests_total\{pid="(\d+)",worker="(\d+)"\} ([0-9.e+]+)$', re.M)


def _value(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _workers(text: str) -> dict[int, tuple[int, float]]:
    """worker index -> (pid, requests answered), from one scrape (a restarted worker's old pid is dropped)."""
    out: dict[int, tuple[int, float]] = {}
    for pid, index, n in _WORKER.findall(text):
        i, p = int(index), int(pid)
        if i not in out or p > out[i][0]:
            out[i] = (p, float(n))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def _fresh_get(server: Server, path: str) -> requests.Response:
    return requests.get(server.url + path, headers={"connection": "close"}, timeout=10)


@pytest.fixture
def pair(model_dir: Path, server_tmp: Path) -> Iterator[tuple[Server, int]]:
    gport = free_port()
    s = start_server(model_dir / "mlp.onnx", "mlp", server_tmp, "--workers", "2", "--grpc-port", str(gport))
    yield s, gport
    s.stop()


def test_two_workers_answer_and_one_scrape_counts_both(pair: tuple[Server, int]) -> None:
    server, gport = pair
    wait_until(lambda: len(_workers(_fresh_get(server, "/metrics").text)) == 2, timeout=20)
    n = 60
    for _ in range(n):
        assert _fresh_get(server, "/v2/health/live").status_code == 200
    x = np.ones((1, 1000), dtype=np.float32)
    for _ in range(8):  # one channel is one connection: eight channels spread over the workers
        inp = grpcclient.InferInput("input", [1, 1000], "FP32")
        inp.set_data_from_numpy(x)
        with grpcclient.InferenceServerClient(url=f"127.0.0.1:{gport}") as c:
            assert c.infer("mlp", [inp]).as_numpy("probabilities").shape == (1, 10)

    def aggregated() -> str | None:
        text = _fresh_get(server, "/metrics").text
        live = _value(text, 'kiln_requests_total{code="200",route="/v2/health/live"}')
        grpc_ok = _value(text, 'kiln_grpc_requests_total{code="OK",method="ModelInfer"}')
        return text if live == n and grpc_ok == 8 else None

    text = wait_until(aggregated, timeout=10)
    workers = _workers(text)
    pids = {pid for pid, _ in workers.values()}
    assert len(pids) == 2 and server.proc.pid not in pids
    assert all(answered > 0 for _, answered in workers.values()), workers
    assert _value(text, 'kiln_model_ready{model="mlp",version="1"}') == 1.0
    assert _value(text, 'kiln_batch_requests_count{model="mlp"}') == 8


def test_sigterm_stops_every_worker(pair: tuple[Server, int]) -> None:
    server, _ = pair
    workers = wait_until(lambda: (w := _workers(_fresh_get(server, "/metrics").text)) and len(w) == 2 and w, timeout=20)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) == 0
    for pid, _ in workers.values():
        wait_until(lambda p=pid: not _alive(p), timeout=10)
    log = server.log_path.read_text()
    assert log.count('"event": "stopped", "clean": true') == 2


def test_dead_worker_is_restarted_and_counts_survive(pair: tuple[Server, int]) -> None:
    server, _ = pair
    workers = wait_until(lambda: (w := _workers(_fresh_get(server, "/metrics").text)) and len(w) == 2 and w, timeout=20)
    for _ in range(20):
        _fresh_get(server, "/v2/health/live")
    wait_until(lambda: _value(_fresh_get(server, "/metrics").text, 'kiln_requests_total{code="200",route="/v2/health/live"}') == 20)
    victim_index = max(workers, key=lambda i: workers[i][1])
    victim = workers[victim_index][0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        now = _workers(_fresh_get(server, "/metrics").text)
        return victim_index in now and now[victim_index][0] != victim

    wait_until(replaced, timeout=20)
    assert server.proc.poll() is None
    # the dead worker's counts are kept (retired snapshot): the pod's counter did not go backwards
    assert _value(_fresh_get(server, "/metrics").text, 'kiln_requests_total{code="200",route="/v2/health/live"}') >= 20
    assert '"event": "worker_exited"' in server.log_path.read_text()


def test_workers_that_cannot_listen_stop_the_server(model_dir: Path, server_tmp: Path) -> None:
    """A port held by another program (no SO_REUSEPORT): the workers exit 1, so does the supervisor."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        log = server_tmp / "workers-busy.log"
        with open(log, "wb") as out:
            proc = subprocess.run(
                [sys.executable, "-m", "kiln_server", "--model", str(model_dir / "mlp.onnx"), "--port", str(port), "--workers", "2"],
                stdout=out, stderr=subprocess.STDOUT, timeout=60, check=False,
            )
    assert proc.returncode == 1
    text = log.read_text()
    assert '"event": "listen_failed"' in text and "stopping the server" in text


@pytest.mark.unit
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "0"], "workers 0 must be between 1 and 256"),
        (["--grpc-port", "8080"], "must be 0 (off) or 1-65535 and differ from the HTTP port"),
        (["--grpc-port", "70000"], "must be 0 (off) or 1-65535"),
    ],
)
def test_worker_and_grpc_settings_are_checked(argv: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        settings_mod.from_args(["--model", "m.onnx", *argv], {})


@pytest.mark.unit
def test_merge_rules() -> None:
    """Counters and histograms add up (retired ones too); in-flight adds; ready is the minimum; others the maximum."""
    a = [
        ["kiln_requests", "counter", "", [["kiln_requests_total", {"route": "/x"}, 3.0]]],
        ["kiln_inflight_requests", "gauge", "", [["kiln_inflight_requests", {}, 2.0]]],
        ["kiln_model_ready", "gauge", "", [["kiln_model_ready", {"model": "m"}, 1.0]]],
        ["kiln_model_load_seconds", "gauge", "", [["kiln_model_load_seconds", {"model": "m"}, 0.5]]],
    ]
    b = [
        ["kiln_requests", "counter", "", [["kiln_requests_total", {"route": "/x"}, 4.0]]],
        ["kiln_inflight_requests", "gauge", "", [["kiln_inflight_requests", {}, 1.0]]],
        ["kiln_model_ready", "gauge", "", [["kiln_model_ready", {"model": "m"}, 0.0]]],
        ["kiln_model_load_seconds", "gauge", "", [["kiln_model_load_seconds", {"model": "m"}, 0.7]]],
    ]
    retired = [
        ["kiln_requests", "counter", "", [["kiln_requests_total", {"route": "/x"}, 10.0]]],
        ["kiln_inflight_requests", "gauge", "", [["kiln_inflight_requests", {}, 5.0]]],
    ]
    got = {m.name: m.samples[0].value for m in merge([a, b], [retired])}
    assert got == {"kiln_requests": 17.0, "kiln_inflight_requests": 3.0, "kiln_model_ready": 0.0, "kiln_model_load_seconds": 0.7}
