"""What an HTTP/1.1 codec offers the data path (the registry that `--http` chooses from is the
package's `__init__`).

A server codec turns a client's bytes into request events for its `RequestSink` and responses
into bytes; a client codec does the same the other way round for one connection to the app.
Both codecs hand over heads checked by `request.read_head`, so they accept and refuse alike.
"""

from __future__ import annotations

from typing import Final, Protocol

from proxy.compiled import mypyc_attr
from proxy.core.headers import Headers
from proxy.core.request import RequestHead


class RequestSink(Protocol):
    """The downstream connection: what a server codec delivers, one request at a time."""

    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_data(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


# A native base, not a Protocol: compiled, the connection's calls to its codec go through a
# vtable (6 ns), not by name (85 ns); the h11 codec is an interpreted subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class ServerCodec:
    """HTTP/1.1 server side of one client connection (httptools or h11). Every method is its
    subclasses' to define (`test_compiled_sources.py` checks they do).

    After a request's end the codec pauses (later requests stay buffered) until `next_cycle`."""

    __slots__ = ("paused",)

    paused: bool

    def feed(self, data: bytes) -> None:
        """Parse; raises request.BadRequest for what must be refused."""
        raise NotImplementedError

    def stop(self) -> None:
        """Deliver nothing more: the connection is being answered and closed."""
        raise NotImplementedError

    def detach(self) -> None:
        """The connection is gone: drop the reference back to it. The codec and its connection
        point at each other; without this the connection, its TLS transport and buffers wait
        for the cycle collector (a full collection, rare in a busy process) instead of going
        when the last reference does."""
        raise NotImplementedError

    def response_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> bytes:
        raise NotImplementedError

    def response_data(self, data: bytes) -> list[bytes]:
        raise NotImplementedError

    def response_trailers(self, headers: Headers) -> None:
        """Trailers for the end of a chunked response (dropped from any other framing)."""
        raise NotImplementedError

    def response_end(self) -> bytes:
        raise NotImplementedError

    def informational(self, status: int, reason: bytes, headers: Headers) -> bytes:
        raise NotImplementedError

    def local_response(self, status: int, headers: Headers, body: bytes) -> list[bytes] | None:
        """A whole answer of the proxy's own that closes the connection; None when a response
        is already under way (then only closing is left)."""
        raise NotImplementedError

    def next_cycle(self) -> bool:
        """After a response: False when the connection must close; else it goes on, and a
        request that waited behind the last one is delivered now."""
        raise NotImplementedError

    def take_leftover(self) -> bytes:
        """Bytes received after an upgrade request: the new protocol's, for the tunnel."""
        raise NotImplementedError


class _Detached:
    """The sink of a codec whose connection is gone: whatever is still delivered goes nowhere."""

    def on_request_head(self, head: RequestHead) -> None: ...
    def on_request_data(self, data: bytes) -> None: ...
    def on_request_end(self) -> None: ...


DETACHED: Final[RequestSink] = _Detached()
