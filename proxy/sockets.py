"""Listening sockets for the wildcard `[::]`: one dual-stack socket, IPv4 and IPv6 alike.

asyncio's `create_server` sets IPV6_V6ONLY on every IPv6 socket it binds, so `[::]:443` would
take IPv6 clients only; nginx (`ipv6only=off`) and Envoy (`ipv4_compat`) users expect `[::]` to
mean both. Every other address is left to asyncio."""

from __future__ import annotations

import ipaddress
import socket

from proxy.config import Address


def dual_stack(host: str) -> bool:
    """True for the IPv6 wildcard, which we bind for IPv4 too."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.version == 6 and ip.is_unspecified


def bind_dual_stack(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """A bound, not yet listening, non-blocking TCP socket on [::]:port that IPv4 clients
    reach too (as ::ffff:a.b.c.d). Raises OSError as bind does."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address.host, address.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
