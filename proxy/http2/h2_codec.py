"""The HTTP/2 server codec on the `h2` library (`codec.Http2ServerCodec`): pure Python, the
strict reference the nghttp2 codec is tested against.

h2's own request checks are off (`request.read_h2_head` checks for every codec). What h2 does
not do as the interface says, this adapter does: it bounds a header block as it arrives
(CONTINUATION flood), makes a stream id used again a connection error, refuses streams past
the advertised limit itself (h2 would end the connection), keeps the connection open after
the client's GOAWAY (`h2conn`), and holds a response body the client's windows have no room
for, sending it as they open.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionInputs, ConnectionState
from h2.errors import ErrorCodes
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, Frame, GoAwayFrame, HeadersFrame

from proxy.core.headers import Headers
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
from proxy.http2.h2_flow import Outbound
from proxy.http2.h2conn import CompactSettings, ServerH2Connection

_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # read_h2_head checks requests, so that a malformed one resets its stream only (h2's
    # checks end the whole connection); the proxy builds what it sends.
    validate_inbound_headers=False,
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    split_outbound_cookies=False,
)


class _StaysOpen(h2.connection.H2ConnectionStateMachine):
    """`h2conn`'s rule (a received GOAWAY leaves the connection open), before the first
    stream too: the connection decides when to close, as with nghttp2."""

    def process_input(self, input_: ConnectionInputs) -> list[Any]:
        if input_ is ConnectionInputs.RECV_GOAWAY and self.state in _OPEN:
            return []
        return super().process_input(input_)


_OPEN = (ConnectionState.IDLE, ConnectionState.SERVER_OPEN)


class _Bound(h2.exceptions.DenialOfServiceError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _StreamReused(h2.exceptions.ProtocolError):
    pass


class _HeaderBlockBudget(FrameBuffer):
    """h2 joins up to 64 CONTINUATION frames of any size into one header block; here a block is
    bounded in total as it arrives (CVE-2024-27316). A HEADERS frame on a stream id already used
    and closed is a connection error PROTOCOL_ERROR (RFC 9113 §5.1.1), where h2 would say
    STREAM_CLOSED, or only reset the stream if it had been reset."""

    def __init__(self, conn: h2.connection.H2Connection, limit: int) -> None:
        super().__init__(server=True)
        self.conn = conn
        self.limit = limit
        self._block = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, HeadersFrame):
            sid = f.stream_id
            if sid <= self.conn.highest_inbound_stream_id:
                stream = self.conn.streams.get(sid)
                if stream is None or stream.closed:
                    raise _StreamReused(f"stream id {sid} used again")
            self._block = len(f.data)
        elif isinstance(f, ContinuationFrame):
            self._block += len(f.data)
        if self._block > self.limit:
            raise _Bound("header_block", f"header block over {self.limit} bytes")
        return super()._update_header_buffer(f)


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The one content-length a request declares (None: none, or not one number, which
    `read_h2_head` refuses)."""
    declared: int | None = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit() or (declared is not None and int(value) != declared):
                return None
            declared = int(value)
    return declared


