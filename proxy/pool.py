"""Connections to the app, for every upstream kind: opening one (TCP or unix socket) within the
connect timeout, with errors counted by reason."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.config import Upstream
from proxy.core.links import UpstreamConnectError
from proxy.metrics import Metrics

P = TypeVar("P", bound=asyncio.BaseProtocol)


async def open_to_app(
    loop: asyncio.AbstractEventLoop,
    target: Upstream,
    factory: Callable[[], P],
    limit: float,
    metrics: Metrics,
    then: Callable[[P], Awaitable[None]] | None = None,
    *,
    preface: bytes = b"",
) -> P:
    """A connection to the app (TCP or unix socket) within `limit`, `then` awaited in the same
    time; an UpstreamConnectError (counted by reason) when it cannot be had. `preface` (a PROXY
    header) goes out first, before the protocol's own first bytes."""
    try:
        async with asyncio.timeout(limit):
            if preface:
                protocol = await _open_with_preface(loop, target, factory, preface)
            elif target.unix_path:
                _, protocol = await loop.create_unix_connection(factory, target.unix_path)
            else:
                assert target.address is not None
                _, protocol = await loop.create_connection(
                    factory, target.address.host, target.address.port
                )
            if then is not None:
                await then(protocol)
    except TimeoutError:
        metrics.upstream_connect_errors.labels("timeout").inc()
        raise UpstreamConnectError(
            "timeout", 504, f"upstream {target} did not accept within {limit:g}s"
        ) from None
    except OSError as e:
        refused = e.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ECONNRESET)
        reason = "refused" if refused else "error"
        metrics.upstream_connect_errors.labels(reason).inc()
        raise UpstreamConnectError(
            reason, 502, f"upstream {target} {e.strerror or e}".rstrip()
        ) from None
    return protocol


async def _open_with_preface(
    loop: asyncio.AbstractEventLoop, target: Upstream, factory: Callable[[], P], preface: bytes
) -> P:
    """Connect a socket, send `preface` on it, then hand it to the protocol: the protocol's
    connection_made may write at once (h2c's preamble), and the preface must come first."""
    if target.unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = target.unix_path
    else:
        assert target.address is not None
        infos = await loop.getaddrinfo(
            target.address.host, target.address.port, type=socket.SOCK_STREAM
        )
        if not infos:  # getaddrinfo raises rather than answer nothing; kept for mypy's sake
            raise OSError(f"cannot resolve {target.address.host}")
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        if not target.unix_path:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, preface)
        if target.unix_path:
            _, protocol = await loop.create_unix_connection(factory, sock=sock)
        else:
            _, protocol = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol
