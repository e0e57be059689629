"""Bearer-token authentication against a real server process: 401 JSON without or with a wrong token,
the health routes open by default (probes carry no token), metrics opened on request, bad token files refused."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.server import Server, start_server

pytestmark = pytest.mark.server

TOKEN = "s3cr3t-token-for-tests-0123456789"
OTHER = "second-token-also-valid-987654321"
ROW = {"inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}


@pytest.fixture(scope="module")
def auth_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth")
    tokens = tmp / "tokens"
    tokens.write_text(f"# one token per line\n{TOKEN}\n\n{OTHER}\n")
    s = start_server(model_dir / "small.onnx", "small", tmp, "--auth-token-file", str(tokens))
    yield s
    s.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_inference_needs_a_valid_token(auth_server: Server) -> None:
    route = "/v2/models/small/infer"
    missing = auth_server.post(route, json=ROW)
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = auth_server.post(route, json=ROW, headers=bearer(TOKEN + "x"))
    assert wrong.status_code == 401 and wrong.json() == {"error": "invalid bearer token"}
    basic = auth_server.post(route, json=ROW, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401
    for token in (TOKEN, OTHER):
        ok = auth_server.post(route, json=ROW, headers=bearer(token))
        assert ok.status_code == 200, ok.text
        assert ok.json()["outputs"][0]["shape"] == [1, 4]


def test_metadata_metrics_and_unknown_routes_are_closed(auth_server: Server) -> None:
    for path in ("/v2/models/small", "/v2/models/small/ready", "/v1/models/small", "/metrics", "/v2/models/other", "/nope"):
        r = auth_server.get(path)
        assert r.status_code == 401, (path, r.status_code)
    assert auth_server.get("/v2/models/small", headers=bearer(TOKEN)).json()["name"] == "small"
    assert auth_server.get("/nope", headers=bearer(TOKEN)).status_code == 404


def test_health_is_open_by_default(auth_server: Server) -> None:
    assert auth_server.get("/v2/health/live").status_code == 200
    assert auth_server.get("/v2/health/ready").status_code == 200


def test_open_routes_configurable(model_dir: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN + "\n")
    s = start_server(model_dir / "small.onnx", "small", tmp_path, "--auth-token-file", str(tokens),
                     env={"KILN_AUTH_OPEN_ROUTES": "health,metrics"})
    try:
        assert s.get("/metrics").status_code == 200
        assert s.get("/v2/models/small").status_code == 401
    finally:
        s.stop()


@pytest.mark.parametrize(("content", "args", "message"), [
    ("", [], "holds no token"),
    ("short\n", [], "at least 16 characters"),
    (TOKEN, ["--auth-open-routes", "everything"], "use health, metrics or none"),
])
def test_bad_auth_settings_exit_2(model_dir: Path, tmp_path: Path, content: str, args: list[str], message: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "kiln_server", "--model", str(model_dir / "small.onnx"), "--auth-token-file",
                           str(tokens), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_missing_token_file_exits_2(model_dir: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln_server", "--model", str(model_dir / "small.onnx"), "--auth-token-file",
                           str(tmp_path / "absent")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read auth token file" in proc.stderr
