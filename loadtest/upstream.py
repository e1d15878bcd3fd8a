"""A fast plaintext upstream for the benchmark when nginx is not installed.

It understands exactly the benchmark's requests (GET /small, GET /10m, POST /upload with a
Content-Length body) and nothing more: it is a load target, not an HTTP server.
Run: python -m loadtest.upstream PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

SMALL = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: text/plain\r\n\r\nhello\n"
TEN_MIB = 10 * 1024 * 1024
BIG_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: application/octet-stream\r\n\r\n"
    % TEN_MIB
)
BIG_BODY = memoryview(b"x" * TEN_MIB)
UPLOADED = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"


class BenchUpstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = b""
        self.body_left = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.body_left:
            used = min(self.body_left, len(data))
            self.body_left -= used
            data = data[used:]
            if self.body_left == 0:
                self.transport.write(UPLOADED)
            if not data:
                return
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            target = head.split(b" ", 2)[1] if b" " in head else b"/"
            if target.startswith(b"/10m"):
                self.transport.writelines([BIG_HEAD, BIG_BODY])
            elif target.startswith(b"/upload"):
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                used = min(length, len(self.buffer))
                self.buffer = self.buffer[used:]
                self.body_left = length - used
                if self.body_left == 0:
                    self.transport.write(UPLOADED)
                else:
                    return
            else:
                self.transport.write(SMALL)


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BenchUpstream, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
