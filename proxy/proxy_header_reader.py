"""A client connection's first bytes when --accept-proxy-protocol is on: the PROXY header
(bounded, within the handshake timeout) is read before the TLS layer sees anything."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from proxy import proxy_protocol

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext


class ClientConnection(Protocol):
    """The connection the header is read for (downstream.ClientConnection)."""

    ctx: ProxyContext
    loop: asyncio.AbstractEventLoop

    def proxy_header_read(self, header: proxy_protocol.ProxyHeader, rest: bytes) -> None: ...
    def proxy_header_refused(self, reason: str, detail: str) -> None: ...
    def abort(self) -> None: ...
    def forget(self) -> None: ...


class ProxyHeaderReader(asyncio.Protocol):
    """The raw transport's protocol until the PROXY header is whole (bounded), then TLS."""

    def __init__(self, connection: ClientConnection, timeout: float) -> None:
        self.connection = connection
        self.buffer = bytearray()
        self.done = False
        self.timer = connection.loop.call_later(timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buffer += data
        try:
            header = proxy_protocol.parse(self.buffer)
        except proxy_protocol.ProxyProtocolError as e:
            self._finish()
            self.connection.proxy_header_refused(e.reason, str(e))
            return
        if header is not None:
            self._finish()
            self.connection.proxy_header_read(header, bytes(self.buffer[header.length :]))

    def eof_received(self) -> bool:
        if not self.done:
            self._finish()
            if self.buffer:
                self.connection.proxy_header_refused("missing", "closed within a PROXY header")
            else:  # a balancer's TCP check: connected and closed, nothing to count
                self.connection.abort()
                self.connection.forget()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done:
            self._finish()
            self.connection.forget()

    def _timed_out(self) -> None:
        if not self.done:
            self._finish()
            self.connection.ctx.metrics.timed_out.add("proxy_protocol")
            self.connection.proxy_header_refused("timeout", "no whole PROXY header in time")

    def _finish(self) -> None:
        self.done = True
        self.timer.cancel()
