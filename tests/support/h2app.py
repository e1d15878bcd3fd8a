"""A small HTTP/2 cleartext app (h2 library, prior knowledge) for the h2c:// upstream tests:
it reports what it received (headers, body, trailers) and can reset a stream mid-response.

  /bytes/N             N bytes of `pattern`, sent as the proxy's flow-control windows allow
  /reset-mid           a head and a little body, then RST_STREAM CANCEL
  /reset-mid/N         a head and N bytes (within the windows), then RST_STREAM INTERNAL_ERROR
  /reset-unanswered    no answer: RST_STREAM 0.1 s after the request
  /grpc...             as a gRPC server answers: no content-length, the status in trailers
  /slow...             the JSON report, 0.3 s late     anything else: the JSON report at once
  /hold/NAME           the JSON report once the test calls open_gate(NAME); `held[NAME]`
                       counts the requests waiting there
  /bad-status          answers `:status: abc`
  /bad-padding         a DATA frame padded past its payload
  /goaway              GOAWAY NO_ERROR naming the stream before it (this one was not processed)
"""

from __future__ import annotations

import asyncio
import functools
import json
import struct
import threading
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings

from tests.support.upstream import pattern


class _Conn(asyncio.Protocol):
    def __init__(self, app: H2App) -> None:
        self.app = app
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        if app.max_streams is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=False,
                initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: app.max_streams},
            )
        self.transport: Any = None
        self.requests: dict[int, dict[str, Any]] = {}
        # stream id -> (body still to send, reset with INTERNAL_ERROR instead of ending)
        self.sending: dict[int, tuple[memoryview, bool]] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.app.connections += 1
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.conn.state_machine.state is h2.connection.ConnectionState.CLOSED:
            return  # after our GOAWAY (/goaway): the proxy closes the connection
        for event in self.conn.receive_data(data):
            sid = getattr(event, "stream_id", 0)
            if isinstance(event, h2.events.RequestReceived):
                self.requests[sid] = {
                    "headers": [[n.decode(), v.decode()] for n, v in event.headers],
                    "body": b"",
                    "trailers": [],
                }
                path = dict(event.headers)[b":path"]
                if path.startswith((b"/bytes/", b"/reset-mid/")):
                    self.conn.send_headers(sid, [(b":status", b"200")])
                    body = memoryview(pattern(int(path.split(b"/")[2])))
                    self.sending[sid] = (body, path.startswith(b"/reset-mid/"))
                    self._send_more(sid)
                elif path.startswith(b"/bad-"):
                    self._malformed(sid, path)
                elif path.startswith(b"/reset-mid"):
                    self.conn.send_headers(sid, [(b":status", b"200")])
                    self.conn.send_data(sid, b"partial")
                    self.flush()
                    asyncio.get_running_loop().call_later(
                        0.05, self._reset, sid, h2.errors.ErrorCodes.CANCEL
                    )
                elif path.startswith(b"/goaway"):
                    self.conn.close_connection(last_stream_id=sid - 2 if sid > 2 else 0)
                    self.flush()
                elif path.startswith(b"/reset-unanswered"):
                    asyncio.get_running_loop().call_later(
                        0.1, self._reset, sid, h2.errors.ErrorCodes.INTERNAL_ERROR
                    )
            elif isinstance(event, h2.events.DataReceived):
                self.requests[sid]["body"] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.TrailersReceived):
                self.requests[sid]["trailers"] = [
                    [n.decode(), v.decode()] for n, v in event.headers
                ]
            elif isinstance(event, h2.events.WindowUpdated):
                for waiting in [event.stream_id] if event.stream_id else list(self.sending):
                    if waiting in self.sending:
                        self._send_more(waiting)
            elif isinstance(event, h2.events.StreamEnded):
                target = dict(self.requests[sid]["headers"])[":path"]
                if target.startswith(("/bytes/", "/reset-mid/")):
                    del self.requests[sid]  # answered as the request came
                elif target.startswith("/hold/"):
                    name = target.split("/")[2]
                    self.app.held[name] = self.app.held.get(name, 0) + 1
                    gate = self.app.gate(name)
                    gate.add_done_callback(functools.partial(self._answer_held, sid))
                elif target.startswith("/slow"):
                    asyncio.get_running_loop().call_later(0.3, self._answer, sid)
                else:
                    self._answer(sid)
            elif isinstance(event, h2.events.StreamReset):
                self.app.resets.append(event.error_code)
                self.sending.pop(sid, None)
        self.flush()

    def _answer_held(self, sid: int, _: asyncio.Future[None]) -> None:
        self._answer(sid)
        self.flush()

    def _send_more(self, sid: int) -> None:
        """As much of the body as the windows allow; the end (or the reset) after the last."""
        body, reset = self.sending[sid]
        while body:
            step = min(
                len(body),
                self.conn.local_flow_control_window(sid),
                self.conn.max_outbound_frame_size,
            )
            if step <= 0:
                self.sending[sid] = (body, reset)
                return
            self.conn.send_data(sid, body[:step].tobytes())
            body = body[step:]
        del self.sending[sid]
        if reset:
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        else:
            self.conn.end_stream(sid)

    def _malformed(self, sid: int, path: bytes) -> None:
        """Bytes h2 would not send, written past it (its HPACK encoder stays in step)."""
        if path.startswith(b"/bad-status"):
            kind, flags = 0x1, 0x5  # HEADERS, END_HEADERS | END_STREAM
            payload = bytes(self.conn.encoder.encode([(b":status", b"abc")]))
        else:
            kind, flags, payload = 0x0, 0x9, bytes([5]) + b"abcd"  # DATA, PADDED | END_STREAM
        head = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
        self.transport.write(head + struct.pack(">I", sid) + payload)

    def _reset(self, sid: int, code: int) -> None:
        self.conn.reset_stream(sid, code)
        self.flush()

    def _answer(self, sid: int) -> None:
        request = self.requests.pop(sid)
        path = dict((n, v) for n, v in request["headers"])[":path"]
        if path.startswith(("/reset-mid", "/reset-unanswered", "/bad-", "/goaway")):
            return
        self.app.seen.append(request)
        if path.startswith("/grpc"):
            message = b"\x00\x00\x00\x00\x05hello"  # one length-prefixed gRPC message
            self.conn.send_headers(
                sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
            )
            self.conn.send_data(sid, message)
            trailers = [(b"grpc-status", b"0"), (b"grpc-message", b"ok")]
            self.conn.send_headers(sid, trailers, end_stream=True)
            self.flush()
            return
        body = json.dumps(
            {
                "headers": request["headers"],
                "body_length": len(request["body"]),
                "trailers": request["trailers"],
                "connections": self.app.connections,
            }
        ).encode()
        self.conn.send_headers(
            sid,
            [
                (b":status", b"200"),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ],
        )
        self.conn.send_data(sid, body)
        self.conn.send_headers(sid, [(b"x-app-trailer", b"done")], end_stream=True)
        self.flush()


