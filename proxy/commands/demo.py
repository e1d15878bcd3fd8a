"""`tls-sidecar demo`: a demo app that echoes what it received (WebSocket echo on upgrade), and
the proxy in front of it with a development certificate."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import click
import h11
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from proxy import log as logs
from proxy.config import Config, ConfigError, parse_address, parse_upstream
from proxy.launch import run_async, serve_proxy
from proxy.options import CONTEXT, ENV_PREFIX, note_environment
from proxy.server import Bound

log = logging.getLogger("tls_sidecar.demo")

MAX_ECHO_BODY = 1024 * 1024


def echo_document(request: h11.Request, body: bytes, peer: str) -> bytes:
    """What the demo answers: the request as the app saw it, after the proxy (pure)."""
    return (
        json.dumps(
            {
                "method": request.method.decode("latin-1"),
                "path": request.target.decode("latin-1"),
                "http_version": request.http_version.decode(),
                "headers": [
                    f"{n.decode('latin-1')}: {v.decode('latin-1')}" for n, v in request.headers
                ],
                "body_bytes": len(body),
                "peer": peer,
            },
            indent=2,
        ).encode()
        + b"\n"
    )


async def serve_demo_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = h11.Connection(h11.SERVER)
    peer = str(writer.get_extra_info("peername", ("-",))[0])
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                if _is_websocket(event):
                    await _websocket_echo(conn, event, reader, writer)
                    return
                body = await _read_body(conn, reader)
                payload = echo_document(event, body, peer)
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ]
                out = conn.send(h11.Response(status_code=200, headers=headers)) or b""
                if event.method != b"HEAD":
                    out += conn.send(h11.Data(data=payload)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                writer.write(out)
                await writer.drain()
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
                continue
            return
    except (h11.ProtocolError, ConnectionError):
        return
    finally:
        writer.close()


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(65536))
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size <= MAX_ECHO_BODY:
                chunks.append(event.data)
        else:
            return b"".join(chunks)


def _is_websocket(request: h11.Request) -> bool:
    return any(n == b"upgrade" and v.lower() == b"websocket" for n, v in request.headers)


async def _websocket_echo(
    conn: h11.Connection,
    request: h11.Request,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    key = next((v for n, v in request.headers if n == b"sec-websocket-key"), b"")
    accept = generate_accept_token(key)
    writer.write(
        conn.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", accept),
                ],
            )
        )
        or b""
    )
    ws = WsConnection(ConnectionType.SERVER)
    leftover = conn.trailing_data[0]
    if leftover:
        ws.receive_data(leftover)
    while True:
        for event in ws.events():
            if isinstance(event, TextMessage):
                writer.write(ws.send(TextMessage(data=event.data)))
            elif isinstance(event, BytesMessage):
                writer.write(ws.send(BytesMessage(data=event.data)))
            elif isinstance(event, Ping):
                writer.write(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                writer.write(ws.send(event.response()))
                await writer.drain()
                return
        await writer.drain()
        data = await reader.read(65536)
        if not data:
            return
        ws.receive_data(data)


async def start_demo_app(host: str, port: int) -> asyncio.Server:
    return await asyncio.start_server(serve_demo_connection, host, port, reuse_address=True)


@click.command("demo", context_settings=CONTEXT)
@click.option(
    "--app-listen",
    default="127.0.0.1:8080",
    show_default=True,
    envvar=ENV_PREFIX + "DEMO_APP_LISTEN",
    show_envvar=True,
    help="Where the demo app listens.",
)
@click.option(
    "--listen",
    default="127.0.0.1:8443",
    show_default=True,
    envvar=ENV_PREFIX + "DEMO_LISTEN",
    show_envvar=True,
    help="TLS address of the proxy.",
)
@click.option(
    "--admin-listen",
    default="127.0.0.1:9901",
    show_default=True,
    envvar=ENV_PREFIX + "DEMO_ADMIN_LISTEN",
    show_envvar=True,
    help="Admin address of the proxy.",
)
@click.option(
    "--certs-dir",
    default="certs",
    show_default=True,
    type=click.Path(path_type=Path),
    envvar=ENV_PREFIX + "DEMO_CERTS_DIR",
    show_envvar=True,
    help="Where the development CA and certificate are made (kept between runs).",
)
def demo_command(app_listen: str, listen: str, admin_listen: str, certs_dir: Path) -> None:
    """Run a demo app and the proxy in front of it, with a development certificate."""
    from proxy.commands.devcerts import ensure_dev_certificates  # noqa: PLC0415

    note_environment(click.get_current_context())
    app = parse_address(app_listen, option="--app-listen", example="127.0.0.1:8080")
    files = ensure_dev_certificates(certs_dir)
    base = Config(
        listen=parse_address(listen, option="--listen", example="127.0.0.1:8443"),
        admin_listen=parse_address(admin_listen, option="--admin-listen", example="127.0.0.1:9901"),
        cert_files=(files.server_cert,),
        key_files=(files.server_key,),
        log_format="text",
    ).validate()
    logs.configure(base.log_format, base.log_level)

    async def main() -> None:
        try:
            demo_server = await start_demo_app(app.host, app.port)
        except OSError as e:
            raise ConfigError(
                f"--app-listen {app}: cannot listen "
                f"({os.strerror(e.errno).lower() if e.errno else e}); pick another port, e.g. "
                f"TLS_SIDECAR_DEMO_APP_LISTEN={app.host}:{app.port + 1 if app.port else 8081} "
                "make run"
            ) from None
        app_port = demo_server.sockets[0].getsockname()[1]
        config = replace(base, upstream=parse_upstream(f"http://{app.host}:{app_port}"))

        def show(bound: Bound) -> None:
            port = bound.listen[0].port
            ca = shlex.quote(str(files.ca_cert))
            click.echo(
                "\n"
                f"  demo app   {config.upstream}  (echoes each request; WebSocket echo on upgrade)\n"
                f"  proxy      https://localhost:{port}  ->  the demo app\n"
                f"  admin      http://{bound.admin[0]}/readyz  and  /metrics\n\n"
                f"  try:   curl --cacert {ca} https://localhost:{port}/hello\n"
                f"  trust: sudo {shlex.quote(sys.argv[0])} certs trust --certs-dir "
                f"{shlex.quote(str(files.ca_cert.parent))}  (then no --cacert; browsers too)\n"
                "  stop:  Ctrl-C\n",
                err=True,
            )

        async with demo_server:
            await serve_proxy(config, show)

    run_async(main())
