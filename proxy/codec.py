"""What an HTTP/1.1 codec offers the data path, and `--http` choosing one (httptools or h11).

A server codec turns a client's bytes into request events for its `RequestSink` and responses
into bytes; a client codec does the same the other way round for one connection to the app.
Both codecs hand over heads checked by `request.read_head`, so they accept and refuse alike.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Protocol

from .headers import Headers
from .request import RequestHead

CODECS = ("httptools", "h11")

# The methods llhttp parses itself; for any other token (RFC 9110 §9.1 allows extensions) the
# httptools codec gives llhttp a stand-in and hands on the real one.
LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY PRI".split()
)


class RequestSink(Protocol):
    """The downstream connection: what a server codec delivers, one request at a time."""

    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_data(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


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


class ServerCodec(Protocol):
    """HTTP/1.1 server side of one client connection.

    After a request's end the codec pauses (later requests stay buffered) until `next_cycle`."""

    paused: bool

    def feed(self, data: bytes) -> None:
        """Parse; raises request.BadRequest for what must be refused."""

    def stop(self) -> None:
        """Deliver nothing more: the connection is being answered and closed."""

    def response_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> bytes: ...
    def response_data(self, data: bytes) -> list[bytes]: ...
    def response_trailers(self, headers: Headers) -> None:
        """Trailers for the end of a chunked response (dropped from any other framing)."""

    def response_end(self) -> bytes: ...
    def informational(self, status: int, reason: bytes, headers: Headers) -> bytes: ...
    def local_response(self, status: int, headers: Headers, body: bytes) -> list[bytes] | None:
        """A whole answer of the proxy's own that closes the connection; None when a response
        is already under way (then only closing is left)."""

    def next_cycle(self) -> bool:
        """After a response: False when the connection must close; else it goes on, and a
        request that waited behind the last one is delivered now."""

    def take_leftover(self) -> bytes:
        """Bytes received after an upgrade request: the new protocol's, for the tunnel."""


class ClientCodec(Protocol):
    """HTTP/1.1 client side of one connection to the app."""

    def request_head(
        self, method: bytes, target: bytes, headers: Headers, *, chunked: bool
    ) -> bytes: ...
    def request_data(self, data: bytes) -> list[bytes]: ...
    def request_end(self, trailers: Headers | None = None) -> bytes: ...
    def feed(self, data: bytes, sink: ResponseSink) -> None: ...
    def feed_eof(self, sink: ResponseSink) -> None: ...
    def recycle(self) -> bool:
        """After a response: True, and ready for the next request, when the connection can
        carry another."""

    def take_leftover(self) -> bytes: ...


def available(name: str) -> bool:
    return name == "h11" or importlib.util.find_spec(name) is not None


def resolve(name: str) -> str:
    """`auto` is httptools when it can be imported, as uvicorn's --http does."""
    if name == "auto":
        return "httptools" if available("httptools") else "h11"
    return name


def server_codec_class(name: str) -> Callable[[RequestSink, int], ServerCodec]:
    """The server codec's class, resolved once per process (`name` as `resolve` returns it)."""
    # Imported on demand: a process running one codec does not load the other.
    if name == "httptools":
        from .codec_httptools import HttptoolsServer  # noqa: PLC0415

        return HttptoolsServer
    from .codec_h11 import H11Server  # noqa: PLC0415

    return H11Server


def client_codec_class(name: str) -> Callable[[], ClientCodec]:
    if name == "httptools":
        from .codec_httptools_client import HttptoolsClient  # noqa: PLC0415

        return HttptoolsClient
    from .codec_h11 import H11Client  # noqa: PLC0415

    return H11Client
