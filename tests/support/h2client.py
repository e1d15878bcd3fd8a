"""A raw HTTP/2 client over TLS for tests: the `h2` library's state machine for well-formed
traffic, and hand-built frames (hyperframe + hpack) for what a well-behaved client never sends."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, PingFrame, RstStreamFrame

from tests.support.proxy import client_context

Headers = Sequence[tuple[bytes, bytes]]


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, when the server reset the stream

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class H2Client:
    def __init__(
        self,
        port: int,
        ca: Path,
        *,
        settings: dict[h2.settings.SettingCodes, int] | None = None,
        validate: bool = True,
        client_cert: tuple[Path, Path] | None = None,
        preface: bytes = b"",
        source: str | None = None,
    ) -> None:
        """`preface` (a PROXY header) goes out before TLS, from `source` if given."""
        ctx = client_context(ca)
        if client_cert is not None:
            ctx.load_cert_chain(client_cert[0], client_cert[1])
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(source, 0) if source else None
        )
        if preface:
            raw.sendall(preface)
        self.sock: ssl.SSLSocket = ctx.wrap_socket(raw, server_hostname="localhost")
        assert self.sock.selected_alpn_protocol() == "h2"
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=True,
        )
        self.conn = h2.connection.H2Connection(config=config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.responses: dict[int, Response] = {}
        self.received = bytearray()  # every byte from the server, for frames h2 would refuse
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings: dict[int, int] = {}
        self.closed = False  # the server closed (EOF)
        self.send_failed = False  # a write failed: the server may have closed; read what it sent
        self.h2_failed = False
        self._pings_answered = 0
        self.flush()

    # --- sending ---------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.send_failed and not self.h2_failed:
            self.send_raw(data)

    def send_frames(self, frames: Sequence[Frame]) -> None:
        """Bytes straight to the socket, past the h2 state machine."""
        self.send_raw(b"".join(f.serialize() for f in frames))

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.send_failed = True

    def request(
        self,
        path: bytes = b"/",
        *,
        method: bytes = b"GET",
        headers: Headers = (),
        body: bytes | None = None,
        end: bool = True,
        fields: Headers | None = None,
    ) -> int:
        """Open a stream; `fields` replaces the whole header block (pseudo-headers included)."""
        sid = self.conn.get_next_available_stream_id()
        if fields is None:
            fields = [
                (b":method", method),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", path),
                *headers,
            ]
        self.conn.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        self.responses[sid] = Response()
        return sid

    # --- receiving -------------------------------------------------------------------------------
    def pump(self, until: Callable[[], bool], timeout: float = 10.0) -> bool:
        """Read and handle frames until `until()` or the connection closes; False on timeout."""
        deadline = time.monotonic() + timeout
        while not until():
            if self.closed:
                return until()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return until()
            except OSError:
                data = b""
            if not data:
                self.closed = True
                continue
            self.received += data
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                # Our own state machine gave up (frames for streams it never opened): read on
                # raw, and send nothing more of its own (it would say GOAWAY).
                self.h2_failed = True
                events = []
            self._handle(events)
            self.flush()
            if self.h2_failed:
                self._answer_pings()
        return True

    def _handle(self, events: list[h2.events.Event]) -> None:
        for event in events:
            sid = getattr(event, "stream_id", 0)
            response = self.responses.setdefault(sid, Response()) if sid else None
            if isinstance(event, h2.events.ResponseReceived):
                assert response is not None
                response.headers = [(n, v) for n, v in event.headers if n[:1] != b":"]
                response.status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                assert response is not None
                response.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                assert response is not None
                response.trailers = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                assert response is not None
                response.ended = True
            elif isinstance(event, h2.events.StreamReset):
                assert response is not None
                response.reset = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self.remote_settings.update(
                    {int(k): v.new_value for k, v in event.changed_settings.items()}
                )

    def response(self, sid: int, timeout: float = 10.0) -> Response:
        done = self.pump(
            lambda: self.responses[sid].ended or self.responses[sid].reset is not None, timeout
        )
        assert done, f"stream {sid}: no complete response in {timeout}s"
        return self.responses[sid]

    def wait_goaway(self, timeout: float = 10.0) -> GoAwayFrame:
        """The server's GOAWAY, read from the raw bytes (an attacking client's own h2 state
        machine often refuses what the server says back)."""
        self.pump(lambda: self._raw_goaway() is not None, timeout)
        goaway = self._raw_goaway()
        assert goaway is not None, "no GOAWAY"
        return goaway

    def raw_frames(self) -> list[Frame]:
        """Every whole frame the server sent, parsed from the raw bytes."""
        data = memoryview(self.received)
        frames = []
        offset = 0
        while len(data) - offset >= 9:
            frame, length = Frame.parse_frame_header(data[offset : offset + 9])
            if len(data) - offset - 9 < length:
                break
            frame.parse_body(data[offset + 9 : offset + 9 + length])
            frames.append(frame)
            offset += 9 + length
        return frames

    def _answer_pings(self) -> None:
        """What h2 no longer does once it gave up (or saw a GOAWAY): answer the server's PINGs
        (a draining server waits for that answer before its last GOAWAY)."""
        pings = [f for f in self.raw_frames() if isinstance(f, PingFrame) and "ACK" not in f.flags]
        for ping in pings[self._pings_answered :]:
            self.send_raw(PingFrame(0, ping.opaque_data, flags=["ACK"]).serialize())
        self._pings_answered = len(pings)

    def raw_body(self, sid: int) -> tuple[bytes, bool]:
        """A stream's DATA and whether it ended, from the raw bytes."""
        frames = [f for f in self.raw_frames() if f.stream_id == sid]
        body = b"".join(f.data for f in frames if isinstance(f, DataFrame))
        return body, any("END_STREAM" in f.flags for f in frames)

    def _raw_goaway(self) -> GoAwayFrame | None:
        return next((f for f in self.raw_frames() if isinstance(f, GoAwayFrame)), None)

    def raw_resets(self) -> dict[int, int]:
        """Stream id -> RST_STREAM error code, from the raw bytes."""
        return {
            f.stream_id: f.error_code for f in self.raw_frames() if isinstance(f, RstStreamFrame)
        }

    def close(self) -> None:
        self.sock.close()


def get(port: int, ca: Path, path: bytes = b"/") -> Response:
    """One request on a fresh connection: is the proxy still serving?"""
    client = H2Client(port, ca)
    try:
        return client.response(client.request(path))
    finally:
        client.close()
