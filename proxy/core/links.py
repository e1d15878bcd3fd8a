"""What the exchange talks to, whatever the protocol: the upstream link it holds to reach the
app (an HTTP/1.1 connection or an h2c stream), the events that link delivers, and the tunnel
capability a protocol switch needs. The exchange imports these, never an implementation."""

from __future__ import annotations

from typing import Protocol

from proxy.compiled import mypyc_attr
from proxy.core.headers import Headers


class ResponseSink(Protocol):
    """The exchange an upstream connection works for: what a client codec delivers."""

    def response_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> None: ...
    def response_informational(self, status: int, reason: bytes, headers: Headers) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def response_trailers(self, headers: Headers) -> None: ...
    def response_end(self) -> None: ...
    def response_malformed(self, message: str) -> None: ...


# A native base, not a Protocol: compiled, an upstream connection's calls to its codec go
# through a vtable, not by name; the h11 codec and the h2c stream are interpreted subclasses.
@mypyc_attr(allow_interpreted_subclasses=True)
class ClientCodec:
    """Frames one request for the app and parses its answer (an HTTP/1.1 client codec; the h2c
    stream frames for itself). Every method is its subclasses' to define
    (`test_compiled_sources.py` checks they do)."""

    __slots__ = ()

    def request_head(
        self, method: bytes, target: bytes, headers: Headers, *, chunked: bool
    ) -> bytes:
        raise NotImplementedError

    def request_data(self, data: bytes) -> list[bytes]:
        raise NotImplementedError

    def request_end(self, trailers: Headers | None = None) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes, sink: ResponseSink) -> None:
        raise NotImplementedError

    def feed_eof(self, sink: ResponseSink) -> None:
        raise NotImplementedError

    def recycle(self) -> bool:
        """After a response: True, and ready for the next request, when the connection can
        carry another."""
        raise NotImplementedError

    def take_leftover(self) -> bytes:
        raise NotImplementedError


class Corkable(Protocol):
    def cork(self) -> None: ...
    def uncork(self) -> None: ...


class UpstreamOwner(ResponseSink, Protocol):
    """The exchange an upstream connection currently works for."""

    @property
    def down(self) -> Corkable: ...

    def upstream_lost(self, upstream: UpstreamLink, exc: Exception | None) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class UpstreamLink(Protocol):
    """What an exchange holds to reach the app: an HTTP/1.1 connection, or an HTTP/2 stream
    (upstream_h2). Its codec frames the request; replies reach `owner`."""

    owner: UpstreamOwner | None
    codec: ClientCodec
    reused: bool  # it served a request before (so the app may have closed it meanwhile)
    received_any: bool

    def write(self, data: bytes) -> None: ...
    def writelines(self, parts: list[bytes]) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def abort(self) -> None: ...
    def unread_request_bytes(self) -> int:
        """Request bytes the app has not taken in yet, as far as the proxy can see."""
        ...

    def as_tunnel(self) -> Tunnel | None:
        """This link as a raw byte tunnel after `101 Switching Protocols`, or None where the
        protocol cannot carry one (an HTTP/2 stream)."""


class Tunnel(UpstreamLink, Protocol):
    """An upstream link that relays raw bytes after a protocol switch (WebSocket)."""

    def start_tunnel(self, owner: TunnelOwner) -> None: ...


class TunnelOwner(Protocol):
    """The downstream connection relaying raw bytes after a protocol switch."""

    def tunnel_data(self, data: bytes) -> None: ...
    def upstream_lost(self, upstream: UpstreamLink, exc: Exception | None) -> None: ...
    def upstream_write_paused(self, paused: bool) -> None: ...


class UpstreamConnectError(Exception):
    """The app could not be reached; `reason` is a metric label, `status` what the client gets."""

    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status


class Pool(Protocol):
    """Connections (or h2c streams) to the app for exchanges to take and give back."""

    def take_idle(self) -> UpstreamLink | None: ...
    async def connect(self) -> UpstreamLink: ...
    def release(self, up: UpstreamLink) -> None: ...
    def close(self, up: UpstreamLink) -> None: ...
    def close_idle(self) -> None: ...
