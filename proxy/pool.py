"""Connections to the app, for every upstream kind: opening one (TCP or unix socket) within the
connect timeout, with errors counted by reason; `PoolBase`, what both kinds' pools share (the
idle sweeper, the idle/busy gauges read from live state at flush time)."""

from __future__ import annotations

import asyncio
import errno
import socket
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from proxy.config import Config, Upstream
from proxy.core.links import UpstreamConnectError
from proxy.metrics import Metrics

P = TypeVar("P", bound=asyncio.BaseProtocol)


class PoolBase:
    """What the pools of both upstream kinds share (Envoy's conn_pool_base): the sweeper that
    closes connections idle past --upstream-idle-timeout, on one timer while any is idle, and
    `upstream_connections_active`, read from the pools' connections at flush time.

    With --upstream-proxy-protocol each client connection has a pool of its own (`shared` is
    the main pool): all of them are members of the main pool's gauge, which stays one sum
    exported once. A member leaves when it is collected; until then, closed, it counts none."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        *,
        preface: bytes = b"",
        shared: PoolBase | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        # Kept, not looked up: get_running_loop() checks the PID (a getpid call) on Python 3.11.
        self.loop = loop
        # --upstream-proxy-protocol: every connection of this pool begins with `preface`, the
        # PROXY header naming its client connection
        self.preface = preface
        self.closing = False
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_every = config.upstream_idle_timeout / 2 + 0.05
        if shared is None:
            self._members: weakref.WeakSet[PoolBase] = weakref.WeakSet([self])
            metrics.on_flush(self._export)
        else:
            self._members = shared._members
            self._members.add(self)

    def idle_count(self) -> int:
        """Open connections to the app that carry no request."""
        raise NotImplementedError

    def busy_count(self) -> int:
        """Open connections to the app that carry at least one request."""
        raise NotImplementedError

    def sweep(self, now: float) -> bool:
        """Close what has been idle past --upstream-idle-timeout; whether any is still idle."""
        raise NotImplementedError

    def _export(self) -> None:
        members = list(self._members)
        self.metrics.upstream_idle.set(sum(pool.idle_count() for pool in members))
        self.metrics.upstream_busy.set(sum(pool.busy_count() for pool in members))

    def schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every, self._swept)

    def _swept(self) -> None:
        self._sweeper = None
        if self.sweep(self.loop.time()):
            self.schedule_sweep()

    def stop_sweeping(self) -> None:
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


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
