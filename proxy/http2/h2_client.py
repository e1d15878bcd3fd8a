"""The HTTP/2 client codec on the `h2` library (`client_codec.Http2ClientCodec`), for the h2c
connection to the app: pure Python, the strict one.

h2 checks the app's answers (`validate_inbound_headers`) before a client sees them; the
connection stays open after the app's GOAWAY (`h2conn`), so that the streams it keeps are
answered; a request body the app's windows have no room for waits in `h2_flow.Outbound`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from proxy.core.headers import Headers
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
from proxy.http2.h2_flow import Outbound
from proxy.http2.h2conn import H2Connection

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    validate_inbound_headers=True,  # the app's answer is checked before a client sees it
    normalize_inbound_headers=False,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    split_outbound_cookies=False,
)
_WINDOW_SIZE = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE


class H2ClientCodec:
    """One h2c connection's client side on h2."""

    name = "h2"

    def __init__(self, settings: ClientSettings) -> None:
        conn = H2Connection(config=_CONFIG)
        codes = h2.settings.SettingCodes
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                codes.ENABLE_PUSH: 0,
                codes.INITIAL_WINDOW_SIZE: settings.stream_window,
                codes.MAX_HEADER_LIST_SIZE: settings.max_header_bytes,
            },
        )
        conn.initiate_connection()
        if settings.connection_window > 65535:
            conn.increment_flow_control_window(settings.connection_window - 65535)
        self.h2 = conn
        self._outbound = Outbound(conn)
        self._failed = False
        self._app_left = False  # the app said GOAWAY: no new stream (RFC 9113 §6.8)

    # --- the app's bytes -------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[ClientEvent]:
        if self._failed:
            return []
        try:
            received = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 queued a GOAWAY with the error's code
            self._failed = True
            raise CodecError("protocol_error", int(e.error_code), str(e)) from None
        except Exception as e:
            # h2 turns the frame errors it knows into ProtocolError; anything else h2,
            # hyperframe or hpack raise while reading is the app's bytes' doing all the same.
            self._failed = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            raise CodecError(
                "protocol_error", ErrorCodes.PROTOCOL_ERROR, f"{type(e).__name__}: {e}"
            ) from None
        return self._translate(received)

    def _translate(self, received: Iterable[h2.events.Event]) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        add = events.append
        event: Any
        for event in received:
            kind = type(event)
            if kind is h2.events.DataReceived:
                add(DataReceived(event.stream_id, event.data, event.flow_controlled_length))
            elif kind is h2.events.ResponseReceived:
                ended = event.stream_ended is not None
                add(ResponseReceived(event.stream_id, list(event.headers), ended))
            elif kind is h2.events.StreamEnded:
                add(StreamEnded(event.stream_id))
            elif kind is h2.events.TrailersReceived:
                add(TrailersReceived(event.stream_id, list(event.headers)))
            elif kind is h2.events.InformationalResponseReceived:
                add(InformationalReceived(event.stream_id, list(event.headers)))
            elif kind is h2.events.WindowUpdated:
                self._outbound.window_opened(event.stream_id)
                add(WindowUpdated(event.stream_id))
            elif kind is h2.events.StreamReset:
                self._outbound.drop(event.stream_id)
                if event.remote_reset:
                    add(StreamReset(event.stream_id, int(event.error_code)))
                else:  # h2 reset it for a frame the stream's state does not allow
                    add(StreamRefused(event.stream_id, int(event.error_code)))
            elif kind is h2.events.RemoteSettingsChanged:
                if _WINDOW_SIZE in event.changed_settings:
                    self._outbound.window_opened(0)
                add(SettingsChanged())
            elif kind is h2.events.ConnectionTerminated:
                self._app_left = True
                add(GoAwayReceived(int(event.error_code or 0), event.last_stream_id or 0))
        return events

    # --- the request -----------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        data: bytes = self.h2.data_to_send()
        return data

    def send_request(self, headers: Headers, end_stream: bool = False) -> int:
        # h2 would send it after the app's GOAWAY (the connection stays open, `h2conn`), for
        # the app to ignore; nghttp2 refuses, and so does this codec
        if self._failed or self._app_left:
            return -1
        try:
            sid: int = self.h2.get_next_available_stream_id()
            self.h2.send_headers(sid, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:  # the connection's state: no new stream
            return -1
        return sid

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        if not self.is_open(stream_id):
            return -1
        return self._outbound.send_data(stream_id, data, end_stream)

    def send_trailers(self, stream_id: int, headers: Headers) -> bool:
        if not self.is_open(stream_id):
            return False
        held = self._outbound.send_trailers(stream_id, headers)
        if held is not None:
            return held
        try:
            self.h2.send_headers(stream_id, headers, end_stream=True)
        except h2.exceptions.ProtocolError:
            return False
        return True

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self._outbound.drop(stream_id)
        if self.is_open(stream_id):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream_id, error_code)

    def goaway(self, error_code: int = 0) -> None:
        if not self._failed:
            self._failed = True
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.close_connection(error_code)

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self._failed and size > 0:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(size, stream_id)

    def acknowledge_connection(self, size: int) -> None:
        if not self._failed and size > 0:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.increment_flow_control_window(size)

    def acknowledge_stream(self, stream_id: int, size: int) -> None:
        if self.is_open(stream_id) and size > 0:
            with contextlib.suppress(h2.exceptions.ProtocolError, KeyError):
                self.h2.increment_flow_control_window(size, stream_id=stream_id)

    def waiting(self, stream_id: int) -> int:
        return self._outbound.waiting(stream_id)

    def is_open(self, stream_id: int) -> bool:
        stream: Any = self.h2.streams.get(stream_id)
        return not self._failed and stream is not None and not stream.closed

    @property
    def max_concurrent_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)

    def close(self) -> None:
        self._failed = True
        self._outbound.clear()
