"""The HTTP/2 client codec on libnghttp2 (`client_codec.Http2ClientCodec`), for the h2c
connection to the app, through the C shim's client side (`_nghttp2_client.c`).

As on the server side: each `receive` is one C call returning every event of the bytes in one
buffer, decoded here; each request part is one C call (a head packed into one buffer); the
output is one C call per loop iteration. nghttp2's HTTP checks are on for the app's answers:
a malformed one resets its stream, which arrives here as a `StreamRefused`. Window updates
are ours to send (`acknowledge`), for backpressure.
"""

from __future__ import annotations

import struct
from typing import Any

from proxy.core.headers import Headers
from proxy.http2 import HOW_TO_BUILD
from proxy.http2.client_codec import (
    ClientEvent,
    ClientSettings,
    DataReceived,
    GoAwayReceived,
    InformationalReceived,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamRefused,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from proxy.http2.codec import CodecError
from proxy.http2.nghttp2_codec import FAILURES, FLOODED, pack_headers, unpack_headers

try:
    from proxy.http2._nghttp2 import ffi, lib
except ImportError:  # built without a C compiler or libnghttp2's headers
    ffi = lib = None

__all__ = ["Nghttp2ClientCodec", "live_sessions"]

_TRAILERS, _DATA, _END, _RESET, _SETTINGS = 2, 3, 4, 5, 6
_GOAWAY, _STREAM_ERROR, _WINDOW, _RESPONSE, _INFORMATIONAL = 9, 11, 13, 14, 15
_END_STREAM = 1
_RECORD = struct.Struct("<BBHIIII")
_PROTOCOL_ERROR = 0x1
_UNBOUNDED = 2**31 - 1


def live_sessions() -> int:
    """nghttp2 sessions of this process not yet freed (both sides): what a leak would grow."""
    return 0 if lib is None else int(lib.shim_live_sessions())


class Nghttp2ClientCodec:
    """One h2c connection's client side on one nghttp2 session."""

    name = "nghttp2"
    __slots__ = ("_code", "_events", "_events_len", "_failed", "_out", "_out_len", "_s", "_why")

    def __init__(self, settings: ClientSettings) -> None:
        if lib is None:
            raise RuntimeError(HOW_TO_BUILD)
        config = ffi.new(
            "shim_config *",
            {
                "max_concurrent_streams": 0,
                "header_limit": settings.max_header_bytes,
                "stream_window": settings.stream_window,
                "connection_window": settings.connection_window,
            },
        )
        session = lib.shimc_new(config)
        if session == ffi.NULL:
            raise MemoryError("nghttp2 session")
        # freed by close() on every path the connection ends by, else with the codec
        self._s: Any = ffi.gc(session, lib.shim_free)
        self._events: Any = ffi.new("const char **")
        self._events_len: Any = ffi.new("size_t *")
        self._why: Any = ffi.new("int *")
        self._code: Any = ffi.new("uint32_t *")
        self._out: Any = ffi.new("const char **")
        self._out_len: Any = ffi.new("size_t *")
        self._failed = False

    def close(self) -> None:
        session, self._s = self._s, None
        if session is not None:
            ffi.release(session)
        self._failed = True

    # --- the app's bytes -------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[ClientEvent]:
        if self._failed:
            return []
        rv = lib.shim_feed(
            self._s, data, len(data), self._events, self._events_len, self._why, self._code
        )
        if rv:
            self._failed = True
            if rv > 0:  # nghttp2 found a connection error and queued its GOAWAY
                code = int(self._code[0])
                raise CodecError("protocol_error", code, f"connection error {code:#x}")
            if rv == FLOODED:
                reason, code, message = "control_flood", 0xB, "frames answered but never read"
            else:
                reason, code, message = FAILURES.get(
                    self._why[0],
                    (
                        "protocol_error",
                        _PROTOCOL_ERROR,
                        ffi.string(lib.nghttp2_strerror(rv)).decode(),
                    ),
                )
            lib.shim_goaway(self._s, code, 0, 1)
            raise CodecError(reason, code, message)
        size = self._events_len[0]
        return _decode(ffi.unpack(self._events[0], size)) if size else []

    # --- the request -----------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        if self._s is None:
            return b""
        lib.shim_send(self._s, self._out, self._out_len)
        size = self._out_len[0]
        return bytes(ffi.unpack(self._out[0], size)) if size else b""

    def send_request(self, headers: Headers, end_stream: bool = False) -> int:
        if self._failed:
            return -1
        packed = pack_headers(headers)
        sid: int = lib.shimc_request(self._s, packed, len(packed), end_stream)
        return sid if sid > 0 else -1

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        if self._failed:
            return -1
        if type(data) is not bytes:  # a bytearray or memoryview
            data = ffi.from_buffer(data)
        waiting: int = lib.shim_submit_data(self._s, stream_id, data, len(data), end_stream)
        return waiting if waiting >= 0 else -1

    def send_trailers(self, stream_id: int, headers: Headers) -> bool:
        if self._failed:
            return False
        packed = pack_headers(headers)
        return int(lib.shim_submit_trailers(self._s, stream_id, packed, len(packed))) == 0

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        if not self._failed and lib.shim_is_open(self._s, stream_id):
            lib.shim_reset(self._s, stream_id, error_code)

    def goaway(self, error_code: int = 0) -> None:
        if not self._failed:
            self._failed = True
            lib.shim_goaway(self._s, error_code, 0, 1)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self._failed and size > 0:
            lib.shim_consume(self._s, stream_id, size)

    def acknowledge_connection(self, size: int) -> None:
        if not self._failed and size > 0:
            lib.shimc_consume_part(self._s, 0, size)

    def acknowledge_stream(self, stream_id: int, size: int) -> None:
        if not self._failed and size > 0 and stream_id:
            lib.shimc_consume_part(self._s, stream_id, size)

    def waiting(self, stream_id: int) -> int:
        return 0 if self._s is None else int(lib.shim_waiting(self._s, stream_id))

    def is_open(self, stream_id: int) -> bool:
        return not self._failed and bool(lib.shim_is_open(self._s, stream_id))

    @property
    def max_concurrent_streams(self) -> int:
        return _UNBOUNDED if self._s is None else int(lib.shimc_max_streams(self._s))


def _decode(buf: bytes) -> list[ClientEvent]:
    """The shim's event records as events."""
    events: list[ClientEvent] = []
    add = events.append
    at = 0
    end = len(buf)
    unpack = _RECORD.unpack_from
    while at < end:
        kind, flags, _, sid, a, b, size = unpack(buf, at)
        at += 20
        if kind == _DATA:
            add(DataReceived(sid, buf[at : at + size], a))
        elif kind == _RESPONSE:
            ended = bool(flags & _END_STREAM)
            add(ResponseReceived(sid, unpack_headers(buf, at), ended))
            if ended:
                add(StreamEnded(sid))
        elif kind == _END:
            add(StreamEnded(sid))
        elif kind == _TRAILERS:
            add(TrailersReceived(sid, unpack_headers(buf, at)))
            add(StreamEnded(sid))
        elif kind == _INFORMATIONAL:
            add(InformationalReceived(sid, unpack_headers(buf, at)))
        elif kind == _RESET:
            add(StreamReset(sid, a))
        elif kind == _STREAM_ERROR:
            add(StreamRefused(sid, a))
        elif kind == _SETTINGS:
            add(SettingsChanged())
        elif kind == _GOAWAY:
            add(GoAwayReceived(a, b))
        elif kind == _WINDOW:
            add(WindowUpdated(sid))
        at += size
    return events
