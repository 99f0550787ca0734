"""The real client IP: ``X-Forwarded-For`` is believed only from trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from flask import Request

Network = Any  # ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """Parse IP addresses and CIDR ranges; raise ``ValueError`` naming the bad entry."""
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{str(value)[:64]!r} is not an IP address or CIDR range") from None
    return tuple(out)


def parse_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``value`` names (surrounding spaces and brackets allowed), else None."""
    try:
        return ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None


def in_networks(address: str | None, networks: Sequence[Network]) -> bool:
    if not address or not networks:
        return False
    ip = parse_address(address)
    return ip is not None and any(ip in net for net in networks)


def client_ip(request: Request, trusted_proxies: Sequence[Network]) -> str | None:
    """The socket peer, or the right-most untrusted hop of ``X-Forwarded-For`` when the
    peer (and each hop walked over) is a trusted proxy."""
    peer = request.remote_addr
    if not trusted_proxies or not in_networks(peer, trusted_proxies):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if parse_address(hop) is None:
            return peer
        if not in_networks(hop, trusted_proxies):
            return hop
    return hops[0] if hops else peer
