"""Who is on the other end of a request: the client address, trusting only known proxies."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from proxy.types import Scope

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientAddress:
    """Resolves `request.ip`: the peer, or — when the peer is a trusted proxy — the rightmost
    address in X-Forwarded-For that is not itself a trusted proxy (uvicorn proxy_headers)."""

    def __init__(self, trusted: tuple[str, ...]):
        self._trusted = tuple(ipaddress.ip_network(c, strict=False) for c in trusted)

    def of(self, scope: Scope) -> str:
        client = scope.get("client")
        peer: str = client[0] if client else ""
        if not self._trusted or not self._is_trusted(peer):
            return peer
        forwarded = b",".join(v for k, v in scope["headers"] if k == b"x-forwarded-for")
        for hop in reversed(forwarded.decode("latin-1").split(",")):
            hop = hop.strip()
            if hop and not self._is_trusted(hop):
                return hop
        return peer

    def _is_trusted(self, address: str) -> bool:
        ip = _parse(address)
        return ip is not None and any(ip in network for network in self._trusted)


@lru_cache(maxsize=4096)
def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        return None
