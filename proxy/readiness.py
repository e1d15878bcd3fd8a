"""Is the app ready? The probe behind /readyz and `check`: a connection of its own, and with
--upstream-health-path a GET there (over HTTP/2 for an h2c app). Never counted as a request."""

from __future__ import annotations

import asyncio

from proxy.config import Upstream
from proxy.core.headers import reason_phrase


async def probe_upstream(
    target: Upstream, timeout: float, health_path: str | None = None, *, preface: bytes = b""
) -> str | None:
    """Is the app ready? None when it is, else why not: it accepts a connection, and with
    `health_path` answers a GET there with 2xx or 3xx (over HTTP/2 for an h2c app). `preface`
    goes first (a PROXY LOCAL header, for an app that expects one on every connection).

    Readiness checks use their own connection, not the pool: they never count as requests."""
    try:
        async with asyncio.timeout(timeout):
            if target.unix_path:
                reader, writer = await asyncio.open_unix_connection(target.unix_path)
            else:
                assert target.address is not None
                reader, writer = await asyncio.open_connection(
                    target.address.host, target.address.port
                )
            try:
                if preface:
                    writer.write(preface)
                if health_path is None:
                    await writer.drain()
                    return None
                if target.h2c:
                    return await _health_h2c(reader, writer, target, health_path)
                return await _health_http1(reader, writer, target, health_path)
            finally:
                writer.close()
    except TimeoutError:
        what = "answer" if health_path else "accept"
        return f"upstream {target} did not {what} within {timeout:g}s"
    except OSError as e:
        return f"upstream {target} {e.strerror or e}".rstrip()


def _host(target: Upstream) -> str:
    return str(target.address) if target.address else "localhost"


def _verdict(path: str, status: int, reason: str) -> str | None:
    if 200 <= status < 400:
        return None
    reason = reason or reason_phrase(status).decode()
    return f"health check GET {path}: {status} {reason}".rstrip()


async def _health_http1(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Upstream, path: str
) -> str | None:
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {_host(target)}\r\n"
        "User-Agent: tls-sidecar-readiness\r\nConnection: close\r\n\r\n".encode()
    )
    line = await reader.readline()
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return f"health check GET {path}: not an HTTP answer"
    return _verdict(path, int(parts[1]), parts[2].strip() if len(parts) > 2 else "")


async def _health_h2c(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Upstream, path: str
) -> str | None:
    import h2.config  # noqa: PLC0415
    import h2.connection  # noqa: PLC0415
    import h2.events  # noqa: PLC0415

    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", _host(target).encode()),
            (b":path", path.encode()),
            (b"user-agent", b"tls-sidecar-readiness"),
        ],
        end_stream=True,
    )
    writer.write(conn.data_to_send())
    while True:
        data = await reader.read(65536)
        if not data:
            return f"health check GET {path}: the app closed the connection"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
                return _verdict(path, status, "")
        writer.write(conn.data_to_send())
