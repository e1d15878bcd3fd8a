"""The pool of h2c connections to the app: streams go on the newest connection with room; a new
one is opened only when none has any (one at a time, its waiters share it)."""

from __future__ import annotations

import asyncio
from typing import cast

from proxy import http2
from proxy.config import Config
from proxy.core.links import UpstreamLink
from proxy.http2.codec import ErrorCode
from proxy.http2.upstream import H2UpstreamConnection
from proxy.http2.upstream_stream import H2UpstreamStream
from proxy.metrics import Metrics
from proxy.pool import PoolBase, open_to_app


class H2UpstreamPool(PoolBase):
    """The connections to an h2c app: streams go on the newest one with room."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        *,
        preface: bytes = b"",
        shared: PoolBase | None = None,
    ) -> None:
        super().__init__(config, metrics, loop, preface=preface, shared=shared)
        self.authority = config.upstream.authority.encode()
        self.connections: list[H2UpstreamConnection] = []
        self._opening: asyncio.Task[H2UpstreamConnection] | None = None
        # the same codec as the clients' side (`--http2-codec`)
        self.codec_name = http2.client_codec_name(config.http2_codec)
        self.codec_class = http2.client_codec_class(self.codec_name)

    def idle_count(self) -> int:
        return sum(not conn.busy for conn in self.connections)

    def busy_count(self) -> int:
        return len(self.connections) - self.idle_count()

    def went_idle(self, conn: H2UpstreamConnection) -> None:
        self.schedule_sweep()

    def take_idle(self) -> UpstreamLink | None:
        for conn in reversed(self.connections):
            if conn.has_room:
                return conn.open_stream()
        return None

    async def connect(self) -> UpstreamLink:
        """A stream on a new connection (one is opened at a time; waiters share it)."""
        while True:
            if self._opening is None:
                self._opening = self.loop.create_task(self._open())
            opening = self._opening
            try:
                conn = await asyncio.shield(opening)
            finally:
                if self._opening is opening and opening.done():
                    self._opening = None
            if conn.has_room:
                return conn.open_stream()
            stream = self.take_idle()
            if stream is not None:
                return stream

    async def _open(self) -> H2UpstreamConnection:
        limit = self.config.upstream_connect_timeout

        async def settle(conn: H2UpstreamConnection) -> None:
            try:
                await conn.settled
            except BaseException:
                conn.close()
                raise

        conn = await open_to_app(
            self.loop,
            self.config.upstream,
            lambda: H2UpstreamConnection(self),
            limit,
            self.metrics,
            settle,
            preface=self.preface,
        )
        self.connections.append(conn)
        conn.idle_since = self.loop.time()
        return conn

    def release(self, up: UpstreamLink) -> None:
        """The exchange is complete: the stream is done with (both ends closed)."""
        stream = cast(H2UpstreamStream, up)
        if not stream.closed:
            if stream.ended:
                stream.conn.stream_closed(stream)
            else:  # the app answered before the request ended: the rest is not wanted
                stream.conn.reset(stream, ErrorCode.NO_ERROR)

    def close(self, up: UpstreamLink) -> None:
        stream = cast(H2UpstreamStream, up)
        if not stream.closed:
            stream.conn.reset(stream, ErrorCode.CANCEL)

    def forget(self, conn: H2UpstreamConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)

    def sweep(self, now: float) -> bool:
        idle = False
        for conn in list(self.connections):
            if not conn.busy:
                if now - conn.idle_since > self.config.upstream_idle_timeout:
                    conn.close()
                else:
                    idle = True
        return idle

    def close_idle(self) -> None:
        self.stop_sweeping()
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()
            else:
                conn.going_away = True
