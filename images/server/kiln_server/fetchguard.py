"""Hardened `http(s)://` model downloads: the rules a fetch inside the cluster must follow.

Why: the init container runs with the pod's network position, so an unguarded download is a way for a
tenant to reach internal services (cloud metadata at 169.254.169.254, the node's loopback, private
ranges) or to swap the model in transit. The defaults: https only, no redirect to another host, no
loopback / link-local / private address (checked on every address the name resolves to, and the
connection goes to the address that was checked, so a DNS answer that changes in between cannot
redirect it), sha256 required, and a size limit. Each rule is relaxed only explicitly (the admin's
policy renders the flags; `KILN_FETCH_*` for `kiln serve --model URL`).
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import BinaryIO
from urllib.parse import urljoin, urlparse

from kiln.netguard import DEFAULT_MAX_MODEL_BYTES, FetchPolicy, address_problem
from kiln.settings import parse_bool

MAX_REDIRECTS = 5
CHUNK = 1 << 20


class FetchRefused(Exception):
    """The URI or where it leads breaks a rule; never retried."""


class HTTPStatusError(Exception):
    """The server answered with an error status (the caller decides whether to retry)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"HTTP {code} {reason}")
        self.code, self.reason = code, reason


def _flag(value: str | None, default: bool, name: str) -> bool:
    """A KILN_FETCH_* boolean through the shared reader (a value that is not a boolean is an error)."""
    return default if value is None or value == "" else parse_bool(value, name)


def fetch_policy_from_env(environ: Mapping[str, str] | None = None) -> FetchPolicy:
    """The rules from `KILN_FETCH_ALLOW_HTTP`, `KILN_FETCH_ALLOW_PRIVATE`, `KILN_FETCH_REQUIRE_SHA256` and
    `KILN_FETCH_MAX_BYTES` (for `kiln serve --model URL` by hand; the operator renders flags instead)."""
    env = os.environ if environ is None else environ
    return FetchPolicy(_flag(env.get("KILN_FETCH_ALLOW_HTTP"), False, "KILN_FETCH_ALLOW_HTTP"),
                       _flag(env.get("KILN_FETCH_ALLOW_PRIVATE"), False, "KILN_FETCH_ALLOW_PRIVATE"),
                       _flag(env.get("KILN_FETCH_REQUIRE_SHA256"), True, "KILN_FETCH_REQUIRE_SHA256"),
                       int(env.get("KILN_FETCH_MAX_BYTES") or DEFAULT_MAX_MODEL_BYTES))


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (IPv4 and IPv6)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def check_url(uri: str, guard: FetchPolicy, resolver: Resolver = resolve) -> tuple[str, str, int, str]:
    """(scheme, host, port, the address to connect to) for `uri`, or FetchRefused saying which rule it breaks."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        raise FetchRefused(f"{uri}: only http(s) here")
    if parsed.scheme == "http" and not guard.allow_http:
        raise FetchRefused(f"{uri}: plain http is refused (https only; allow it with --allow-http)")
    if parsed.username or parsed.password:
        raise FetchRefused(f"{parsed.scheme}://{parsed.hostname}: credentials in the URI are refused")
    host = parsed.hostname or ""
    if not host:
        raise FetchRefused(f"{uri}: no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        addresses = resolver(host, port)
    except OSError as exc:
        raise FetchRefused(f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise FetchRefused(f"{host} resolves to no address")
    if not guard.allow_private:
        for address in addresses:
            problem = address_problem(address)
            if problem:
                raise FetchRefused(f"{host} resolves to {address}, a {problem} address (refused; allow it with --allow-private)")
    return parsed.scheme, host, port, addresses[0]


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, with the certificate verified for the host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


def _copy(resp: http.client.HTTPResponse, out: BinaryIO, limit: int, uri: str) -> int:
    n = 0
    while chunk := resp.read(CHUNK):
        n += len(chunk)
        if n > limit:
            raise FetchRefused(f"{uri}: more than {limit} bytes (the size limit; raise it with --max-bytes)")
        out.write(chunk)
    return n


def download(uri: str, out: BinaryIO, guard: FetchPolicy, timeout: float, resolver: Resolver = resolve) -> int:
    """GET `uri` into `out` under `guard`, following at most 5 redirects on the same host; bytes written.

    Raises FetchRefused (a rule), HTTPStatusError (an error status) or OSError/ConnectionError (transient).
    """
    first_host = urlparse(uri).hostname
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, address = check_url(uri, guard, resolver)
        if host != first_host:
            raise FetchRefused(f"redirect from {first_host} to another host ({host}) refused")
        cls = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
        conn = cls(host, address, port, timeout)
        try:
            parsed = urlparse(uri)
            conn.request("GET", (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else ""),
                         headers={"User-Agent": "kiln-fetch/1", "Host": parsed.netloc})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchRefused(f"{uri}: redirect {resp.status} without a Location")
                uri = urljoin(uri, location)
                continue
            if resp.status != 200:
                raise HTTPStatusError(resp.status, resp.reason)
            expected = resp.getheader("Content-Length")
            if expected is not None and int(expected) > guard.max_bytes:
                raise FetchRefused(f"{uri}: {expected} bytes is over the size limit of {guard.max_bytes} (--max-bytes)")
            n = _copy(resp, out, guard.max_bytes, uri)
            if expected is not None and int(expected) != n:
                raise ConnectionError(f"connection closed after {n} of {expected} bytes")
            return n
        finally:
            conn.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")
