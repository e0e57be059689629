"""The hardened http(s) model fetch against real HTTP servers on 127.0.0.1: the strict defaults refuse
them (loopback, plain http, no sha256), and each rule relaxed on its own lets exactly that through."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kiln_server.fetch import FetchError, fetch
from kiln_server.fetchguard import FetchRefused, check_url
from support.httpfiles import QuietHandler, serving

from kiln.netguard import FetchPolicy

pytestmark = pytest.mark.server

PAYLOAD = b"model-bytes" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
LOOPBACK = FetchPolicy(allow_http=True, allow_private=True)
"""The opt-in these tests need to reach their own server at all: plain http to a loopback address."""


class _Handler(QuietHandler):
    other_port = 0

    def do_GET(self) -> None:
        if self.path == "/model.onnx":
            self.send(200, PAYLOAD)
        elif self.path == "/same-host-redirect":
            self._redirect("/model.onnx")
        elif self.path == "/other-host-redirect":
            # 'localhost' names the same machine but is another host: the rule is about names.
            self._redirect(f"http://localhost:{self.server.server_address[1]}/model.onnx")
        elif self.path == "/metadata-redirect":
            self._redirect("http://169.254.169.254/latest/meta-data/")
        elif self.path == "/loop":
            self._redirect("/loop")
        elif self.path == "/lying-length":
            self.send_response(200)
            self.send_header("Content-Length", str(10 << 30))
            self.end_headers()
        else:
            self.send(404, b"no")

    def _redirect(self, where: str) -> None:
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serving(_Handler) as url:
        yield url


def test_loopback_opt_in_fetches(base: str, tmp_path: Path) -> None:
    res = fetch(f"{base}/model.onnx", tmp_path / "m.onnx", sha256=SHA, retries=0, guard=LOOPBACK)
    assert res.sha256 == SHA and (tmp_path / "m.onnx").read_bytes() == PAYLOAD


@pytest.mark.parametrize(("guard", "expected"), [
    (FetchPolicy(), "plain http is refused"),
    (FetchPolicy(allow_http=True), "127.0.0.1, a loopback address"),
    (FetchPolicy(allow_private=True), "plain http is refused"),
])
def test_strict_defaults_refuse_the_local_server(base: str, tmp_path: Path, guard: FetchPolicy, expected: str) -> None:
    with pytest.raises(FetchError, match=expected) as info:
        fetch(f"{base}/model.onnx", tmp_path / "m.onnx", sha256=SHA, retries=0, guard=guard)
    assert info.value.exit_code == 4
    assert not (tmp_path / "m.onnx").exists() and not list(tmp_path.iterdir()), "nothing written"


def test_sha256_required_unless_allowed(base: str, tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="sha256 is required"):
        fetch(f"{base}/model.onnx", tmp_path / "m.onnx", retries=0, guard=LOOPBACK)
    relaxed = FetchPolicy(allow_http=True, allow_private=True, require_sha256=False)
    assert fetch(f"{base}/model.onnx", tmp_path / "m.onnx", retries=0, guard=relaxed).sha256 == SHA


def test_same_host_redirect_followed_other_host_refused(base: str, tmp_path: Path) -> None:
    assert fetch(f"{base}/same-host-redirect", tmp_path / "a.onnx", sha256=SHA, retries=0, guard=LOOPBACK).sha256 == SHA
    with pytest.raises(FetchError, match=r"redirect from 127.0.0.1 to another host \(localhost\) refused"):
        fetch(f"{base}/other-host-redirect", tmp_path / "b.onnx", sha256=SHA, retries=0, guard=LOOPBACK)
    # Even with private addresses allowed, a redirect to the metadata service is another host.
    with pytest.raises(FetchError, match=r"another host \(169.254.169.254\)"):
        fetch(f"{base}/metadata-redirect", tmp_path / "c.onnx", sha256=SHA, retries=0, guard=LOOPBACK)
    with pytest.raises(FetchError, match="more than 5 redirects"):
        fetch(f"{base}/loop", tmp_path / "d.onnx", sha256=SHA, retries=0, guard=LOOPBACK)


def test_size_limit(base: str, tmp_path: Path) -> None:
    small = FetchPolicy(allow_http=True, allow_private=True, max_bytes=len(PAYLOAD) - 1)
    with pytest.raises(FetchError, match="over the size limit"):
        fetch(f"{base}/model.onnx", tmp_path / "m.onnx", sha256=SHA, retries=0, guard=small)
    with pytest.raises(FetchError, match="over the size limit"):
        fetch(f"{base}/lying-length", tmp_path / "m.onnx", sha256=SHA, retries=0, guard=LOOPBACK)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("address", "kind"), [
    ("169.254.169.254", "link-local"), ("10.1.2.3", "private"), ("192.168.0.1", "private"), ("172.16.5.5", "private"),
    ("::1", "loopback"), ("fe80::1", "link-local"), ("::ffff:127.0.0.1", "loopback"), ("100.64.0.1", "shared"), ("0.0.0.0", "unspecified"),
])
def test_every_resolved_address_is_checked(address: str, kind: str) -> None:
    """A public-looking name that resolves to an internal address is refused (resolver stands in for DNS)."""
    with pytest.raises(FetchRefused, match=kind):
        check_url("https://models.example.com/m.onnx", FetchPolicy(), resolver=lambda host, port: ["93.184.216.34", address])
    assert check_url("https://models.example.com/m.onnx", FetchPolicy(), resolver=lambda h, p: ["93.184.216.34"])[3] == "93.184.216.34"


def test_credentials_in_uri_refused() -> None:
    with pytest.raises(FetchRefused, match="credentials"):
        check_url("https://user:pw@models.example.com/m.onnx", FetchPolicy(), resolver=lambda h, p: ["93.184.216.34"])


def test_cli_flags_opt_in(base: str, tmp_path: Path) -> None:
    """The init container's CLI: strict by default (exit 4 naming the rule), the policy's flags relax it."""
    cmd = [sys.executable, "-m", "kiln_server.fetch", f"{base}/model.onnx", str(tmp_path / "m.onnx")]
    strict = subprocess.run([*cmd, "--sha256", SHA], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin"})
    assert strict.returncode == 4 and "plain http is refused" in strict.stderr, strict.stderr
    ok = subprocess.run([*cmd, "--allow-http", "--allow-private", "--allow-missing-sha256"], capture_output=True, text=True,
                        timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m.onnx").read_bytes() == PAYLOAD
