"""Is the app ready? The probe behind /readyz and `check`: a connection of its own, and with
--upstream-health-path a GET there (over HTTP/2 for an h2c app). Never counted as a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from proxy.config import Upstream
from proxy.core.headers import reason_phrase


@dataclass(frozen=True)
class UpstreamCheck:
    """One readiness check of the app: why it is not ready (None: it is), and whether it
    accepted the connection at all (upstream_up), which a failing health path does not undo."""

    problem: str | None
    connected: bool


async def probe_upstream(
    target: Upstream, timeout: float, health_path: str | None = None, *, preface: bytes = b""
) -> str | None:
    """Is the app ready? None when it is, else why not (see check_upstream)."""
    return (await check_upstream(target, timeout, health_path, preface=preface)).problem


async def check_upstream(
    target: Upstream, timeout: float, health_path: str | None = None, *, preface: bytes = b""
) -> UpstreamCheck:
    """The app is ready when it accepts a connection and, with `health_path`, answers a GET
    there with 2xx or 3xx (over HTTP/2 for an h2c app). `preface` goes first (a PROXY LOCAL
    header, for an app that expects one on every connection).

    Readiness checks use their own connection, not the pool: they never count as requests."""
    connected = False
    try:
        async with asyncio.timeout(timeout):
            if target.unix_path:
                reader, writer = await asyncio.open_unix_connection(target.unix_path)
            else:
                assert target.address is not None
                reader, writer = await asyncio.open_connection(
                    target.address.host, target.address.port
                )
            connected = True
            try:
                if preface:
                    writer.write(preface)
                if health_path is None:
                    await writer.drain()
                    return UpstreamCheck(None, connected)
                if target.h2c:
                    problem = await _health_h2c(reader, writer, target, health_path)
                else:
                    problem = await _health_http1(reader, writer, target, health_path)
                return UpstreamCheck(problem, connected)
            finally:
                writer.close()
    except TimeoutError:
        what = "answer" if connected else "accept"
        return UpstreamCheck(f"upstream {target} did not {what} within {timeout:g}s", connected)
    except OSError as e:
        return UpstreamCheck(f"upstream {target} {e.strerror or e}".rstrip(), connected)


def _verdict(path: str, status: int, reason: str) -> str | None:
    if 200 <= status < 400:
        return None
    reason = reason or reason_phrase(status).decode()
    return f"health check GET {path}: {status} {reason}".rstrip()


async def _health_http1(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: Upstream, path: str
) -> str | None:
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {target.authority}\r\n"
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
            (b":authority", target.authority.encode()),
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
            # Said at once: waiting on would only end in "did not answer" at the timeout.
            if isinstance(event, h2.events.StreamReset):
                why = f"the app reset the stream ({_code(event.error_code)})"
                return f"health check GET {path}: {why}"
            if isinstance(event, h2.events.ConnectionTerminated) and (
                event.error_code or not event.last_stream_id  # a graceful GOAWAY still answers
            ):
                why = f"the app ended the connection ({_code(event.error_code)})"
                return f"health check GET {path}: {why}"
        writer.write(conn.data_to_send())


def _code(code: int | None) -> str:
    """h2 gives a known code as an ErrorCodes member (CANCEL), an unknown one as an int."""
    name: str | None = getattr(code, "name", None)
    return name or f"error code {code}"
