"""Which addresses a fetch may connect to: the destination guard for a service that
fetches URLs on its clients' behalf, so that a client cannot reach the service's own
network through it.

Checking the host name and then connecting is not enough: the name can resolve to a
public address for the check and to 127.0.0.1 for the connection (DNS rebinding), and
one address has many spellings (`localhost`, `2130706433`, `0x7f.1`, `0177.0.0.1`,
`127.1`, `[::ffff:127.0.0.1]`). So a guarded connection resolves the host once, checks
every address it resolved to, and connects to those very addresses, whatever the URL
spelled; TLS (SNI, the certificate) and the Host header still see the host name. Each
redirect opens a new connection, so every hop is checked the same way.

A refusal is a FetchError saying only `REFUSED`: nothing about what is at the address.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Any

from ofacls.errors import FetchError
from ofacls.sources.deadline import pool_classes

IPAddress = IPv4Address | IPv6Address
AddressCheck = Callable[[IPAddress], bool]  # True: a fetch may connect to this address

REFUSED = "refused: the URL's host is not a public address"

_NAT64 = ip_network("64:ff9b::/96")  # the gateway translates these to the IPv4 address in the low bits


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is on the public internet: not loopback, private, shared (CGNAT),
    link-local, multicast, reserved or unspecified, nor an IPv6 form of such an address."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        return is_public_address(inner)
    # is_global alone lets multicast through (224.0.0.0/4 is "global")
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


def _embedded_ipv4(ip: IPAddress) -> IPv4Address | None:
    """The IPv4 address an IPv6 address reaches: IPv4-mapped (::ffff:a.b.c.d), 6to4 (2002::/16),
    NAT64 (64:ff9b::/96) and the old IPv4-compatible form (::a.b.c.d); None for others."""
    if isinstance(ip, IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or int(ip) >> 32 == 0:
        return IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def resolve_checked(host: str, port: int, allowed: AddressCheck) -> list[str]:
    """The addresses `host` resolves to, to connect to; FetchError(REFUSED) unless `allowed`
    accepts every one of them (socket.gaierror when the name does not resolve)."""
    infos = socket.getaddrinfo(host.strip("[]"), port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    # a name with one private address among public ones is refused whole: any of them may be used
    if not addresses or not all(allowed(ip_address(a.partition("%")[0])) for a in addresses):
        raise FetchError(REFUSED)
    return addresses


@functools.lru_cache(maxsize=8)
def guarded_pool_classes(allowed: AddressCheck) -> dict[str, Any]:
    """deadline.pool_classes() whose connections go only to addresses that `allowed` accepts."""

    class Guarded:
        _dns_host: str
        port: int

        def _new_conn(self) -> socket.socket:
            from urllib3.exceptions import HTTPError

            *others, last = resolve_checked(self._dns_host, self.port, allowed)
            for address in others:
                try:
                    return self._connect_to(address)
                except (OSError, HTTPError):
                    continue  # the next address, as urllib3 does; the last one's error stands
            return self._connect_to(last)

        def _connect_to(self, address: str) -> socket.socket:
            # urllib3 connects to self._dns_host, and reads the same attribute (as self.host) for SNI,
            # the certificate's name and the Host header: the checked address stands in for the
            # name only within this call, so those still carry the name.
            host, self._dns_host = self._dns_host, address
            try:
                sock: socket.socket = super()._new_conn()  # type: ignore[misc]
                return sock
            finally:
                self._dns_host = host

    def guarded(pool: Any) -> type:
        connection = type(pool.ConnectionCls.__name__, (Guarded, pool.ConnectionCls), {})
        return type(pool.__name__, (pool,), {"ConnectionCls": connection})

    return {scheme: guarded(pool) for scheme, pool in pool_classes().items()}
