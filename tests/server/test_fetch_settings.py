"""`python -m kiln_server.fetch` against a real local HTTP server, and the flag/env settings contract."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kiln_server import settings as settings_mod
from kiln_server.fetch import FetchError, fetch, resolve_local
from kiln_server.settings import SettingsError
from support.httpfiles import QuietHandler, serving

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("loopback_fetch")]

PAYLOAD = b"onnx-bytes" * 5000


class _Handler(QuietHandler):
    flaky_left = 0

    def do_GET(self) -> None:
        if self.path == "/model.onnx":
            self.send(200, PAYLOAD)
        elif self.path == "/flaky.onnx":
            if _Handler.flaky_left > 0:
                _Handler.flaky_left -= 1
                self.send(503, b"busy")
            else:
                self.send(200, PAYLOAD)
        else:
            self.send(404, b"not found")


@pytest.fixture(scope="module")
def http_base() -> Iterator[str]:
    with serving(_Handler) as url:
        yield url


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
    monkeypatch.setitem(sys.modules, "boto3", None)  # importing it now raises ImportError
    with pytest.raises(FetchError, match=r"MissingDependency: s3:// needs the optional S3 support: pip install 'kiln\[s3\]'") as info:
        fetch("s3://bucket/model.onnx", tmp_path / "m.onnx")
    assert info.value.exit_code == 2
    with pytest.raises(FetchError, match=r"Unsupported: gs:// is not supported: .*use s3://") as info:
        fetch("gs://bucket/model.onnx", tmp_path / "m.onnx")
    assert info.value.exit_code == 2
    assert list(tmp_path.iterdir()) == []


def test_fetch_refuses_a_local_file_over_the_size_limit(tmp_path: Path) -> None:
    src = tmp_path / "src.onnx"
    src.write_bytes(PAYLOAD)
    with pytest.raises(FetchError, match=f"TooLarge: .*{len(PAYLOAD)} bytes is over the limit of 3 bytes"):
        fetch(str(src), tmp_path / "out.onnx", max_bytes=3)
    assert not (tmp_path / "out.onnx").exists()


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


@pytest.mark.parametrize(
    "flag", ["--keep-alive-timeout", "--request-timeout", "--graceful-timeout", "--request-deadline-ms", "--max-latency-ms", "--inline-max-us"]
)
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_timeouts_must_be_finite_and_not_negative(flag: str, value: str) -> None:
    """Black-box finding: negative values and nan were accepted (nan silently disabled the timeout).

    Durations (the three timeouts) are refused by the shared duration parser already (argparse exits 2,
    a variable is a SettingsError); the other numbers by the finite-number check."""
    durations = {"--keep-alive-timeout": "KILN_KEEP_ALIVE_TIMEOUT", "--request-timeout": "KILN_REQUEST_TIMEOUT",
                 "--graceful-timeout": "KILN_GRACEFUL_TIMEOUT"}
    if flag in durations:
        with pytest.raises(SystemExit) as exit_info:
            settings_mod.from_args(["--model", "m.onnx", flag, value], {})
        assert exit_info.value.code == 2
        with pytest.raises(SettingsError, match="is not a duration"):
            settings_mod.from_args(["--model", "m.onnx"], {durations[flag]: value})
    else:
        with pytest.raises(SettingsError, match="finite number"):
            settings_mod.from_args(["--model", "m.onnx", flag, value], {})


def test_overload_and_warmup_settings() -> None:
    s = settings_mod.from_args(["--model", "m.onnx", "--max-queue", "8", "--request-deadline-ms", "250", "--warmup", "0"], {})
    assert (s.max_queue, s.request_deadline_ms, s.warmup) == (8, 250.0, 0)
    assert settings_mod.from_args(["--model", "m.onnx"], {"KILN_MAX_QUEUE": "0", "KILN_WARMUP": "7"}).warmup == 7
    with pytest.raises(SettingsError, match="--max-queue must be >= 0"):
        settings_mod.from_args(["--model", "m.onnx", "--max-queue", "-1"], {})
    with pytest.raises(SettingsError, match="--warmup must be >= 0"):
        settings_mod.from_args(["--model", "m.onnx", "--warmup", "-2"], {})
    assert settings_mod.from_args(["--model", "m.onnx", "--graceful-timeout", "0"], {}).graceful_timeout_s == 0


def test_cli_bad_flag_exits_2(tmp_path: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "kiln_server", "--model", "m.onnx", "--port", "0x"], capture_output=True, text=True, timeout=30
    )
    assert p.returncode == 2
    assert "--port" in p.stderr