class H2ServerCodec:
    """One client connection's HTTP/2 server side on h2."""

    name = "h2"

    def __init__(self, settings: CodecSettings) -> None:
        conn = ServerH2Connection(config=_CONFIG)
        conn.state_machine = _StaysOpen()
        # The HPACK decoder stops a header list over the limit while decoding (HPACK bombs);
        # h2 would apply the setting only once the client acknowledged it.
        conn.decoder.max_header_list_size = settings.max_header_bytes
        conn.incoming_buffer = _HeaderBlockBudget(conn, settings.max_header_bytes)
        self.h2 = conn
        self._streams = settings.max_concurrent_streams
        conn.local_settings = self._settings(settings, self._streams)
        conn.initiate_connection()
        # h2 ends the whole connection for a stream past the limit; the codec refuses that
        # stream alone (REFUSED_STREAM, RFC 9113 §5.1.2), so h2 is held to a looser bound.
        conn.local_settings = self._settings(settings, 2 * self._streams + 100)
        if settings.connection_window > 65535:
            conn.increment_flow_control_window(settings.connection_window - 65535)
        self._outbound = Outbound(conn)
        # a request's declared content-length and the DATA so far, as nghttp2's codec checks it
        self._lengths: dict[int, list[int]] = {}
        self._out = b""  # frames written past h2 (a graceful GOAWAY) and those before them
        self._failed = False

    @staticmethod
    def _settings(settings: CodecSettings, streams: int) -> h2.settings.Settings:
        codes = h2.settings.SettingCodes
        return CompactSettings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: streams,
                codes.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
                codes.INITIAL_WINDOW_SIZE: settings.stream_window,
            },
        )

    # --- the client's bytes ---------------------------------------------------------------------
    def receive(self, data: bytes) -> list[Event]:
        if self._failed:
            return []
        conn = self.h2
        try:
            received = conn.receive_data(data)
        # h2 queued the GOAWAY for these too (they are ProtocolErrors, with their codes)
        except _Bound as e:
            self._failed = True
            raise CodecError(e.reason, ErrorCodes.ENHANCE_YOUR_CALM, str(e)) from None
        except _StreamReused as e:
            self._failed = True
            raise CodecError("stream_reused", ErrorCodes.PROTOCOL_ERROR, str(e)) from None
        except h2.exceptions.ProtocolError as e:  # h2 queued a GOAWAY with the error's code
            self._failed = True
            reason = "header_list" if isinstance(e, h2.exceptions.DenialOfServiceError) else None
            raise CodecError(reason or "protocol_error", int(e.error_code), str(e)) from None
        return self._translate(received)

    def _fail(self, code: int) -> None:
        self._failed = True
        self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)

    def _translate(self, received: Iterable[h2.events.Event]) -> list[Event]:
        events: list[Event] = []
        refused: set[int] = set()
        conn = self.h2
        event: Any
        for event in received:
            kind = type(event)
            if kind is h2.events.RequestReceived:
                sid = event.stream_id
                if conn.open_inbound_streams > self._streams and self._open_before(sid):
                    refused.add(sid)
                    self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
                    events.append(StreamRefused(sid, ErrorCodes.REFUSED_STREAM))
                    continue
                ended = event.stream_ended is not None
                declared = _content_length(event.headers)
                if declared is not None and not ended:
                    self._lengths[sid] = [declared, 0]
                elif declared and ended:  # declared, and no DATA at all
                    self._refuse(sid, refused, events)
                    continue
                events.append(RequestReceived(sid, list(event.headers), ended))
            elif kind is h2.events.DataReceived:
                if event.stream_id in refused:
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                    continue
                length = self._lengths.get(event.stream_id)
                if length is not None:
                    length[1] += len(event.data)
                    if length[1] > length[0] or (
                        event.stream_ended is not None and length[1] != length[0]
                    ):
                        self.acknowledge(event.stream_id, event.flow_controlled_length)
                        self._refuse(event.stream_id, refused, events)
                        continue
                if not event.data and event.stream_ended is not None:
                    # an empty DATA that only ends the stream: the StreamEnded says it (as
                    # nghttp2's codec does), so it is not taken for an empty DATA flood
                    self.acknowledge(event.stream_id, event.flow_controlled_length)
                    continue
                events.append(
                    DataReceived(event.stream_id, event.data, event.flow_controlled_length)
                )
            elif kind is h2.events.StreamEnded:
                length = self._lengths.pop(event.stream_id, None)
                if event.stream_id not in refused:
                    if length is not None and length[1] != length[0]:
                        self._refuse(event.stream_id, refused, events)
                        continue
                    events.append(StreamEnded(event.stream_id))
            elif kind is h2.events.TrailersReceived:
                if event.stream_id not in refused:
                    events.append(TrailersReceived(event.stream_id, list(event.headers)))
            elif kind is h2.events.StreamReset:
                self._outbound.drop(event.stream_id)
                self._lengths.pop(event.stream_id, None)
                if event.stream_id in refused:
                    continue
                if event.remote_reset:
                    events.append(StreamReset(event.stream_id, int(event.error_code)))
                else:  # h2 reset it for a frame the stream's state does not allow
                    events.append(StreamRefused(event.stream_id, int(event.error_code)))
            elif kind is h2.events.WindowUpdated:
                self._outbound.window_opened(event.stream_id)
                events.append(WindowUpdated(event.stream_id))
            elif kind is h2.events.RemoteSettingsChanged:
                if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._outbound.window_opened(0)
                events.append(SettingsReceived())
            elif kind is h2.events.PingReceived:
                events.append(PingReceived(event.ping_data))
            elif kind is h2.events.PingAckReceived:
                events.append(PingAcknowledged(event.ping_data))
            elif kind is h2.events.UnknownFrameReceived:
                events.append(UnknownFrameReceived(event.frame.type))
            elif kind is h2.events.ConnectionTerminated:
                events.append(GoAwayReceived(int(event.error_code or 0), event.last_stream_id or 0))
        return events

    def _refuse(self, sid: int, refused: set[int], events: list[Event]) -> None:
        """The body contradicts its content-length (RFC 9113 §8.1.1): a stream error."""
        self._lengths.pop(sid, None)
        refused.add(sid)
        self.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
        events.append(StreamRefused(sid, ErrorCodes.PROTOCOL_ERROR))

    def _open_before(self, sid: int) -> bool:
        """Whether the streams the client opened before this one (those of the same read
        included, as they stand after it) fill the limit."""
        open_before = 0
        for other, stream in self.h2.streams.items():
            if other < sid and other % 2 and not stream.closed:
                open_before += 1
        return open_before >= self._streams

    # --- the response -------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        out, self._out = self._out, b""
        data = self.h2.data_to_send()
        return out + data if out else data

    def send_headers(self, stream_id: int, headers: Headers, end_stream: bool = False) -> bool:
        if self._failed or stream_id in self._outbound.streams:
            return False
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:  # closed, or its head went out already
            return False
        return True

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        if self._failed or not self.is_open(stream_id):
            return -1
        return self._outbound.send_data(stream_id, data, end_stream)

    def send_trailers(self, stream_id: int, headers: Headers) -> bool:
        if self._failed:
            return False
        held = self._outbound.send_trailers(stream_id, headers)
        return self.send_headers(stream_id, headers, end_stream=True) if held is None else held

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._outbound.drop(stream_id)
        if not self._failed and self.is_open(stream_id):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream_id, error_code)

    def goaway(self, error_code: int, last_stream_id: int, terminate: bool = False) -> None:
        if self._failed:
            return
        if terminate:
            self._fail(error_code)
            return
        # Written past h2: its state machine would refuse to send anything after a GOAWAY,
        # and the streams in flight must still be answered.
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = error_code
        self._out += self.h2.data_to_send() + frame.serialize()

    def ping(self, data: bytes) -> None:
        if not self._failed:
            self.h2.ping(data)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self._failed and size > 0:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(size, stream_id)

    def waiting(self, stream_id: int) -> int:
        return self._outbound.waiting(stream_id)

    def is_open(self, stream_id: int) -> bool:
        stream: Any = self.h2.streams.get(stream_id)
        return not self._failed and stream is not None and not stream.closed

    def close(self) -> None:
        self._failed = True
        self._outbound.clear()

    @property
    def highest_stream_id(self) -> int:
        return int(self.h2.highest_inbound_stream_id)
