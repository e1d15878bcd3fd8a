"""The floors tls-sidecar is measured against, run in the same benchmark as the proxies.

`python -m loadtest.baselines pipe PORT UPSTREAM_PORT CERT KEY`: a uvloop TLS server that pipes
each client connection's bytes to its own connection to the upstream and back: the TLS loop
and the syscalls, no HTTP at all.
`python -m loadtest.baselines parse ...`: the same, but every request and response is parsed with
httptools and the request is re-serialized: the least an HTTP-aware proxy does, nothing else
(no header rewriting, no timeouts, no metrics, no pipelining, no error answers).
`python -m loadtest.baselines h2 PORT CERT KEY`: a uvloop TLS server speaking HTTP/2 with the h2
library that answers every stream itself (a gRPC request, at its end, with a message and
`grpc-status` trailers): the ceiling of the h2 library in one process.
`python -m loadtest.baselines nghttp2 PORT CERT KEY`: the same responder on the nghttp2 codec
(`proxy.http2.nghttp2_codec`: libnghttp2 through the batching C shim, one C call per read, per
response part and per write): the ceiling of HTTP/2 on nghttp2 in one Python process.
`python -m loadtest.baselines h2relay PORT UPSTREAM_PORT CERT KEY`: HTTP/2 in, h2c out, each
stream relayed frame for frame and nothing else: the floor of a gRPC proxy built on h2 (two h2
stacks per request, where the h2 floor has one).
`python -m loadtest.baselines sockparse PORT UPSTREAM_PORT CERT KEY`: the parse floor with its TLS
on the socket itself: a non-blocking `ssl.SSLSocket` that OpenSSL reads and writes directly, as
nginx uses OpenSSL, where uvloop's TLS (and every other floor's) encrypts into memory BIOs and
copies the records to and from its own socket transport. What that TLS layer costs.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from typing import Any

import uvloop


class _Pipe(asyncio.Protocol):
    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.transport: asyncio.Transport | None = None
        self.backlog: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.backlog.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class _ClientSide(_Pipe):
    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.upstream_port = upstream_port

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(_Pipe, "127.0.0.1", self.upstream_port)
        up.peer = self.transport
        self.peer = up.transport
        assert self.peer is not None
        for data in self.backlog:
            self.peer.write(data)


class _ParsingClientSide(asyncio.Protocol):
    """Parse requests with httptools, send them on, parse responses, send them back."""

    def __init__(self, upstream_port: int) -> None:
        import httptools  # noqa: PLC0415

        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.up: _ParsingUpstream | None = None
        self.pending: list[bytes] = []
        self.url = b""
        self.headers: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(
            lambda: _ParsingUpstream(self.transport), "127.0.0.1", self.upstream_port
        )
        if self.lost:  # the client left while this connected
            up.transport.close()
            return
        self.up = up
        for data in self.pending:
            up.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.up is not None:
            self.up.transport.close()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        head = b"".join(
            [self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n", *self.headers, b"\r\n"]
        )
        if self.up is None:
            self.pending.append(head)
        else:
            self.up.transport.write(head)

    def on_body(self, body: bytes) -> None:
        if self.up is None:
            self.pending.append(body)
        else:
            self.up.transport.write(body)


class _ParsingUpstream(asyncio.Protocol):
    def __init__(self, client: Any) -> None:
        import httptools  # noqa: PLC0415

        self.client = client
        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.headers: list[bytes] = []
        self.out: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.out:
            self.client.write(b"".join(self.out))
            self.out = []

    def on_message_begin(self) -> None:
        self.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        self.out += (b"HTTP/1.1 %d OK\r\n" % status, *self.headers, b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.out.append(body)


class _SocketTLS:
    """The little of a transport the parse floor's client side uses (`write`), on a non-blocking
    SSLSocket: OpenSSL reads and writes the socket, no memory BIO between."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket, upstream: int) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = _ParsingClientSide(upstream)
        self.handshaking = True
        # What OpenSSL could not write yet, retried whole (OpenSSL takes the same bytes, and
        # more, again); reading waits while there is some.
        self.backlog = b""
        self.writing = False  # waiting for room to write
        self.closed = False
        loop.add_reader(self.fd, self._step)

    def _step(self) -> None:
        """Readable or writable: the handshake, then the backlog, then what there is to read."""
        if self.closed:
            return
        sock = self.sock
        try:
            if self.handshaking:
                sock.do_handshake()
                self.handshaking = False
                self.protocol.connection_made(self)
            if self.backlog:
                sock.send(self.backlog)
                self.backlog = b""
            self._want_write(False)
            while not self.closed:
                data = sock.recv(65536)  # a TLS record holds at most 16 KiB
                if not data:
                    self.close()
                    return
                self.protocol.data_received(data)
                if not sock.pending():  # the rest, if any, is still in the kernel: epoll says
                    return
        except ssl.SSLWantReadError:  # also a write that waits for the peer (a key update)
            self._want_write(False)
        except ssl.SSLWantWriteError:
            self._want_write(True)
        except OSError:  # ssl.SSLError included
            self.close()

    def _want_write(self, on: bool) -> None:
        if on != self.writing and not self.closed:
            self.writing = on
            if on:
                self.loop.add_writer(self.fd, self._step)
            else:
                self.loop.remove_writer(self.fd)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if self.backlog:
            self.backlog += data
            return
        try:
            self.sock.send(data)
        except ssl.SSLWantWriteError:
            self.backlog = data
            self._want_write(True)
        except ssl.SSLWantReadError:
            self.backlog = data  # retried when the socket is readable
        except OSError:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self._want_write(False)
        self.closed = True
        self.loop.remove_reader(self.fd)
        self.sock.close()
        self.protocol.connection_lost(None)


