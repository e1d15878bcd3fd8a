"""Is the app ready? The probe behind /readyz and `check`: a connection of its own, and with
--upstream-health-path a GET there (over HTTP/2 for an h2c app). Never counted as a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from proxy.config import Config, Upstream
from proxy.core.headers import reason_phrase
from proxy.proxy_protocol import build_local


@dataclass(frozen=True)
class UpstreamCheck:
    """One readiness check of the app: why it is not ready (None: it is), and whether it
    accepted the connection at all (upstream_up), which a failing health path does not undo."""

    problem: str | None
    connected: bool


async def check_app(config: Config, timeout: float) -> UpstreamCheck:
    """`check_upstream` as the configuration asks it: the health path, the PROXY LOCAL header
    an app may expect on every connection, and `--http2-codec` for an h2c app."""
    return await check_upstream(
        config.upstream,
        timeout,
        config.upstream_health_path,
        preface=build_local(config.upstream_proxy_protocol),
        http2_codec=config.http2_codec,
    )


async def check_upstream(
    target: Upstream,
    timeout: float,
    health_path: str | None = None,
    *,
    preface: bytes = b"",
    http2_codec: str = "auto",
) -> UpstreamCheck:
    """The app is ready when it accepts a connection and, with `health_path`, answers a GET
    there with 2xx or 3xx (over HTTP/2 for an h2c app). `preface` goes first (a PROXY LOCAL
    header, for an app that expects one on every connection); `http2_codec` is `--http2-codec`,
    whose client codec asks an h2c app.

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
                    problem = await _health_h2c(reader, writer, target, health_path, http2_codec)
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
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target: Upstream,
    path: str,
    http2_codec: str,
) -> str | None:
    # Only an h2c app's health check loads HTTP/2, and only the codec `--http2-codec` names
    # (the one the h2c pool uses): a process on nghttp2 never imports h2 for readiness.
    from proxy import http2  # noqa: PLC0415
    from proxy.http2.client_codec import (  # noqa: PLC0415
        ClientSettings,
        GoAwayReceived,
        ResponseReceived,
        StreamRefused,
        StreamReset,
    )
    from proxy.http2.codec import CodecError  # noqa: PLC0415

    settings = ClientSettings(
        max_header_bytes=_H2C_HEAD_BYTES, stream_window=65535, connection_window=65535
    )
    codec = http2.client_codec_class(http2.client_codec_name(http2_codec))(settings)
    try:
        sid = codec.send_request(
            [
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", target.authority.encode()),
                (b":path", path.encode()),
                (b"user-agent", b"tls-sidecar-readiness"),
            ],
            end_stream=True,
        )
        writer.write(codec.data_to_send())
        while True:
            data = await reader.read(65536)
            if not data:
                return f"health check GET {path}: the app closed the connection"
            try:
                events = codec.receive(data)
            except CodecError as e:
                return f"health check GET {path}: the app broke HTTP/2 ({e})"
            for event in events:
                if isinstance(event, ResponseReceived) and event.stream_id == sid:
                    status = dict(event.headers).get(b":status", b"")
                    if len(status) != 3 or not status.isdigit():
                        return f"health check GET {path}: not an HTTP answer"
                    return _verdict(path, int(status), "")
                # the codec reset the stream for an answer HTTP/2 does not allow
                if isinstance(event, StreamRefused) and event.stream_id == sid:
                    return f"health check GET {path}: not an HTTP answer"
                # Said at once: waiting on would only end in "did not answer" at the timeout.
                if isinstance(event, StreamReset) and event.stream_id == sid:
                    why = f"the app reset the stream ({_code(event.error_code)})"
                    return f"health check GET {path}: {why}"
                # a graceful GOAWAY that covers our stream still answers it
                if isinstance(event, GoAwayReceived) and (
                    event.error_code or event.last_stream_id < sid
                ):
                    why = f"the app ended the connection ({_code(event.error_code)})"
                    return f"health check GET {path}: {why}"
            writer.write(codec.data_to_send())
    finally:
        codec.close()


_H2C_HEAD_BYTES = 64 * 1024  # a health check's answer head; its body is never read


def _code(code: int) -> str:
    from proxy.http2.codec import ErrorCode  # noqa: PLC0415

    try:
        return ErrorCode(code).name
    except ValueError:
        return f"error code {code}"
