"""The model server tests' helpers: real `kiln serve` processes on 127.0.0.1 and the ONNX Runtime oracle.

Servers are started as subprocesses on a free port and waited for by polling the HTTP routes with
a bounded deadline (never fixed sleeps).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

KILN_BIN = Path(sys.executable).parent / "kiln"


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (requests.RequestException, OSError) as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last error: {last_exc})")


@dataclass
class Server:
    """A running `kiln serve` process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    name: str
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 10), **kw)

    def post(self, path: str, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 30), **kw)

    def infer(self, doc: dict[str, Any], version: str | None = None) -> requests.Response:
        route = f"/v2/models/{self.name}" + (f"/versions/{version}" if version else "") + "/infer"
        return self.post(route, json=doc)

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def metrics(self) -> str:
        return self.get("/metrics").text

    def wait_live(self, timeout: float = 30.0) -> None:
        def live() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            return self.get("/v2/health/live", timeout=2).status_code == 200

        wait_until(live, timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            return self.get("/v2/health/ready", timeout=2).status_code == 200

        wait_until(ready, timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def start_server(
    model: str | Path,
    name: str,
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait: str = "ready",
    use_cli: bool = False,
) -> Server:
    """Start `python -m kiln_server` (or `kiln serve`) and wait for live or ready."""
    port = free_port()
    log_path = tmp / f"server-{name}-{port}.log"
    base = [str(KILN_BIN), "serve"] if use_cli else [sys.executable, "-m", "kiln_server"]
    cmd = [*base, "--model", str(model), "--name", name, "--port", str(port), *args]
    full_env = {**os.environ, "KILN_LOG_LEVEL": "INFO", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = Server(proc, port, log_path, name, list(args))
    if wait == "ready":
        server.wait_ready()
    elif wait == "live":
        server.wait_live()
    return server


def ort_session(path: Path) -> Any:
    """An in-process ONNX Runtime session: the oracle the server's answers are compared with."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@dataclass
class RawResponse:
    """One HTTP response read off a raw socket: status, lower-cased headers, body."""

    status: int
    headers: dict[str, str]
    body: bytes


def read_response(f: Any, head_only: bool = False) -> RawResponse:
    """Read exactly one response (a 1xx has no body; `head_only` for HEAD) from `sock.makefile("rb")`."""
    line = f.readline()
    if not line:
        raise ConnectionError("the server closed the connection")
    status = int(line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while (h := f.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if status < 200 or head_only:
        return RawResponse(status, headers, b"")
    return RawResponse(status, headers, f.read(int(headers.get("content-length", "0"))))


def raw_connection(port: int, timeout: float = 10.0) -> tuple[socket.socket, Any]:
    """A TCP connection to the server and a buffered reader over it (for pipelining and malformed bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock, sock.makefile("rb")


def post_bytes(path: str, body: bytes, extra: str = "") -> bytes:
    """A complete HTTP/1.1 POST with a JSON body, as raw bytes."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
