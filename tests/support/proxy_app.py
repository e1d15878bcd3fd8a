"""The app's side of --upstream-proxy-protocol: a front that reads the PROXY header the sidecar
sends on each app connection, records it decoded field by field, and relays the rest of the
connection to a real test app (HTTP/1.1 or h2c). A connection without a header is closed.

The parser here is written from the spec (haproxy's proxy-protocol.txt), independently of
proxy/proxy_protocol.py, so a mistake there does not hide itself in the test."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import threading
from dataclasses import dataclass, field

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


@dataclass
class Header:
    """One PROXY header as the app decoded it."""

    version: int
    command: str  # PROXY or LOCAL
    family: str  # TCP4, TCP6, UNSPEC (v1: TCP4, TCP6, UNKNOWN)
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    tlvs: dict[int, bytes] = field(default_factory=dict)
    ssl_client: int | None = None  # PP2_TYPE_SSL: client flags, verify, sub-TLVs
    ssl_verify: int | None = None
    ssl_sub: dict[int, bytes] = field(default_factory=dict)


def _tlv_list(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while data:
        kind = data[0]
        (length,) = struct.unpack("!H", data[1:3])
        assert len(data) >= 3 + length, "TLV overruns the header"
        out[kind] = data[3 : 3 + length]
        data = data[3 + length :]
    return out


async def read_header(reader: asyncio.StreamReader) -> Header:
    first = await reader.readexactly(1)
    if first == b"P":
        line = first + await reader.readuntil(b"\r\n")
        words = line[:-2].decode("ascii").split(" ")
        assert words[0] == "PROXY", line
        if words[1] == "UNKNOWN":
            return Header(1, "PROXY", "UNKNOWN")
        assert len(words) == 6, line
        return Header(
            1,
            "PROXY",
            words[1],
            (words[2], int(words[4])),
            (words[3], int(words[5])),
        )
    rest = await reader.readexactly(15)
    fixed = first + rest
    assert fixed[:12] == SIGNATURE, fixed
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    assert version == 2
    family_byte = fixed[13]
    (length,) = struct.unpack("!H", fixed[14:16])
    payload = await reader.readexactly(length)
    if command == 0:
        return Header(2, "LOCAL", "UNSPEC")
    assert command == 1
    if family_byte == 0x11:
        src = str(ipaddress.IPv4Address(payload[0:4]))
        dst = str(ipaddress.IPv4Address(payload[4:8]))
        sport, dport = struct.unpack("!HH", payload[8:12])
        family, tail = "TCP4", payload[12:]
    elif family_byte == 0x21:
        src = str(ipaddress.IPv6Address(payload[0:16]))
        dst = str(ipaddress.IPv6Address(payload[16:32]))
        sport, dport = struct.unpack("!HH", payload[32:36])
        family, tail = "TCP6", payload[36:]
    else:
        raise AssertionError(f"unexpected family 0x{family_byte:02x}")
    header = Header(2, "PROXY", family, (src, sport), (dst, dport), _tlv_list(tail))
    ssl = header.tlvs.get(0x20)
    if ssl is not None:
        header.ssl_client = ssl[0]
        (header.ssl_verify,) = struct.unpack("!I", ssl[1:5])
        header.ssl_sub = _tlv_list(ssl[5:])
    return header


class ProxyProtocolApp:
    """Listens on 127.0.0.1, in a thread of its own; each connection's header in `headers`."""

    def __init__(self, app_port: int) -> None:
        self.app_port = app_port
        self.port = 0
        self.headers: list[Header] = []
        self.refused = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ProxyProtocolApp:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def proxied(self) -> list[Header]:
        """The headers of connections that carried a client (LOCAL ones are health checks)."""
        return [h for h in list(self.headers) if h.command == "PROXY"]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            self._ready.set()

        self._loop.run_until_complete(listen())
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await read_header(reader)
        except (AssertionError, asyncio.IncompleteReadError, ValueError, UnicodeDecodeError):
            self.refused += 1
            writer.close()
            return
        self.headers.append(header)  # health checks (LOCAL) are relayed too: a GET may follow
        try:
            app_reader, app_writer = await asyncio.open_connection("127.0.0.1", self.app_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, app_writer), pipe(app_reader, writer))

    def stop(self) -> None:
        async def cancel_all() -> None:
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(cancel_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
