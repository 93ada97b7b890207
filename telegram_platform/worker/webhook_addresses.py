"""Which addresses a webhook delivery may reach: public ones, or those an operator allows.

A webhook URL is chosen by an admin, or by whoever steals an admin's token; left unchecked, the
worker would POST wherever it points, from inside the deployment: the cloud metadata service
(169.254.169.254), Redis or PostgreSQL on loopback, the private network. So every delivery checks
the address it is about to connect to, not the name in the URL: names are resolved by
`PublicOnlyResolver`, which hands aiohttp only the addresses it checked (aiohttp connects to what
its resolver returns, so a DNS answer that changes between check and connect, a rebinding, cannot
reach another address), and an address written in the URL, in any spelling the system accepts
(`2130706433`, `0x7f.1`, `[::ffff:127.0.0.1]`), is checked by `literal_address` before any
connection. Networks listed in TP_WEBHOOK_ALLOW_NETWORKS are reachable whatever they are.
"""

from __future__ import annotations

import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

from ..settings import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# NAT64's well-known prefix: the last 32 bits are the IPv4 address reached.
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(OSError):
    """A delivery's address is not public and not allowed. An OSError, so that aiohttp reports a
    refusal from the resolver as a connection error (`ClientConnectorError.os_error`)."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what it reaches."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: Address, allowed: tuple[Network, ...]) -> str | None:
    """Why a delivery may not connect to `address`, or None when it may."""
    reached: Address = address
    if isinstance(address, ipaddress.IPv6Address):
        reached = _embedded_ipv4(address) or address
    if any(address in network or reached in network for network in allowed):
        return None
    if (not reached.is_global or reached.is_private or reached.is_loopback or reached.is_link_local
            or reached.is_multicast or reached.is_reserved or reached.is_unspecified
            or (isinstance(reached, ipaddress.IPv6Address) and reached.teredo is not None)):
        return f"{address} is not a public address (see TP_WEBHOOK_ALLOW_NETWORKS)"
    return None


def literal_address(host: str) -> Address | None:
    """The address a URL's host names by itself, in any spelling the system's resolver would take
    as one (`127.1`, `0x7f.1`, `2130706433`, `0177.0.0.01`), or None for a name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


class PublicOnlyResolver(AbstractResolver):
    """The system's resolver, keeping only the addresses a delivery may reach; none left is an
    `AddressRefused`. aiohttp connects to exactly the addresses returned here."""

    def __init__(self, allowed: tuple[Network, ...]) -> None:
        self._allowed = allowed
        self._system = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._system.resolve(host, port, family)
        kept, refusals = [], []
        for entry in found:
            refusal = address_refusal(ipaddress.ip_address(entry["host"]), self._allowed)
            if refusal is None:
                kept.append(entry)
            else:
                refusals.append(refusal)
        if not kept:
            raise AddressRefused(f"{host}: {refusals[0] if refusals else 'no address'}")
        return kept

    async def close(self) -> None:
        await self._system.close()
