"""The client's address, read through the reverse proxies this deployment trusts.

Behind a proxy every request comes from the proxy's address, so a limit per address would put every
client in one bucket; yet `X-Forwarded-For` is whatever the client wrote, unless a proxy we trust
wrote it. So the header is read only when the peer is one of TP_TRUSTED_PROXIES, and then from the
right: each trusted proxy appends the address it received from, and the right-most entry that is not
a trusted proxy is the first address nobody trusted vouches for beyond: the client. Entries to its
left may be forged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from aiohttp import web

from ..settings import Network

UNKNOWN = "unknown"


def _parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: Iterable[Network]) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in proxies)


def client_address(request: web.Request, proxies: tuple[Network, ...]) -> str:
    """The peer's address, or, when the peer is a trusted proxy, the right-most address of
    X-Forwarded-For that is not one; a malformed entry stops the walk there (the proxy vouched for
    nothing further)."""
    peer_text = request.remote or UNKNOWN
    peer = _parse(peer_text)
    if not proxies or peer is None or not _trusted(peer, proxies):
        return peer_text
    hops = [hop for header in request.headers.getall("X-Forwarded-For", ()) for hop in header.split(",")]
    client = peer
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:
            break
        client = address
        if not _trusted(address, proxies):
            break
    return str(client)