async def _serve_on_sockets(port: int, upstream: int, context: ssl.SSLContext) -> None:
    """Accept and wrap each connection in an SSLSocket (sockparse)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port), backlog=1024)
    listener.setblocking(False)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            sock = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            _SocketTLS(loop, sock, upstream)

    loop.add_reader(listener.fileno(), accept)
    await asyncio.Event().wait()


class _H2Responder(asyncio.Protocol):
    """Answers every HTTP/2 stream with a fixed 6-byte body, as fast as the h2 library allows."""

    def __init__(self) -> None:
        import h2.config  # noqa: PLC0415
        import h2.connection  # noqa: PLC0415

        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.transport: Any = None
        self.grpc: set[int] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        import h2.events  # noqa: PLC0415

        conn = self.conn
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                if (b"content-type", b"application/grpc") in event.headers:
                    self.grpc.add(event.stream_id)  # answered at its end, as gRPC unary is
                    continue
                conn.send_headers(
                    event.stream_id,
                    [(b":status", b"200"), (b"content-length", b"6")],
                )
                conn.send_data(event.stream_id, b"hello\n", end_stream=True)
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id in self.grpc:
                self.grpc.discard(event.stream_id)
                conn.send_headers(
                    event.stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                conn.send_data(event.stream_id, b"\x00\x00\x00\x00\x05hello")
                conn.send_headers(event.stream_id, [(b"grpc-status", b"0")], end_stream=True)
        out = conn.data_to_send()
        if out:
            self.transport.write(out)


class _Nghttp2Responder(asyncio.Protocol):
    """The h2 floor's answers on the nghttp2 codec, with the proxy's HTTP/2 settings."""

    def __init__(self) -> None:
        from proxy.http2.codec import CodecSettings  # noqa: PLC0415
        from proxy.http2.nghttp2_codec import Nghttp2ServerCodec  # noqa: PLC0415

        self.codec = Nghttp2ServerCodec(
            CodecSettings(
                max_concurrent_streams=100,
                max_header_bytes=16 * 1024,
                stream_window=256 * 1024,
                connection_window=1024 * 1024,
            )
        )
        self.transport: Any = None
        self.grpc: set[int] = set()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.codec.data_to_send())

    def data_received(self, data: bytes) -> None:
        from proxy.http2.codec import (  # noqa: PLC0415
            CodecError,
            DataReceived,
            RequestReceived,
            StreamEnded,
        )

        codec = self.codec
        try:
            events = codec.receive(data)
        except CodecError:
            self.transport.write(codec.data_to_send())
            self.transport.close()
            return
        event: Any
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                sid = event.stream_id
                if (b"content-type", b"application/grpc") in event.headers:
                    self.grpc.add(sid)  # answered at its end, as gRPC unary is
                    continue
                codec.send_headers(sid, [(b":status", b"200"), (b"content-length", b"6")])
                codec.send_data(sid, b"hello\n", end_stream=True)
            elif kind is DataReceived:
                codec.acknowledge(event.stream_id, event.flow_controlled_length)
            elif kind is StreamEnded and event.stream_id in self.grpc:
                sid = event.stream_id
                self.grpc.discard(sid)
                codec.send_headers(
                    sid, [(b":status", b"200"), (b"content-type", b"application/grpc")]
                )
                codec.send_data(sid, b"\x00\x00\x00\x00\x05hello")
                codec.send_trailers(sid, [(b"grpc-status", b"0")])
        out = codec.data_to_send()
        if out:
            self.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.codec.close()


class _H2Relay(asyncio.Protocol):
    """HTTP/2 in, h2c out, nothing else: each client connection gets its own connection to the
    app, and every stream is relayed frame for frame (headers, data, trailers, flow control).
    No checks, timers, metrics or logs: the least a gRPC-carrying proxy on h2 does."""

    def __init__(self, upstream_port: int) -> None:
        import h2.config  # noqa: PLC0415
        import h2.connection  # noqa: PLC0415

        self.down = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.up = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.upstream_port = upstream_port
        self.transport: Any = None
        self.up_transport: Any = None
        self.backlog: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.down.initiate_connection()
        transport.write(self.down.data_to_send())
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Up(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                relay.from_app(data)

        up_transport, _ = await loop.create_connection(Up, "127.0.0.1", self.upstream_port)
        self.up.initiate_connection()
        up_transport.write(self.up.data_to_send())
        self.up_transport = up_transport
        for data in self.backlog:
            self.data_received(data)
        self.backlog = []

    def data_received(self, data: bytes) -> None:
        import h2.events  # noqa: PLC0415

        if self.up_transport is None:
            self.backlog.append(data)
            return
        up = self.up
        event: Any
        for event in self.down.receive_data(data):
            kind = type(event)
            if kind is h2.events.RequestReceived:
                headers = [(n, b"http" if n == b":scheme" else v) for n, v in event.headers]
                up.send_headers(event.stream_id, headers)
            elif kind is h2.events.DataReceived:
                up.send_data(event.stream_id, event.data)
                self.down.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.StreamEnded:
                up.end_stream(event.stream_id)
        self._flush()

    def from_app(self, data: bytes) -> None:
        import h2.events  # noqa: PLC0415

        down = self.down
        event: Any
        for event in self.up.receive_data(data):
            kind = type(event)
            if kind is h2.events.ResponseReceived:
                down.send_headers(event.stream_id, event.headers)
            elif kind is h2.events.DataReceived:
                down.send_data(event.stream_id, event.data)
                self.up.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.TrailersReceived:
                down.send_headers(event.stream_id, event.headers, end_stream=True)
        self._flush()

    def _flush(self) -> None:
        out = self.up.data_to_send()
        if out:
            self.up_transport.write(out)
        out = self.down.data_to_send()
        if out:
            self.transport.write(out)


async def _serve(kind: str, argv: list[str]) -> None:
    loop = asyncio.get_running_loop()
    port = int(argv[0])
    rest = argv[1:]
    factory: Any
    if kind in ("h2", "nghttp2"):
        cert, key = rest
        factory = _H2Responder if kind == "h2" else _Nghttp2Responder
        alpn = ["h2"]
    else:
        upstream_port, cert, key = int(rest[0]), rest[1], rest[2]
        alpn = ["h2"] if kind == "h2relay" else ["http/1.1"]

        def factory() -> asyncio.Protocol:
            if kind == "pipe":
                return _ClientSide(upstream_port)
            if kind == "h2relay":
                return _H2Relay(upstream_port)
            return _ParsingClientSide(upstream_port)

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(alpn)
    if kind == "sockparse":
        await _serve_on_sockets(port, upstream_port, context)
        return
    server = await loop.create_server(factory, "127.0.0.1", port, ssl=context, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    kind, *argv = sys.argv[1:]
    if kind not in ("pipe", "parse", "sockparse", "h2", "nghttp2", "h2relay"):
        sys.exit(
            "usage: python -m loadtest.baselines pipe|parse|sockparse|h2|nghttp2|h2relay PORT"
            " [UPSTREAM_PORT] CERT KEY"
        )
    if kind == "nghttp2":
        from proxy.http2 import nghttp2_codec  # noqa: PLC0415

        if not nghttp2_codec.AVAILABLE:
            sys.exit(f"loadtest.baselines: {nghttp2_codec.HOW_TO_BUILD}")
    uvloop.run(_serve(kind, argv))


if __name__ == "__main__":
    main()
