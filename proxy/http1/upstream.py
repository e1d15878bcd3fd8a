"""Upstream connections to the app (TCP or unix socket) and their keep-alive pool."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import sys
import termios
from collections.abc import Callable
from typing import Final, cast

from proxy.compiled import mypyc_attr
from proxy.config import Config
from proxy.core.links import (
    ClientCodec,
    Tunnel,
    TunnelOwner,
    UpstreamLink,
    UpstreamOwner,
)
from proxy.metrics import Metrics
from proxy.metrics.counts import DataCounts
from proxy.pool import PoolBase, open_to_app

log: Final = logging.getLogger("tls_sidecar.upstream")


# An asyncio protocol by its methods, not its class: a subclass of asyncio.Protocol would be a
# Python class when compiled, with its attributes in a dict.
class UpstreamConnection:
    """One connection to the app; its client codec frames what we send and parses replies."""

    __slots__ = (
        "closed",
        "codec",
        "counts",
        "idle_since",
        "owner",
        "paused",
        "pool",
        "received_any",
        "reused",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.counts: DataCounts = pool.metrics.counts
        self.codec: ClientCodec = pool.codec_class()
        self.owner: UpstreamOwner | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.tunnel: TunnelOwner | None = None
        self.idle_since = 0.0
        self.received_any = False
        self.paused = False

    # asyncio.Protocol callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.counts.up_in += len(data)
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.tunnel_data(data)
            return
        owner = self.owner
        if owner is None:
            self.abort()  # an idle connection must not talk: its framing is no longer trusted
            return
        self.received_any = True
        down = owner.down
        down.cork()
        try:
            self.codec.feed(data, owner)
        except Exception:
            log.exception("unexpected error relaying a response")
            self.abort()
            owner.upstream_lost(self, None)
        finally:
            down.uncork()

    def eof_received(self) -> bool:
        owner = self.owner
        # EOF ends a close-delimited body; before any answer it is not a response at all, and
        # connection_lost decides (a retry, or 502) instead of the codec calling it malformed.
        if owner is not None and self.tunnel is None and self.received_any:
            self.codec.feed_eof(owner)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        owner, self.owner = self.owner, None
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.upstream_lost(self, exc)
        elif owner is not None:
            owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        sink = self.tunnel or self.owner
        if sink is not None:
            sink.upstream_write_paused(True)

    def resume_writing(self) -> None:
        sink = self.tunnel or self.owner
        if sink is not None:
            sink.upstream_write_paused(False)

    def as_tunnel(self) -> Tunnel:
        return self

    def start_tunnel(self, owner: TunnelOwner) -> None:
        """After 101 Switching Protocols: raw bytes both ways, for `owner`."""
        self.owner = None
        self.tunnel = owner

    # used by the downstream connection --------------------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.counts.up_out += len(data)
        self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        assert self.transport is not None
        self.counts.up_out += sum(map(len, parts))
        self.transport.writelines(parts)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.owner = None
        self.tunnel = None
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.pool.forget(self)

    def unread_request_bytes(self) -> int:
        """Our write buffer plus the socket's send queue (SIOCOUTQ): on loopback, what did not
        fit into the app's receive buffer, i.e. what the app has not read. Off the hot path:
        asked only when the upstream timeout fires."""
        transport = self.transport
        if transport is None or self.closed:
            return 0
        buffered = transport.get_write_buffer_size()
        sock = transport.get_extra_info("socket")
        if sock is None:
            return buffered
        try:
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        except OSError:  # not a socket the kernel reports on
            return buffered
        return buffered + int.from_bytes(queued, sys.byteorder, signed=True)


# a Python class with compiled methods: PoolBase is (the pools are weakly referenced, which
# native classes cannot be, and the HTTP/2 pool subclasses it)
@mypyc_attr(native_class=False)
class UpstreamPool(PoolBase):
    """Idle keep-alive connections to the app: bounded, most recent first, expired when old."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        codec_class: Callable[[], ClientCodec],
        *,
        preface: bytes = b"",
        shared: PoolBase | None = None,
    ) -> None:
        super().__init__(config, metrics, loop, preface=preface, shared=shared)
        self.codec_class = codec_class
        self._idle: collections.deque[UpstreamConnection] = collections.deque()
        self._busy: set[UpstreamConnection] = set()

    def idle_count(self) -> int:
        return sum(not up.closed for up in self._idle)

    def busy_count(self) -> int:
        return len(self._busy)

    def take_idle(self) -> UpstreamLink | None:
        now = self.loop.time()
        while self._idle:
            up = self._idle.pop()
            if up.closed:
                continue
            if now - up.idle_since > self.config.upstream_idle_timeout:
                up.abort()
                continue
            up.reused = True
            up.received_any = False
            self._busy.add(up)
            return up
        return None

    async def connect(self) -> UpstreamLink:
        loop = self.loop
        target = self.config.upstream
        limit = self.config.upstream_connect_timeout
        protocol = await open_to_app(
            loop,
            target,
            lambda: cast(asyncio.BaseProtocol, UpstreamConnection(self)),
            limit,
            self.metrics,
            preface=self.preface,
        )
        up = cast(UpstreamConnection, protocol)
        self._busy.add(up)
        return up

    def release(self, link: UpstreamLink) -> None:
        """Return a finished connection to the pool, or close it if it cannot serve again."""
        up = cast(UpstreamConnection, link)
        up.owner = None
        if (
            up.closed
            or up.tunnel is not None
            or self.closing
            or len(self._idle) >= self.config.upstream_max_idle
            or not up.codec.recycle()
        ):
            self.close(up)
            return
        if up.paused:
            up.resume_reading()  # an idle connection must notice when the app closes it
        up.idle_since = self.loop.time()
        self._busy.discard(up)
        self._idle.append(up)
        if self._sweeper is None:  # checked here: the call into the interpreted base is not
            self.schedule_sweep()

    def close(self, link: UpstreamLink) -> None:
        up = cast(UpstreamConnection, link)
        up.owner = None
        if up.transport is not None and not up.closed:
            up.transport.close()
        self.forget(up)

    def forget(self, up: UpstreamConnection) -> None:
        self._busy.discard(up)
        if up.closed:
            with contextlib.suppress(ValueError):
                self._idle.remove(up)

    def sweep(self, now: float) -> bool:
        while self._idle and now - self._idle[0].idle_since > self.config.upstream_idle_timeout:
            self._idle.popleft().abort()
        return bool(self._idle)

    def close_idle(self) -> None:
        self.stop_sweeping()
        while self._idle:
            self.close(self._idle.pop())
