"""What an HTTP/2 client codec offers the h2c connection to the app (sans-I/O), whichever
library is underneath: `h2_client.H2ClientCodec` (pure Python) or
`nghttp2_client.Nghttp2ClientCodec` (libnghttp2 through the batching C shim).

Bytes in, events out; request parts in, bytes out once per loop iteration. The codec owns
framing, HPACK, the stream ids, flow control (a request body the app's windows have no room
for waits in the codec, which says how much waits per stream) and the checks of the app's
answers that HTTP/2 itself makes (a malformed response head is refused before a client sees
it). What stays with the connection, the same for every codec: the `:status` rules, the
pool's choice of connection, the backpressure (when to acknowledge) and the timers.

The events the server side has too (`codec.DataReceived`, `StreamEnded`, `TrailersReceived`,
`StreamReset`, `StreamRefused`, `GoAwayReceived`, `WindowUpdated`) are the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.core.headers import Headers
from proxy.http2.codec import (
    DataReceived,
    GoAwayReceived,
    StreamEnded,
    StreamRefused,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What the proxy advertises to the app and holds it to."""

    max_header_bytes: int  # SETTINGS_MAX_HEADER_LIST_SIZE
    stream_window: int  # SETTINGS_INITIAL_WINDOW_SIZE: what the app may send on a stream unread
    connection_window: int  # what all streams together may send unread


@dataclass(slots=True)
class ResponseReceived:
    """A final response head (`:status` first, unchecked beyond HTTP/2's own rules)."""

    stream_id: int
    headers: Headers
    ended: bool  # END_STREAM on the HEADERS: no body follows (a StreamEnded follows too)


@dataclass(slots=True)
class InformationalReceived:
    """A 1xx head; the final one follows."""

    stream_id: int
    headers: Headers


@dataclass(slots=True)
class SettingsChanged:
    """The app's SETTINGS (acknowledged by the codec): the first one says how many streams
    a connection takes (`Http2ClientCodec.max_concurrent_streams`)."""


ClientEvent = (
    ResponseReceived
    | InformationalReceived
    | DataReceived
    | StreamEnded
    | TrailersReceived
    | StreamReset
    | StreamRefused
    | SettingsChanged
    | GoAwayReceived
    | WindowUpdated
)


class Http2ClientCodec(Protocol):
    """HTTP/2 client side of one connection to the app.

    Submitting to a stream the codec no longer has does nothing and says so (False, or -1
    for data). A submit never raises."""

    name: str

    def receive(self, data: bytes) -> list[ClientEvent]:
        """Decode the app's bytes (any split); raises `codec.CodecError` (the GOAWAY is
        queued)."""

    def data_to_send(self) -> bytes:
        """Every frame ready to go, waiting request bytes the windows now allow included:
        called once per loop iteration. The first call carries the preface and SETTINGS."""

    def send_request(self, headers: Headers, end_stream: bool = False) -> int:
        """A request head (pseudo-headers first) on a new stream: its id, or -1 when the
        connection takes no more."""

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Body bytes; what the app's windows do not allow waits in the codec, and so does
        the end. Returns the bytes that wait on the stream, -1 when the stream is gone."""

    def send_trailers(self, stream_id: int, headers: Headers) -> bool:
        """Trailers end the stream, after the body that waits."""

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM; what waited on the stream is dropped."""

    def goaway(self, error_code: int = 0) -> None:
        """GOAWAY: the connection's end (nothing new is sent after it)."""

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Response bytes went on: reopen the app's windows, the stream's and the
        connection's."""

    def acknowledge_connection(self, size: int) -> None:
        """Reopen the connection's window only: a stream whose client is slow holds back its
        own window, not the one it shares with other clients' streams."""

    def acknowledge_stream(self, stream_id: int, size: int) -> None:
        """Reopen a stream's window only (what `acknowledge_connection` held back)."""

    def waiting(self, stream_id: int) -> int:
        """Request bytes the app's windows have no room for, on the stream."""

    def is_open(self, stream_id: int) -> bool: ...

    @property
    def max_concurrent_streams(self) -> int:
        """The app's SETTINGS_MAX_CONCURRENT_STREAMS (unbounded until it says)."""

    def close(self) -> None:
        """The connection ended: give back what the codec holds now. Afterwards every call
        does nothing."""


__all__ = [
    "ClientEvent",
    "ClientSettings",
    "DataReceived",
    "GoAwayReceived",
    "Http2ClientCodec",
    "InformationalReceived",
    "ResponseReceived",
    "SettingsChanged",
    "StreamEnded",
    "StreamRefused",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
]
