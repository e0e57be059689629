#!/usr/bin/env python
"""Connection-churn memory bench: server RSS while rounds of connections send 3 MB each and close.

Issue 18, defects 4 and 5: a closed connection kept its last request body until a full GC pass
(a reference cycle between the protocol and its parser), so RSS grew with every round. Each round
opens `--conns` connections, sends a complete 3 MB request on each (POST on a GET route: the body
is read whole, then answered 405 without parsing), reads the answers, and closes them; RSS is
read from /proc after every round. A second phase pipelines requests on connections that never
read their answers, and reports RSS while they are held and after the server drops them.

    .venv/bin/python bench/server/churn.py                                  # this checkout
    .venv/bin/python bench/server/churn.py --src /path/to/other/images/server --label before

Raw numbers: bench/results/server_churn.json (one entry per --label, merged).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from run import build_mlp, free_port  # noqa: E402  (bench/server/run.py: the reference model)

OUT = ROOT / "bench" / "results" / "server_churn.json"


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_ready(port: int, timeout: float = 60.0) -> None:
    """Poll the ready route until 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("server not ready")


def read_one(f: Any) -> int:
    """Read one response (status, headers, Content-Length body); return its status."""
    status = int(f.readline().split()[1])
    length = 0
    while (h := f.readline()) not in (b"\r\n", b""):
        if h.lower().startswith(b"content-length:"):
            length = int(h.split(b":")[1])
    f.read(length)
    return status


def churn(port: int, pid: int, rounds: int, conns: int, size: int) -> list[float]:
    """RSS after each round of `conns` connections that each send `size` bytes and close."""
    request = f"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * size
    out = []
    for _ in range(rounds):
        socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(conns)]
        for s in socks:
            s.sendall(request)
        for s in socks:
            with s.makefile("rb") as f:
                assert read_one(f) == 405
            s.close()
        out.append(round(rss_mib(pid), 1))
    return out


def non_readers(port: int, pid: int, conns: int, size: int, wait_s: float) -> dict[str, Any]:
    """Connections that pipeline and never read: GET /metrics (answers that fill the socket buffers)
    and `size`-byte POSTs (bodies the server must hold while it cannot answer). Reports the peak RSS
    while they are held and how many the server dropped within `wait_s`."""
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 16 + (
        f"POST /v2/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode() + b"x" * size
    )
    socks = []
    for _ in range(conns):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.settimeout(0.05)
        socks.append(s)
    before = peak = rss_mib(pid)
    dropped = [False] * conns
    start = time.monotonic()
    dropped_after = 0.0
    while time.monotonic() < start + wait_s and not all(dropped):
        for i, s in enumerate(socks):
            if dropped[i]:
                continue
            try:
                s.sendall(request)
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                dropped[i] = True
                dropped_after = time.monotonic() - start
        peak = max(peak, rss_mib(pid))
    for s in socks:
        s.close()
    return {"rss_before_mib": round(before, 1), "rss_peak_while_held_mib": round(peak, 1),
            "dropped": sum(dropped), "conns": conns, "last_dropped_after_s": round(dropped_after, 1),
            "held_for_s": wait_s}


def with_server(src: Path, model: Path, phase: Any) -> tuple[float, Any, float]:
    """Run `phase(port, pid)` against a fresh server from `src`: (RSS when ready, its result, RSS after)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(src), "KILN_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln_server", "--model", str(model), "--port", str(port), "--request-timeout", "5"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(port)
        start = rss_mib(proc.pid)
        out = phase(port, proc.pid)
        return start, out, rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", help="images/server folder to run kiln_server from (default: this checkout's)")
    ap.add_argument("--label", default="after")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--mb", type=float, default=3.0, help="body per connection in the churn rounds")
    ap.add_argument("--pipeline-mb", type=float, default=1.0, help="body per pipelined request of the non-readers")
    args = ap.parse_args()
    src = Path(args.src) if args.src else ROOT / "images" / "server"
    size = int(args.mb * 1024 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_mlp(Path(tmp) / "mlp.onnx")
        start, rounds, _ = with_server(src, model, lambda port, pid: churn(port, pid, args.rounds, args.conns, size))
        psize = int(args.pipeline_mb * 1024 * 1024)
        _, held, after = with_server(src, model, lambda port, pid: non_readers(port, pid, 8, psize, wait_s=20.0))
    result = {"src": str(src), "rss_start_mib": round(start, 1), "rss_per_round_mib": rounds,
              "non_readers": held, "rss_end_mib": round(after, 1),
              "rounds": args.rounds, "conns": args.conns, "mb_per_conn": args.mb, "pipeline_mb": args.pipeline_mb}
    print(json.dumps({args.label: result}, indent=1))
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data[args.label] = result
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
