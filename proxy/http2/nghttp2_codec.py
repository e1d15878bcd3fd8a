"""The HTTP/2 server codec on libnghttp2 (`codec.Http2ServerCodec`), through the C shim in
`_nghttp2_shim.c` (built by cffi in API mode when the package is installed; optional).

Each `receive` is one C call that returns every event of the bytes in one buffer, decoded
here; each response part is one C call with its headers packed into one buffer; the output
is one C call per loop iteration. nghttp2's own HTTP checks are off (`no_http_messaging`):
`request.read_h2_head` checks every request for both codecs, so a malformed one resets only
its stream and counts against the connection's budget. Window updates are ours to send
(`acknowledge`), for backpressure.
"""

from __future__ import annotations

import struct
from typing import Any, Final

from proxy.core.headers import Headers
from proxy.http2 import HOW_TO_BUILD
from proxy.http2.codec import (
    CodecError,
    CodecSettings,
    DataReceived,
    Event,
    GoAwayReceived,
    PingAcknowledged,
    PingReceived,
    RequestReceived,
    SettingsReceived,
    StreamEnded,
    StreamRefused,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)

try:
    from proxy.http2._nghttp2 import ffi, lib
except ImportError:  # built without a C compiler or libnghttp2's headers
    ffi = lib = None

AVAILABLE: Final = lib is not None
# What a C call hands back, read at once after it: one set of cells for every session (one
# thread), not six small allocations per connection.
if lib is not None:
    _EVENTS, _EVENTS_LEN = ffi.new("const char **"), ffi.new("size_t *")
    _WHY, _CODE = ffi.new("int *"), ffi.new("uint32_t *")
    _OUT, _OUT_LEN = ffi.new("const char **"), ffi.new("size_t *")
__all__ = ["AVAILABLE", "HOW_TO_BUILD", "Nghttp2ServerCodec", "version"]

_REQUEST: Final = 1
_TRAILERS: Final = 2
_DATA: Final = 3
_END: Final = 4
_RESET: Final = 5
_SETTINGS: Final = 6
_PING: Final = 7
_PING_ACK: Final = 8
_GOAWAY: Final = 9
_UNKNOWN: Final = 10
_STREAM_ERROR: Final = 11
_WINDOW: Final = 13
_END_STREAM: Final = 1
_RECORD: Final = struct.Struct("<BBHIIII")
_COUNT: Final = struct.Struct("<I")
# why a feed failed, beside nghttp2's own protocol errors: reason and GOAWAY code
FAILURES: Final = {
    1: ("header_block", 0xB, "header block over the bound"),
    2: ("header_list", 0xB, "header list over SETTINGS_MAX_HEADER_LIST_SIZE"),
    3: ("stream_reused", 0x1, "a stream id used again"),
    4: ("internal_error", 0x2, "out of memory"),
    6: ("protocol_error", 0x1, "padding fills the HEADERS frame"),
    7: ("protocol_error", 0x1, "malformed ALTSVC frame"),
}
_PROTOCOL_ERROR: Final = 0x1
# a body part may be any bytes-like object (h11 hands on bytearrays); compiled, the annotation
# is checked, so it says so
BodyBytes = bytes | bytearray | memoryview
FLOODED: Final = -904  # NGHTTP2_ERR_FLOODED: the client does not read what its frames make us send


def version() -> str | None:
    """libnghttp2's version, None when the codec is not built."""
    return None if lib is None else str(ffi.string(lib.shim_version()).decode())


def pack_headers(headers: Headers) -> bytes:
    """A header list as the shim takes it: count, name/value lengths, then the bytes."""
    lengths: list[int] = []
    for name, value in headers:
        lengths += (len(name), len(value))
    return b"".join(
        [
            struct.pack(f"<I{len(lengths)}I", len(headers), *lengths),
            *(b for h in headers for b in h),
        ]
    )


def unpack_headers(buf: bytes, at: int) -> Headers:
    (count,) = _COUNT.unpack_from(buf, at)
    lengths = struct.unpack_from(f"<{2 * count}I", buf, at + 4)
    at += 4 + 8 * count
    out: Headers = []
    for i in range(0, 2 * count, 2):
        name_end = at + lengths[i]
        end = name_end + lengths[i + 1]
        out.append((buf[at:name_end], buf[name_end:end]))
        at = end
    return out