class H2App:
    """Runs in its own thread and event loop on 127.0.0.1 (or a unix socket)."""

    def __init__(self, unix_path: str | None = None, max_streams: int | None = None) -> None:
        self.unix_path = unix_path
        self.max_streams = max_streams
        self.port = 0
        self.seen: list[dict[str, Any]] = []
        self.resets: list[int] = []
        self.connections = 0
        self.held: dict[str, int] = {}  # requests waiting at each /hold/ gate
        self._gates: dict[str, asyncio.Future[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> H2App:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"h2c+unix:{self.unix_path}" if self.unix_path else f"h2c://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            if self.unix_path:
                await self._loop.create_unix_server(lambda: _Conn(self), self.unix_path)
            else:
                server = await self._loop.create_server(lambda: _Conn(self), "127.0.0.1", 0)
                self.port = server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(listen())
        self._loop.run_forever()

    def gate(self, name: str) -> asyncio.Future[None]:
        """The gate /hold/NAME waits at (on the app's loop)."""
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = self._loop.create_future()
        return gate

    def open_gate(self, name: str) -> None:
        """Let every request held at /hold/NAME be answered (from the test's thread)."""

        def release() -> None:
            gate = self.gate(name)
            if not gate.done():
                gate.set_result(None)

        self._loop.call_soon_threadsafe(release)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
