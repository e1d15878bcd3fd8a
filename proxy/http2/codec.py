"""What an HTTP/2 server codec offers the client connection (sans-I/O), whichever library is
underneath: `h2_codec.H2ServerCodec` (pure Python, the strict reference) or
`nghttp2_codec.Nghttp2ServerCodec` (libnghttp2 through a batching C shim).

Bytes in, events out; response parts in, bytes out once per loop iteration. The codec owns
framing, HPACK, flow control (a response body the client's window has no room for waits in
the codec, which says how much waits per stream) and the protocol's own connection errors.
What stays with the connection, the same for every codec: the request checks
(`request.read_h2_head`: a malformed request resets its stream), the budgets (rapid reset,
refused streams, control frames), the drain and the timers. Each codec bounds a header block
(HEADERS + CONTINUATION, encoded and decoded) by `max_header_bytes` as it arrives, refuses
streams past `max_concurrent_streams` itself (and says so, so the budgets count them), and
ends the connection with PROTOCOL_ERROR for a stream id used again (RFC 9113 §5.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from proxy.core.headers import Headers


class ErrorCode(IntEnum):
    """RFC 9113 §7: the codes of RST_STREAM and GOAWAY, named without either library."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


@dataclass(frozen=True, slots=True)
class CodecSettings:
    """What the server advertises and holds the client to."""

    max_concurrent_streams: int
    max_header_bytes: int  # SETTINGS_MAX_HEADER_LIST_SIZE, and the bound of a header block
    stream_window: int  # SETTINGS_INITIAL_WINDOW_SIZE: what one stream may send unread
    connection_window: int  # what all streams together may send unread


class CodecError(Exception):
    """The client broke the protocol or spent a bound: the codec queued a GOAWAY with `code`
    (`data_to_send` has it) and delivers nothing more. `reason` is a metric label:
    protocol_error, header_block, header_list, stream_reused."""

    def __init__(self, reason: str, code: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


# --- events ---------------------------------------------------------------------------------------
# Plain slotted classes: one per event, dispatched by type through one table per server.


@dataclass(slots=True)
class RequestReceived:
    """A request's header block, pseudo-headers first as the client sent them (unchecked)."""

    stream_id: int
    headers: Headers
    ended: bool  # END_STREAM on the HEADERS: no body follows (a StreamEnded follows too)


@dataclass(slots=True)
class DataReceived:
    """Request body bytes. `flow_controlled_length` is what to `acknowledge` once the bytes
    went on (it may exceed len(data): padding, for codecs that leave padding to the caller).
    An empty `data` with a zero length is a DATA frame that carried nothing (work, no
    progress: the control budget counts it)."""

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(slots=True)
class StreamEnded:
    stream_id: int


@dataclass(slots=True)
class TrailersReceived:
    """Request trailers (unchecked); a StreamEnded follows."""

    stream_id: int
    headers: Headers


@dataclass(slots=True)
class StreamReset:
    """The client reset the stream (RST_STREAM)."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class StreamRefused:
    """The codec reset the stream itself: past the concurrency limit (REFUSED_STREAM), or
    the client broke the protocol on it (PROTOCOL_ERROR: body longer or shorter than its
    content-length, a second header block without END_STREAM). The refused-stream budget
    counts it; what the stream had under way is lost."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class SettingsReceived:
    """A SETTINGS frame (acknowledged by the codec); the control budget counts it."""


@dataclass(slots=True)
class PingReceived:
    """A PING (answered by the codec); the control budget counts it."""

    data: bytes


@dataclass(slots=True)
class PingAcknowledged:
    """The answer to our PING (the drain's round trip)."""

    data: bytes


@dataclass(slots=True)
class GoAwayReceived:
    """The client is going away: no new stream from it. The codec keeps the connection open
    for the streams under way (RFC 9113 §6.8)."""

    error_code: int
    last_stream_id: int


@dataclass(slots=True)
class UnknownFrameReceived:
    """A frame of a type the codec ignores; the control budget counts it."""

    frame_type: int


@dataclass(slots=True)
class WindowUpdated:
    """The client opened a window (0: the connection's). Waiting response bytes go out at the
    next `data_to_send`; afterwards `waiting` says what is still held."""

    stream_id: int


Event = (
    RequestReceived
    | DataReceived
    | StreamEnded
    | TrailersReceived
    | StreamReset
    | StreamRefused
    | SettingsReceived
    | PingReceived
    | PingAcknowledged
    | GoAwayReceived
    | UnknownFrameReceived
    | WindowUpdated
)


class Http2ServerCodec(Protocol):
    """HTTP/2 server side of one client connection.

    Submitting to a stream the codec no longer has (closed, reset) does nothing and says so
    (False, or -1 for data): the connection never has to guess which library state a stream
    is in. A submit never raises."""

    name: str

    def receive(self, data: bytes) -> list[Event]:
        """Decode the client's bytes (any split); raises CodecError."""

    def data_to_send(self) -> bytes:
        """Every frame ready to go, waiting response bytes the windows now allow included:
        called once per loop iteration. The first call carries our SETTINGS."""

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> bool:
        """A response head (`:status` first) or an informational one; trailers-only answers
        are a head with end_stream."""

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Body bytes; what the client's windows do not allow waits in the codec, and so does
        the end. Returns the bytes the windows have no room for (what will still wait after
        the next `data_to_send`), -1 when the stream is gone."""

    def send_trailers(self, stream_id: int, headers: Headers) -> bool:
        """Trailers end the stream, after the body that waits."""

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM; what waited on the stream is dropped."""

    def goaway(self, error_code: int, last_stream_id: int, terminate: bool = False) -> None:
        """A GOAWAY: graceful (streams up to last_stream_id may finish, another GOAWAY may
        follow), or with terminate the connection's end (nothing is sent after it)."""

    def ping(self, data: bytes) -> None: ...

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Request bytes went on: reopen the client's windows by `size` (a closed stream's:
        the connection's only)."""

    def waiting(self, stream_id: int) -> int:
        """Response bytes the client's windows have no room for, on the stream (0: on all)."""

    def is_open(self, stream_id: int) -> bool:
        """Whether the codec still has the stream (a response can still be sent on it)."""

    def close(self) -> None:
        """The connection ended: give back what the codec holds (nghttp2: its session) now,
        not when the codec is collected. Afterwards every call does nothing."""

    @property
    def highest_stream_id(self) -> int:
        """The highest stream id the client opened: a final GOAWAY's last stream id."""
