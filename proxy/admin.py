"""The admin listener (plain HTTP): /livez, /healthz, /readyz and /metrics. It never proxies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from proxy.config import Address
from proxy.metrics import Metrics
from proxy.sockets import bind_dual_stack, dual_stack

log = logging.getLogger("tls_sidecar.admin")

Readiness = Callable[[], Awaitable[tuple[bool, str]]]

ADMIN_IDLE_TIMEOUT = 30.0
ADMIN_MAX_HEAD = 8192


def route(method: bytes, target: bytes) -> str | None:
    """Which endpoint a request is for; None when there is no such path (pure)."""
    path = target.split(b"?", 1)[0]
    if method not in (b"GET", b"HEAD"):
        return "method"
    return {
        b"/livez": "live",
        b"/healthz": "live",
        b"/readyz": "ready",
        b"/metrics": "metrics",
    }.get(path)


class AdminServer:
    def __init__(self, readiness: Readiness, metrics: Metrics) -> None:
        self._readiness = readiness
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, address: Address) -> list[socket.socket]:
        if dual_stack(address.host):
            self._server = await asyncio.start_server(self._serve, sock=bind_dual_stack(address))
        else:
            self._server = await asyncio.start_server(
                self._serve, address.host, address.port, reuse_address=True
            )
        return list(self._server.sockets)

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=ADMIN_MAX_HEAD)
        try:
            while True:
                event = await self._next(conn, reader)
                if isinstance(event, h11.Request):
                    status, content_type, body = await self._answer(event)
                    writer.write(self._response(conn, event, status, content_type, body))
                    await writer.drain()
                    if conn.our_state is h11.MUST_CLOSE:
                        break  # the client said Connection: close (or spoke HTTP/1.0)
                elif event is None and conn.our_state is conn.their_state is h11.DONE:
                    conn.start_next_cycle()  # keep-alive: Prometheus reuses its connection
                else:
                    break
        except h11.RemoteProtocolError as e:
            with contextlib.suppress(h11.LocalProtocolError):
                writer.write(
                    self._response(conn, None, e.error_status_hint, b"text/plain", b"bad request\n")
                )
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _next(self, conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(ADMIN_IDLE_TIMEOUT):
                    data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Data | h11.EndOfMessage):
                continue  # bodies are ignored: no admin endpoint takes one
            if event is h11.PAUSED:
                return None
            return event

    async def _answer(self, request: h11.Request) -> tuple[int, bytes, bytes]:
        endpoint = route(request.method, request.target)
        text = b"text/plain; charset=utf-8"
        if endpoint == "method":
            return 405, text, b"method not allowed: use GET\n"
        if endpoint == "live":
            return 200, text, b"ok\n"
        if endpoint == "ready":
            ok, reason = await self._readiness()
            return (200, text, b"ready\n") if ok else (503, text, f"not ready: {reason}\n".encode())
        if endpoint == "metrics":
            await self._readiness()  # refresh the ready/upstream_up gauges (cached, <= 1/s)
            accept = b",".join(v for n, v in request.headers if n == b"accept")
            content_type, body = self._metrics.exposition(accept)
            return 200, content_type, body
        return 404, text, b"not found: the admin port serves /livez /healthz /readyz /metrics\n"

    @staticmethod
    def _response(
        conn: h11.Connection,
        request: h11.Request | None,
        status: int,
        content_type: bytes,
        body: bytes,
    ) -> bytes:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        if request is None:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
        if request is None or request.method != b"HEAD":
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        return out
