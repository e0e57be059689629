"""Optional bearer-token authentication of the model server (`--auth-token-file`).

Why its own module: the transport and the router stay as they are; `App` asks `TokenAuth.check` first
and answers its 401 when it refuses. Tokens come from a file (one per line; the operator mounts them
from the Secret a ModelDeployment names in `spec.auth.tokenSecret`), compared in constant time. The
health routes stay open by default (kubelet probes carry no token); `--auth-open-routes` chooses
(`health`, `metrics`, both, or `none`).
"""

from __future__ import annotations

import hmac
from pathlib import Path

from kiln_server.messages import Request, Response
from kiln_server.v2 import error_response

ROUTE_GROUPS: dict[str, tuple[str, ...]] = {
    "health": ("/v2/health/live", "/v2/health/ready"),
    "metrics": ("/metrics",),
}
DEFAULT_OPEN = "health"


class AuthError(ValueError):
    """The token file or the open-routes setting cannot be used (a startup error)."""


def load_tokens(path: str | Path) -> frozenset[bytes]:
    """Tokens from a file: one per line; blank lines and `#` comments skipped. At least one is required."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise AuthError(f"cannot read auth token file {path}: {exc.strerror or exc}") from None
    tokens = frozenset(line.strip().encode() for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
    if not tokens:
        raise AuthError(f"auth token file {path} holds no token")
    if any(len(t) < 16 for t in tokens):
        raise AuthError(f"auth token file {path}: every token must have at least 16 characters")
    return tokens


def open_paths(groups: str) -> frozenset[str]:
    """`health,metrics` -> the paths of those groups (`none`: no open route)."""
    names = [g.strip() for g in groups.split(",") if g.strip()]
    if names == ["none"]:
        return frozenset()
    unknown = [n for n in names if n not in ROUTE_GROUPS]
    if unknown:
        raise AuthError(f"auth open routes {', '.join(unknown)}: use health, metrics or none")
    return frozenset(p for n in names for p in ROUTE_GROUPS[n])


class TokenAuth:
    """Refuses every request without a valid `Authorization: Bearer TOKEN`, except on the open paths."""

    def __init__(self, tokens: frozenset[bytes], open_routes: frozenset[str]) -> None:
        self.tokens = tokens
        self.open_routes = open_routes

    def check(self, req: Request) -> Response | None:
        """None: let the request through; else the 401 to answer."""
        if req.path in self.open_routes:
            return None
        header = req.headers.get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return self._refuse("missing bearer token: send 'Authorization: Bearer TOKEN'")
        given = token.strip()
        # Compare against every token (no early exit): the time taken says nothing about which matched.
        ok = False
        for t in self.tokens:
            ok |= hmac.compare_digest(given, t)
        return None if ok else self._refuse("invalid bearer token")

    @staticmethod
    def _refuse(message: str) -> Response:
        resp = error_response(401, message)
        resp.extra += b'www-authenticate: Bearer realm="kiln"\r\n'
        return resp


def from_settings(token_file: str, open_routes: str) -> TokenAuth | None:
    """The server's authentication, or None when no token file is configured (no authentication)."""
    if not token_file:
        return None
    return TokenAuth(load_tokens(token_file), open_paths(open_routes or DEFAULT_OPEN))
