"""A tiny real HTTP server on 127.0.0.1 that records PATCH requests (stands in for the kube-apiserver).

`status` is the HTTP status it answers with; `hold_epoch` makes it hold the PATCH for that epoch
open until `release` is set (after signalling `held`), which pins a trainer at a known epoch.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ProgressServer:
    def __init__(self, status: int = 200, hold_epoch: int | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = status
        self.hold_epoch = hold_epoch
        self.held = threading.Event()
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PATCH(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                epoch = body.get("status", {}).get("progress", {}).get("epoch")
                if outer.hold_epoch is not None and epoch == outer.hold_epoch:
                    outer.held.set()
                    outer.release.wait(60)
                payload = json.dumps({"kind": "TrainingJob"} if outer.status < 300 else {"message": "nope"}).encode()
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the trainer was killed while we held its request: expected in the resume tests

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ProgressServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
