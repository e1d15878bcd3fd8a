"""A controllable upstream app for tests: echo, stream, stall, reset, garbage; it counts requests.

It runs its own event loop in a background thread and records exactly what it received, so a test
can assert what reached the app: each request parsed (`requests`), every byte read (`received`, when `record` is set),
and how many requests its strict parser (h11) could not parse (`malformed`). Behaviour is chosen by path:

  /echo...            JSON: method, path, headers, body length and sha256
  /bytes/N            N bytes with Content-Length      /chunked/N  N bytes, chunked
  /gate/NAME          first chunk, then waits until the test calls open_gate(NAME), then the rest
  /hold/NAME          answers nothing (not even a head) until the test calls open_gate(NAME)
  /slow/SECONDS       answers after SECONDS            /stall  never answers
  /reset              closes the connection without answering (RST)
  /reset-mid          sends a head and half the body, then RST
  /reset-mid/N        sends a head for 2N bytes and N of them, then RST
  /garbage            answers bytes that are not HTTP
  /status/N           empty answer with status N       /close  answers with Connection: close
  /hop                answers with hop-by-hop headers the proxy must strip
  /early              answers 401 as soon as the head arrives, then reads the body
  /once...            answered only as a connection's first request; later ones: closed unanswered
  /ws                 WebSocket echo
  /extra...           "hello" (Content-Length 5; a HEAD gets the head), then INJECTED_RESPONSE
                      on the same connection, which the app goes on serving
  /extra-status/N     an empty answer with status N (204, 304), then INJECTED_RESPONSE
  /extra-gate/NAME    "hello", then INJECTED_RESPONSE once the test calls open_gate(NAME)

`closed` counts the connections that ended (the proxy closed them, or the app did).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import h11
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.utilities import generate_accept_token

# A whole second answer an app writes after its response: it must never reach a client.
INJECTED_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Injected: INJECTED\r\n\r\nINJECTED"


def pattern(n: int) -> bytes:
    """Deterministic, non-repeating-looking bytes so corruption and truncation show."""
    block = hashlib.sha256(b"tls-sidecar").digest() * 2048  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


@dataclass
class Received:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str
    connection_id: int

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name), None)


@dataclass
class UpstreamApp:
    host: str = "127.0.0.1"
    port: int = 0
    unix_path: str | None = None
    requests: list[Received] = field(default_factory=list)
    record: bool = False  # keep every byte read in `received` (off: bulk tests stay lean)
    received: bytearray = field(default_factory=bytearray)  # every byte read, all connections
    malformed: int = 0  # requests its parser (h11, strict) refused
    connections: int = 0
    closed: int = 0
    in_flight: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None
    _gates: dict[str, asyncio.Event] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- control from the test thread ----------------------------------------------------------
    def start(self) -> UpstreamApp:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="upstream-app")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("upstream app did not start")
        return self

    async def _listen(self) -> None:
        if self.unix_path:
            self._server = await asyncio.start_unix_server(self._serve, self.unix_path)
            return
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def call(self, coro_fn: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(timeout)

    def stop_listening(self) -> None:
        """Close the listening socket (new connections are refused); keep the loop."""

        async def close() -> None:
            assert self._server is not None
            self._server.close()

        self.call(close)

    def listen_again(self) -> None:
        self.call(self._listen)

    def drain(self, timeout: float = 30) -> None:
        """What a well-behaved app does on SIGTERM: stop accepting, finish what is in flight."""
        self.stop_listening()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        self.stop()

    def stop(self) -> None:
        """Close the listener, cancel every connection handler, stop and close the loop."""
        if self._loop is None:
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(5)

    def open_gate(self, name: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._gate(name).set)

    def count(self, path_prefix: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- the app ---------------------------------------------------------------------------
    def _gate(self, name: str) -> asyncio.Event:
        return self._gates.setdefault(name, asyncio.Event())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            self.connections += 1
            connection_id = self.connections
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        served_here = 0
        try:
            while True:
                request, body = await self._read_request(conn, reader, writer)
                if request is None:
                    return
                path = request.target.decode()
                with self._lock:
                    self.requests.append(
                        Received(
                            request.method.decode(),
                            path,
                            [(n.decode(), v.decode("latin-1")) for n, v in request.headers],
                            len(body),
                            hashlib.sha256(body).hexdigest(),
                            connection_id,
                        )
                    )
                served_here += 1
                if path.startswith("/once") and served_here > 1:
                    return  # a keep-alive connection the app closes instead of answering
                self.in_flight += 1
                try:
                    keep_going = await self._respond(conn, request, body, path, reader, writer)
                finally:
                    self.in_flight -= 1
                if not keep_going or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, ConnectionError):
            return
        finally:
            if not writer.is_closing():
                writer.close()
            with self._lock:
                self.closed += 1

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request | None, bytes]:
        request = None
        chunks = []
        eof = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError:
                if not eof:  # not a request cut short: one h11 could not parse
                    with self._lock:
                        self.malformed += 1
                raise
            if event is h11.NEED_DATA:
                data = await reader.read(262144)
                eof = not data
                if self.record:
                    with self._lock:
                        self.received += data
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
                if event.target.startswith(b"/early"):
                    # answer before reading the body, as apps that reject uploads do
                    headers = [(b"content-length", b"5")]
                    writer.write(conn.send(h11.Response(status_code=401, headers=headers)) or b"")
                    writer.write(conn.send(h11.Data(data=b"early")) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                if conn.they_are_waiting_for_100_continue:
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return request, b"".join(chunks)
            else:
                return None, b""

    async def _respond(
        self,
        conn: h11.Connection,
        request: h11.Request,
        body: bytes,
        path: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        send = conn.send

        def respond(
            status: int,
            payload: bytes = b"",
            headers: list[tuple[bytes, bytes]] | None = None,
            then: bytes = b"",
        ) -> None:
            hs = (
                [(b"content-length", str(len(payload)).encode())]
                if status not in (204, 304)
                else []
            )
            hs += headers or []
            out = send(h11.Response(status_code=status, headers=hs)) or b""
            if payload and request.method != b"HEAD":
                out += send(h11.Data(data=payload)) or b""
            out += send(h11.EndOfMessage()) or b""
            writer.write(out + then)  # `then` in the same write: it arrives with the response

        if path.startswith("/early"):
            pass  # answered as soon as the head arrived
        elif path.startswith("/bytes/"):
            respond(200, pattern(int(path.split("/")[2])))
        elif path.startswith("/chunked/"):
            n = int(path.split("/")[2])
            writer.write(
                send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
                or b""
            )
            data = pattern(n)
            for i in range(0, n, 65536):
                writer.write(send(h11.Data(data=data[i : i + 65536])) or b"")
                await writer.drain()
            writer.write(send(h11.EndOfMessage()) or b"")
        elif path.startswith("/gate/"):
            writer.write(
                send(h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")]))
                or b""
            )
            writer.write(send(h11.Data(data=b"first;")) or b"")
            await writer.drain()
            await self._gate(path.split("/")[2]).wait()
            writer.write(send(h11.Data(data=b"last")) or b"")
            writer.write(send(h11.EndOfMessage()) or b"")
        elif path.startswith("/hold/"):
            await self._gate(path.split("/")[2]).wait()
            respond(200, b"held")
        elif path.startswith("/slow/"):
            await asyncio.sleep(float(path.split("/")[2]))
            respond(200, b"slow done")
        elif path == "/stall":
            await reader.read()  # until the proxy gives up and closes
            return False
        elif path == "/reset":
            _reset(writer)
            return False
        elif path == "/reset-mid" or path.startswith("/reset-mid/"):
            half = int(path.split("/")[2]) if path.count("/") == 2 else 50000
            length = b"%d" % (2 * half)
            writer.write(
                send(h11.Response(status_code=200, headers=[(b"content-length", length)])) or b""
            )
            writer.write(send(h11.Data(data=pattern(half))) or b"")
            await writer.drain()
            _reset(writer)
            return False
        elif path == "/garbage":
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
            await writer.drain()
            return False
        elif path.startswith("/status/"):
            respond(int(path.split("/")[2]))
        elif path.startswith("/extra-status/"):
            respond(int(path.split("/")[2]), then=INJECTED_RESPONSE)
        elif path.startswith("/extra-gate/"):
            respond(200, b"hello")
            await writer.drain()
            await self._gate(path.split("/")[2]).wait()
            writer.write(INJECTED_RESPONSE)
        elif path.startswith("/extra"):
            respond(200, b"hello", then=INJECTED_RESPONSE)
        elif path == "/close":
            respond(200, b"bye", [(b"connection", b"close")])
        elif path == "/hop":
            respond(
                200,
                b"hop",
                [
                    (b"connection", b"x-internal"),
                    (b"x-internal", b"secret"),
                    (b"keep-alive", b"timeout=5"),
                    (b"x-app", b"kept"),
                ],
            )
        elif path == "/ws":
            await _websocket_echo(conn, request, reader, writer)
            return False
        else:
            doc = {
                "method": request.method.decode(),
                "path": path,
                "headers": [[n.decode(), v.decode("latin-1")] for n, v in request.headers],
                "body_length": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            respond(200, json.dumps(doc).encode(), [(b"content-type", b"application/json")])
        await writer.drain()
        return True


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _websocket_echo(
    conn: h11.Connection,
    request: h11.Request,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    key = next(v for n, v in request.headers if n == b"sec-websocket-key")
    writer.write(
        conn.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"upgrade"),
                    (b"sec-websocket-accept", generate_accept_token(key)),
                ],
            )
        )
        or b""
    )
    ws = WsConnection(ConnectionType.SERVER)
    if conn.trailing_data[0]:
        ws.receive_data(conn.trailing_data[0])
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                writer.write(ws.send(TextMessage(data="echo:" + event.data)))
            elif isinstance(event, BytesMessage):
                writer.write(ws.send(BytesMessage(data=bytes(event.data))))
            elif isinstance(event, CloseConnection):
                writer.write(ws.send(event.response()))
                await writer.drain()
                return
        await writer.drain()
        data = await reader.read(65536)
        if not data:
            return
        ws.receive_data(data)


class SlowReaderApp:
    """An app on a unix socket that reads an upload 4 KiB every 10 ms, straight from the
    socket (no read buffer of its own: what it has not read, the kernel still holds for the
    proxy), then answers 200 with the body's sha256. One request per connection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._accept, daemon=True, name="slow-reader")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                data = conn.recv(1)  # the head byte by byte: not one body byte early
                if not data:
                    return
                head += data
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            digest = hashlib.sha256()
            received = 0
            while received < length:
                data = conn.recv(min(4096, length - received))
                if not data:
                    return
                digest.update(data)
                received += len(data)
                time.sleep(0.01)  # the app's pace, not the test's
            body = digest.hexdigest().encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    def stop(self) -> None:
        self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self._listener.close()
