"""Which network addresses a model download may reach: shared by the policy check (a literal IP in a
URI, refused before anything is created) and the fetcher (every address a host name resolves to).

Why: the fetch runs inside the cluster, so a URI naming a link-local (cloud metadata, 169.254.169.254),
loopback or private address would let a tenant probe or read internal services through the operator.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_MAX_MODEL_BYTES = 4 << 30


@dataclass(frozen=True)
class FetchPolicy:
    """What an `http(s)://` model download may do: the policy's `fetch:` part, rendered into the init
    container's flags, and the fetcher's rules. The defaults are the strict ones."""

    allow_http: bool = False
    allow_private: bool = False
    """Loopback, link-local, private, shared and reserved addresses (tests opt in for 127.0.0.1)."""
    require_sha256: bool = True
    max_bytes: int = DEFAULT_MAX_MODEL_BYTES


def address_problem(address: str) -> str | None:
    """Why `address` (an IP literal) is internal ("loopback", "link-local", "private", ...), or None if public."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Most specific first: loopback and link-local ranges are "private" too.
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "shared (carrier-grade NAT)"
    return None


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False
    return True