class Nghttp2ServerCodec:
    """One client connection's HTTP/2 server side on one nghttp2 session."""

    name = "nghttp2"
    __slots__ = ("_failed", "_session")

    def __init__(self, settings: CodecSettings) -> None:
        if lib is None:
            raise RuntimeError(HOW_TO_BUILD)
        config = ffi.new(
            "shim_config *",
            {
                "max_concurrent_streams": settings.max_concurrent_streams,
                "header_limit": settings.max_header_bytes,
                "stream_window": settings.stream_window,
                "connection_window": settings.connection_window,
            },
        )
        session = lib.shim_new(config)
        if session == ffi.NULL:
            raise MemoryError("nghttp2 session")
        # freed with the codec, on every path the connection ends by
        self._session: Any = ffi.gc(session, lib.shim_free)
        self._failed = False

    def close(self) -> None:
        """Free the session now rather than when the codec is collected."""
        session, self._session = self._session, None
        if session is not None:
            ffi.release(session)
        self._failed = True

    # --- the client's bytes ---------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        if self._failed:
            return []
        rv = lib.shim_feed(self._session, data, len(data), _EVENTS, _EVENTS_LEN, _WHY, _CODE)
        if rv:
            self._failed = True
            why = _WHY[0]
            if rv > 0:  # nghttp2 found a connection error and queued its GOAWAY
                code = int(_CODE[0])
                raise CodecError("protocol_error", code, f"connection error {code:#x}")
            if rv == FLOODED:
                reason, code, message = "control_flood", 0xB, "frames answered but never read"
            else:
                reason, code, message = FAILURES.get(
                    why,
                    (
                        "protocol_error",
                        _PROTOCOL_ERROR,
                        ffi.string(lib.nghttp2_strerror(rv)).decode(),
                    ),
                )
            lib.shim_goaway(self._session, code, lib.shim_highest(self._session), 1)
            raise CodecError(reason, code, message)
        size = _EVENTS_LEN[0]
        if not size:
            return []
        buf: bytes = ffi.unpack(_EVENTS[0], size)
        return _decode(buf)

    # --- the response -------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        if self._session is None:
            return b""
        lib.shim_send(self._session, _OUT, _OUT_LEN)
        size = _OUT_LEN[0]
        return bytes(ffi.unpack(_OUT[0], size)) if size else b""

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> bool:
        if self._failed:
            return False
        packed = pack_headers(headers)
        rv: int = lib.shim_submit_headers(self._session, stream_id, packed, len(packed), end_stream)
        return rv == 0

    def send_data(self, stream_id: int, data: BodyBytes, end_stream: bool = False) -> int:
        if self._failed:
            return -1
        # a bytearray or memoryview goes to C as a buffer (h11 hands bytearrays on)
        part: Any = data if type(data) is bytes else ffi.from_buffer(data)
        waiting: int = lib.shim_submit_data(self._session, stream_id, part, len(data), end_stream)
        return waiting if waiting >= 0 else -1

    def send_trailers(self, stream_id: int, headers: Headers) -> bool:
        if self._failed:
            return False
        packed = pack_headers(headers)
        rv: int = lib.shim_submit_trailers(self._session, stream_id, packed, len(packed))
        return rv == 0

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if not self._failed:
            lib.shim_reset(self._session, stream_id, error_code)

    def goaway(self, error_code: int, last_stream_id: int, terminate: bool = False) -> None:
        if not self._failed:
            lib.shim_goaway(self._session, error_code, last_stream_id, terminate)
            if terminate:
                self._failed = True

    def ping(self, data: bytes) -> None:
        if not self._failed and len(data) == 8:
            lib.shim_ping(self._session, data)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self._failed and size > 0:
            lib.shim_consume(self._session, stream_id, size)

    def waiting(self, stream_id: int) -> int:
        return 0 if self._session is None else int(lib.shim_waiting(self._session, stream_id))

    def is_open(self, stream_id: int) -> bool:
        return not self._failed and bool(lib.shim_is_open(self._session, stream_id))

    @property
    def highest_stream_id(self) -> int:
        return 0 if self._session is None else int(lib.shim_highest(self._session))


def _decode(buf: bytes) -> list[Event]:
    """The shim's event records as events."""
    events: list[Event] = []
    add = events.append
    at = 0
    end = len(buf)
    unpack = _RECORD.unpack_from
    while at < end:
        kind, flags, _, sid, a, b, size = unpack(buf, at)
        at += 20
        if kind == _DATA:
            add(DataReceived(sid, buf[at : at + size], a))
        elif kind == _REQUEST:
            ended = bool(flags & _END_STREAM)
            add(RequestReceived(sid, unpack_headers(buf, at), ended))
            if ended:
                add(StreamEnded(sid))
        elif kind == _END:
            add(StreamEnded(sid))
        elif kind == _TRAILERS:
            add(TrailersReceived(sid, unpack_headers(buf, at)))
            add(StreamEnded(sid))
        elif kind == _RESET:
            add(StreamReset(sid, a))
        elif kind == _STREAM_ERROR:
            add(StreamRefused(sid, a))
        elif kind == _SETTINGS:
            add(SettingsReceived())
        elif kind == _PING:
            add(PingReceived(buf[at : at + 8]))
        elif kind == _PING_ACK:
            add(PingAcknowledged(buf[at : at + 8]))
        elif kind == _GOAWAY:
            add(GoAwayReceived(a, b))
        elif kind == _UNKNOWN:
            add(UnknownFrameReceived(a))
        elif kind == _WINDOW:
            add(WindowUpdated(sid))
        at += size
    return events
