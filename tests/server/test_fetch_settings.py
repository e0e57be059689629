"""`python -m kiln_server.fetch` against a real local HTTP server, and the flag/env settings contract."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kiln_server import settings as settings_mod
from kiln_server.fetch import FetchError, fetch, resolve_local
from kiln_server.settings import SettingsError

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("loopback_fetch")]

PAYLOAD = b"onnx-bytes" * 5000


class _Handler(http.server.BaseHTTPRequestHandler):
    flaky_left = 0

    def do_GET(self) -> None:
        if self.path == "/model.onnx":
            self._send(200, PAYLOAD)
        elif self.path == "/flaky.onnx":
            if _Handler.flaky_left > 0:
                _Handler.flaky_left -= 1
                self._send(503, b"busy")
            else:
                self._send(200, PAYLOAD)
        else:
            self._send(404, b"not found")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln_server.fetch", *args], capture_output=True, text=True, timeout=60
    )


SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_fetch_cli_http_ok(http_base: str, tmp_path: Path) -> None:
    dest = tmp_path / "models" / "m.onnx"
    p = _run(f"{http_base}/model.onnx", str(dest), "--sha256", SHA)
    assert p.returncode == 0, p.stderr
    assert dest.read_bytes() == PAYLOAD
    line = json.loads(p.stderr.strip().splitlines()[-1])
    assert line["event"] == "fetched"
    assert line["sha256"] == SHA
    assert line["bytes"] == len(PAYLOAD)
    # Second run (init container restart): already there with the right sha256, nothing downloaded.
    p = _run(f"{http_base}/model.onnx", str(dest), "--sha256", SHA)
    assert p.returncode == 0
    assert json.loads(p.stderr.strip().splitlines()[-1])["cached"] is True


def test_fetch_cli_sha256_mismatch(http_base: str, tmp_path: Path) -> None:
    dest = tmp_path / "m.onnx"
    p = _run(f"{http_base}/model.onnx", str(dest), "--sha256", "f" * 64)
    assert p.returncode == 3
    line = json.loads(p.stderr.strip().splitlines()[-1])
    assert line["event"] == "fetch_failed"
    assert "sha256 mismatch" in line["reason"]
    assert SHA in line["reason"]
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_fetch_cli_404_not_retried(http_base: str, tmp_path: Path) -> None:
    p = _run(f"{http_base}/missing.onnx", str(tmp_path / "m.onnx"), "--retries", "3")
    assert p.returncode == 1
    line = json.loads(p.stderr.strip().splitlines()[-1])
    assert "HTTP 404" in line["reason"]
    assert "fetch_retry" not in p.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_fetch_retries_transient_errors(http_base: str, tmp_path: Path) -> None:
    _Handler.flaky_left = 1
    retries: list[dict[str, object]] = []
    res = fetch(f"{http_base}/flaky.onnx", tmp_path / "f.onnx", sha256=SHA, retries=2, log=retries.append)
    assert res.path.read_bytes() == PAYLOAD
    assert [r["reason"] for r in retries] == ["HTTP 503"]


def test_fetch_into_folder_keeps_name_and_copies_local(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    src.write_bytes(PAYLOAD)
    res = fetch(f"file://{src}", str(tmp_path / "out") + "/", sha256=SHA)
    assert res.path == tmp_path / "out" / "src.onnx"
    assert res.path.read_bytes() == PAYLOAD


def test_fetch_object_store_without_backend_is_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "s3fs", None)  # importing it now raises ImportError
    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(FetchError, match=r"s3:// models need the s3 extra") as info:
        fetch("s3://bucket/model.onnx", tmp_path / "m.onnx")
    assert info.value.exit_code == 2
    with pytest.raises(FetchError, match=r"gs:// models need gcsfs"):
        fetch("gs://bucket/model.onnx", tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_resolve_local() -> None:
    assert resolve_local("/m/model.onnx") == "/m/model.onnx"
    assert resolve_local("file:///m/a%20b.onnx") == "/m/a b.onnx"
    assert resolve_local("pvc://claim/dir/m.onnx", "/mnt/pvc") == "/mnt/pvc/claim/dir/m.onnx"
    assert resolve_local("https://example.invalid/m.onnx") is None
    assert resolve_local("s3://b/k") is None


def test_settings_flags_override_env() -> None:
    env = {"KILN_MODEL": "/m/env.onnx", "KILN_PORT": "9000", "KILN_MAX_BATCH_SIZE": "8", "KILN_EXIT_ON_LOAD_FAILURE": "true"}
    s = settings_mod.from_args(["--port", "9100"], env)
    assert s.model == "/m/env.onnx"
    assert s.port == 9100
    assert s.max_batch_size == 8
    assert s.exit_on_load_failure is True
    assert s.model_name == "env"
    assert s.host == "127.0.0.1"


def test_settings_errors() -> None:
    with pytest.raises(SettingsError, match="no model given"):
        settings_mod.from_args([], {})
    with pytest.raises(SettingsError, match="KILN_PORT='x' is not a valid int"):
        settings_mod.from_args(["--model", "m.onnx"], {"KILN_PORT": "x"})
    with pytest.raises(SettingsError, match="sha256 must be 64 hex digits"):
        settings_mod.from_args(["--model", "m.onnx", "--sha256", "abc"], {})
    with pytest.raises(SettingsError, match="max batch size"):
        settings_mod.from_args(["--model", "m.onnx", "--max-batch-size", "0"], {})


def test_cli_bad_flag_exits_2(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "kiln_server", "--model", "m.onnx", "--port", "0x"], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 2
    assert "--port" in p.stderr
