"""The `tls-sidecar` command: builds a Config from flags and TLS_SIDECAR_* variables, hands over."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import click
import uvloop
from click.core import ParameterSource

from proxy import __version__, http2, proxy_protocol
from proxy import log as logs
from proxy.commands.inject import inject
from proxy.commands.inject_sidecar import DEFAULT_IMAGE, DEFAULT_SECRET, InjectOptions
from proxy.config import (
    Config,
    ConfigError,
    parse_address,
    parse_duration,
    parse_log_level,
    parse_size,
    parse_upstream,
    readable_dir,
    readable_file,
)
from proxy.identity import AccessPolicy
from proxy.server import Bound, ProxyServer
from proxy.tls.context import check_groups, key_exchange_notes
from proxy.workers import Supervisor, check_workers, die_with_parent

log = logging.getLogger("tls_sidecar")

ENV_PREFIX = "TLS_SIDECAR_"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _option(name: str, default: Any, help_text: str, **kwargs: Any) -> Callable[[Any], Any]:
    env = ENV_PREFIX + name.lstrip("-").split("/")[0].lstrip("-").replace("-", "_").upper()
    return click.option(
        name,
        default=default,
        envvar=env,
        show_envvar=True,
        show_default=True,
        help=help_text,
        **kwargs,
    )


def serve_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every `serve` flag; `demo` shares them. Values are parsed into Config by build_config."""
    options = [
        _option("--listen", "0.0.0.0:8443", "TLS address to serve on; IPv6 as [::]:8443."),
        _option(
            "--upstream",
            "http://127.0.0.1:8080",
            "The app: http://HOST:PORT or unix:/path.sock; h2c://HOST:PORT or h2c+unix:/path.sock "
            "for an app speaking HTTP/2 (gRPC).",
        ),
        _option(
            "--admin-listen",
            "0.0.0.0:9901",
            "Plain-HTTP address for /livez /healthz /readyz /metrics.",
        ),
        _option(
            "--cert",
            (),
            "PEM certificate chain, leaf first; repeat with --key for SNI. None: self-signed.",
            type=click.Path(path_type=Path),
            multiple=True,
        ),
        _option(
            "--key",
            (),
            "PEM private key of the --cert before it.",
            type=click.Path(path_type=Path),
            multiple=True,
        ),
        _option(
            "--cert-dir",
            None,
            "Folder of NAME/tls.crt + NAME/tls.key pairs, chosen by SNI.",
            type=click.Path(path_type=Path),
        ),
        _option(
            "--key-password-file",
            None,
            "File holding the password of encrypted keys.",
            type=click.Path(path_type=Path),
        ),
        _option(
            "--pkcs12",
            None,
            "PKCS#12 bundle (certificate, key and chain) instead of --cert/--key.",
            type=click.Path(path_type=Path),
        ),
        _option(
            "--pkcs12-password-file",
            None,
            "File holding the --pkcs12 password.",
            type=click.Path(path_type=Path),
        ),
        _option(
            "--allow-expired/--no-allow-expired",
            False,
            "Start (with a warning) even if a certificate has expired.",
        ),
        _option(
            "--reload-interval",
            "5s",
            "How often certificate files are checked for changes (0: only on SIGHUP).",
        ),
        _option(
            "--tls-session-resumption/--no-tls-session-resumption",
            True,
            "Let clients resume TLS sessions (tickets), saving full handshakes.",
        ),
        _option(
            "--client-ca",
            None,
            "CA bundle that signs client certificates: turns on mutual TLS.",
            type=click.Path(path_type=Path),
        ),
        _option(
            "--client-auth",
            "require",
            "With --client-ca: require a client certificate, or make it optional; none without.",
            type=click.Choice(["none", "optional", "require"]),
        ),
        _option(
            "--allow-cn",
            (),
            "Admit client certificates with this subject CN (repeatable).",
            multiple=True,
        ),
        _option(
            "--allow-ou",
            (),
            "Admit client certificates with this subject OU (repeatable).",
            multiple=True,
        ),
        _option(
            "--allow-dns-san",
            (),
            "Admit client certificates with this DNS SAN (repeatable).",
            multiple=True,
        ),
        _option(
            "--allow-uri-san",
            (),
            "Admit this URI SAN, e.g. spiffe://td/ns/app; a trailing /* admits a prefix (repeatable).",
            multiple=True,
        ),
        _option(
            "--allow-all/--no-allow-all",
            False,
            "Admit any client certificate the --client-ca signed.",
        ),
        _option(
            "--client-cert-header/--no-client-cert-header",
            True,
            "Send the verified client identity to the app in X-Forwarded-Client-Cert.",
        ),
        _option(
            "--client-cert-header-pem/--no-client-cert-header-pem",
            False,
            "Include the URL-encoded client certificate (Cert=) in that header.",
        ),
        _option(
            "--tls-min-version",
            "1.2",
            "Oldest TLS version accepted.",
            type=click.Choice(["1.2", "1.3"]),
        ),
        _option(
            "--tls-groups",
            None,
            "Key exchange groups, colon-separated, most preferred first (OpenSSL's names, e.g. "
            "X25519MLKEM768:X25519:P-256). Default: OpenSSL's own, which from OpenSSL 3.5 "
            "starts with hybrid post-quantum X25519MLKEM768.",
        ),
        _option("--handshake-timeout", "10s", "Time a client has to finish the TLS handshake."),
        _option("--header-timeout", "15s", "Time a client has to send a whole request head."),
        _option(
            "--idle-timeout",
            "60s",
            "Keep-alive idle time, and the longest pause inside a request body.",
        ),
        _option(
            "--upstream-connect-timeout", "5s", "Time to connect to the app before answering 504."
        ),
        _option(
            "--upstream-timeout",
            "60s",
            "Time for the app's response head (and between its reads) before 504.",
        ),
        _option(
            "--upstream-idle-timeout",
            "30s",
            "How long an idle pooled connection to the app is kept.",
        ),
        _option(
            "--upstream-max-idle",
            128,
            "Most idle pooled connections to the app.",
            type=click.IntRange(0),
        ),
        _option(
            "--upstream-health-path",
            None,
            "Readiness also GETs this path on the app (2xx/3xx: ready), e.g. /healthz; "
            "default: readiness only checks that the app accepts connections.",
        ),
        _option("--drain-timeout", "30s", "On SIGTERM, the longest wait for in-flight requests."),
        _option(
            "--shutdown-delay",
            "0s",
            "On SIGTERM, serve on this long with /readyz 503 before draining.",
        ),
        _option(
            "--max-connections",
            10000,
            "Most concurrent client connections; more are closed at once.",
            type=click.IntRange(1),
        ),
        _option("--max-header-bytes", "16384", "Largest request head (beyond: 431)."),
        _option("--max-body-bytes", "unlimited", "Largest request body (beyond: 413)."),
        _option(
            "--trust-forwarded-headers/--no-trust-forwarded-headers",
            False,
            "Keep the client's X-Forwarded-* (only behind a trusted proxy).",
        ),
        _option(
            "--http",
            "auto",
            "HTTP/1.1 codec: httptools (llhttp, fast), h11 (strict, pure Python); auto: httptools "
            "when installed.",
            type=click.Choice(["auto", "httptools", "h11"]),
        ),
        _option(
            "--http2/--no-http2",
            True,
            "Offer HTTP/2 to clients (TLS ALPN h2); without it every client speaks HTTP/1.1.",
        ),
        _option(
            "--http2-codec",
            "auto",
            "HTTP/2 codec for clients: nghttp2 (libnghttp2, fast; built at install when a C "
            "compiler and libnghttp2's headers are there), h2 (strict, pure Python); auto: "
            "nghttp2 when built.",
            type=click.Choice(["auto", "nghttp2", "h2"]),
        ),
        _option(
            "--max-concurrent-streams",
            100,
            "Most HTTP/2 streams one client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).",
            type=click.IntRange(1),
        ),
        _option(
            "--upgrade",
            ("websocket",),
            "Upgrade protocol passed to the app (repeatable); any other Upgrade is removed. "
            "h2c never is.",
            multiple=True,
        ),
        _option(
            "--workers",
            "1",
            "Worker processes sharing the TLS port; auto: the container's CPU quota.",
        ),
        click.option("--worker-index", type=int, default=None, hidden=True),
        click.option("--ticket-keys-fd", type=int, default=None, hidden=True),
        _option("--log-format", "json", "Log line format.", type=click.Choice(["json", "text"])),
        _option("--log-level", "info", "debug, info, warning or error."),
        _option("--access-log/--no-access-log", True, "One line per request on stdout."),
        # PROXY protocol in: the client's address from a TCP load balancer in front
        _option(
            "--accept-proxy-protocol/--no-accept-proxy-protocol",
            False,
            "Read a PROXY protocol header (v1 or v2) before the TLS handshake; its client "
            "address is the client's. Needs --proxy-protocol-from.",
        ),
        _option(
            "--proxy-protocol-from",
            (),
            "Address or CIDR allowed to send a PROXY header (repeatable); connections from "
            "elsewhere are closed.",
            multiple=True,
        ),
        # PROXY protocol out: the app learns the client (and its TLS) from a header
        _option(
            "--upstream-proxy-protocol",
            "off",
            "Begin each app connection with a PROXY header: v1, or v2 with TLS fields (ALPN, SNI, "
            "TLS version, client CN and SPIFFE ID); app connections are then per client "
            "connection.",
            type=click.Choice(["off", "v1", "v2"]),
        ),
        # Client certificate revocation
        _option(
            "--client-crl",
            (),
            "CRL (PEM or DER) of a --client-ca CA; revoked client certificates fail the "
            "handshake (repeatable; reloaded like certificates).",
            type=click.Path(path_type=Path),
            multiple=True,
        ),
        _option(
            "--client-cert-revalidate",
            "off",
            "How often open connections' client certificates are checked again (expiry, a newly "
            "loaded CRL, the CA still in --client-ca); a failing one is closed after its request. "
            "off, or e.g. 1m.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_config(opts: dict[str, Any]) -> Config:
    """Turn raw flag values into a validated Config, or raise ConfigError naming the flag."""

    def file(name: str, option: str) -> Path | None:
        value = opts[name]
        return readable_file(value, option) if value else None

    return Config(
        listen=parse_address(opts["listen"], option="--listen"),
        upstream=parse_upstream(opts["upstream"]),
        admin_listen=parse_address(
            opts["admin_listen"], option="--admin-listen", example="0.0.0.0:9901"
        ),
        cert_files=tuple(readable_file(p, "--cert") for p in opts["cert"]),
        key_files=tuple(readable_file(p, "--key") for p in opts["key"]),
        cert_dir=readable_dir(opts["cert_dir"], "--cert-dir") if opts["cert_dir"] else None,
        key_password_file=file("key_password_file", "--key-password-file"),
        pkcs12_file=file("pkcs12", "--pkcs12"),
        pkcs12_password_file=file("pkcs12_password_file", "--pkcs12-password-file"),
        allow_expired=opts["allow_expired"],
        reload_interval=parse_duration(opts["reload_interval"], option="--reload-interval"),
        client_ca=file("client_ca", "--client-ca"),
        client_auth=opts["client_auth"],
        policy=AccessPolicy(
            allow_cn=tuple(opts["allow_cn"]),
            allow_ou=tuple(opts["allow_ou"]),
            allow_dns_san=tuple(opts["allow_dns_san"]),
            allow_uri_san=tuple(opts["allow_uri_san"]),
            allow_all=opts["allow_all"],
        ),
        client_cert_header=opts["client_cert_header"],
        client_cert_header_pem=opts["client_cert_header_pem"],
        tls_min_version=opts["tls_min_version"],
        tls_groups=check_groups(opts["tls_groups"]) if opts["tls_groups"] else None,
        session_resumption=opts["tls_session_resumption"],
        handshake_timeout=parse_duration(opts["handshake_timeout"], option="--handshake-timeout"),
        header_timeout=parse_duration(opts["header_timeout"], option="--header-timeout"),
        idle_timeout=parse_duration(opts["idle_timeout"], option="--idle-timeout"),
        upstream_connect_timeout=parse_duration(
            opts["upstream_connect_timeout"], option="--upstream-connect-timeout"
        ),
        upstream_timeout=parse_duration(opts["upstream_timeout"], option="--upstream-timeout"),
        upstream_idle_timeout=parse_duration(
            opts["upstream_idle_timeout"], option="--upstream-idle-timeout"
        ),
        upstream_max_idle=opts["upstream_max_idle"],
        upstream_health_path=opts["upstream_health_path"] or None,
        drain_timeout=parse_duration(opts["drain_timeout"], option="--drain-timeout"),
        shutdown_delay=parse_duration(opts["shutdown_delay"], option="--shutdown-delay"),
        max_connections=opts["max_connections"],
        max_header_bytes=parse_size(opts["max_header_bytes"], option="--max-header-bytes") or 0,
        max_body_bytes=parse_size(
            opts["max_body_bytes"], option="--max-body-bytes", allow_unlimited=True
        ),
        trust_forwarded_headers=opts["trust_forwarded_headers"],
        http=opts["http"],
        http2=opts["http2"],
        http2_codec=opts["http2_codec"],
        max_concurrent_streams=opts["max_concurrent_streams"],
        upgrades=tuple(u.lower() for u in opts["upgrade"]),
        log_format=opts["log_format"],
        log_level=parse_log_level(opts["log_level"]),
        access_log=opts["access_log"],
        workers=check_workers(opts["workers"]),
        worker_index=opts["worker_index"],
        ticket_keys=read_ticket_keys(opts["ticket_keys_fd"]),
        **_proxy_protocol_options(opts),
        client_crl_files=tuple(readable_file(p, "--client-crl") for p in opts["client_crl"]),
        client_cert_revalidate=0.0
        if opts["client_cert_revalidate"].strip().lower() in ("off", "0", "")
        else parse_duration(opts["client_cert_revalidate"], option="--client-cert-revalidate"),
    ).validate()


def _proxy_protocol_options(opts: dict[str, Any]) -> dict[str, Any]:
    try:
        allowed = proxy_protocol.networks(opts["proxy_protocol_from"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {
        "accept_proxy_protocol": opts["accept_proxy_protocol"],
        "proxy_protocol_from": allowed,
        "upstream_proxy_protocol": None
        if opts["upstream_proxy_protocol"] == "off"
        else opts["upstream_proxy_protocol"],
    }


def read_ticket_keys(fd: int | None) -> bytes | None:
    """A worker reads the session ticket keys its supervisor wrote into an inherited pipe.
    Unreadable: no keys (b""), which the TLS context warns about, as when OpenSSL refuses them."""
    if fd is None:
        return None
    try:
        with os.fdopen(fd, "rb") as pipe:
            return pipe.read(4096)
    except OSError:
        return b""


def run_async(coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _announce(config: Config, server: ProxyServer, bound: Bound) -> None:
    if server.tls.self_signed:
        log.warning(
            "NO CERTIFICATE GIVEN: serving a generated self-signed certificate for localhost; "
            "clients will not trust it. Use --cert and --key in production"
        )
    for level, message in key_exchange_notes(config.tls_groups):
        log.log(level, message)
    if config.http2 and config.http2_codec == "auto" and not http2.available("nghttp2"):
        log.info(f"HTTP/2 runs on h2 (pure Python): {http2.HOW_TO_BUILD}")
    log.info(
        "listening",
        extra={
            "listen": [str(a) for a in bound.listen],
            "admin": [str(a) for a in bound.admin],
            "upstream": str(config.upstream),
            "certificates": [c.subject for c in server.tls.served],
            "version": __version__,
            "http2_codec": http2.resolve(config.http2_codec) if config.http2 else "off",
            **({"worker": config.worker_index} if config.worker_index is not None else {}),
        },
    )


async def serve_proxy(config: Config, on_ready: Callable[[Bound], None] | None = None) -> None:
    server = ProxyServer(config)
    server.install_signals()

    def ready(bound: Bound) -> None:
        # What start-up built (modules, certificates, the registry) lives as long as the
        # process: keep it out of every later garbage collection, which would scan it all.
        gc.freeze()
        _announce(config, server, bound)
        if on_ready:
            on_ready(bound)

    await server.serve_until_stopped(ready)


class LazyGroup(click.Group):
    """Loads a subcommand's module only when it runs (click's documented pattern): `serve`
    does not pay for `certs`' cryptography in memory."""

    lazy = {"certs": ("proxy.commands.certs", "certs_group")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name]
            command = getattr(importlib.import_module(module), attr)
            assert isinstance(command, click.Command)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="tls-sidecar")
def cli() -> None:
    """tls-sidecar: terminate TLS in front of an app and forward plain HTTP/1.1 to it.

    Every option also reads an environment variable, TLS_SIDECAR_<OPTION>.
    """


@cli.command(context_settings=CONTEXT)
@serve_options
def serve(**opts: Any) -> None:
    """Serve TLS on --listen and forward to --upstream; admin endpoints on --admin-listen."""
    note_environment(click.get_current_context())
    config = build_config(opts)
    logs.configure(config.log_format, config.log_level)
    if config.workers > 1 and config.worker_index is None:
        # The workers are this same command, re-executed; the supervisor adds what differs.
        run_async(Supervisor(config, sys.argv[1:]).run(config.workers))
        return
    if config.worker_index is not None:
        die_with_parent()
    run_async(serve_proxy(config))


@cli.command("check", context_settings=CONTEXT)
@serve_options
def check_command(**opts: Any) -> None:
    """Check a configuration without serving: the same flags and variables as serve.

    Loads and matches every certificate and key, reports days to expiry, checks the client CA
    and rules and the listen addresses, tries the app once. One line per check; exit 0 (all
    good), 1 (warnings: expiry within 14 days, the app not up) or 2 (serve would not start)."""
    from proxy.commands.check import check, exit_code  # noqa: PLC0415

    logs.configure("text", "error")
    note_environment(click.get_current_context())
    found = check(lambda: build_config(opts))
    for finding in found:
        click.echo(replace(finding, detail=as_set(finding.detail)).line())
    sys.exit(exit_code(found))


@cli.command(context_settings=CONTEXT)
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
def demo(app_listen: str, listen: str, admin_listen: str, certs_dir: Path) -> None:
    """Run a demo app and the proxy in front of it, with a development certificate."""
    from proxy.commands.certs import ensure_dev_certificates  # noqa: PLC0415
    from proxy.commands.demo import start_demo_app  # noqa: PLC0415

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


@cli.command("inject", context_settings=CONTEXT)
@click.argument("files", nargs=-1, type=click.File("r"))
@click.option("--image", default=DEFAULT_IMAGE, show_default=True, help="The sidecar image.")
@click.option(
    "--secret",
    default=DEFAULT_SECRET,
    show_default=True,
    help="Secret with tls.crt and tls.key, mounted at /etc/tls.",
)
@click.option(
    "--native/--classic",
    default=True,
    show_default=True,
    help="Native sidecar (an init container with restartPolicy Always, Kubernetes 1.29+) or a regular container.",
)
@click.option(
    "--upstream-port",
    default=None,
    type=click.IntRange(1, 65535),
    help="Port the app listens on at 127.0.0.1. Default: the app container's single port, or "
    "the one named http (8080 when it declares none).",
)
@click.option(
    "--services/--no-services",
    default=True,
    show_default=True,
    help="Point Services of the input that target the app's port at the sidecar's https port.",
)
def inject_command(
    files: tuple[Any, ...],
    image: str,
    secret: str,
    native: bool,
    upstream_port: int | None,
    services: bool,
) -> None:
    """Add tls-sidecar to the workloads in Kubernetes YAML (FILES or stdin) and print the result."""
    options = InjectOptions(
        image=image,
        secret=secret,
        native=native,
        upstream_port=upstream_port,
        services=services,
    )
    sources: list[Any] = list(files) if files else [sys.stdin]
    notes: list[str] = []
    click.echo(inject("---\n".join(f.read() for f in sources), options, notes), nl=False)
    for note in notes:
        click.echo(f"tls-sidecar: note: {note}", err=True)


# The flags that took their value from a TLS_SIDECAR_* variable, by every name of the flag: a
# message about one names the variable the user set, not a flag they never typed.
_SET_BY_ENVIRONMENT: dict[str, str] = {}


def note_environment(ctx: click.Context) -> None:
    _SET_BY_ENVIRONMENT.clear()
    for param in ctx.command.params:
        if (
            param.name
            and isinstance(param.envvar, str)
            and ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
        ):
            for name in (*param.opts, *param.secondary_opts):
                _SET_BY_ENVIRONMENT[name] = param.envvar


def as_set(message: str) -> str:
    """A message that starts with a flag's name, with the variable's name instead when the
    value came from the environment: `TLS_SIDECAR_UPSTREAM: '127.0.0.1' has no port`."""
    match = re.match(r"--[a-z0-9][a-z0-9-]*", message)
    if match and match.group() in _SET_BY_ENVIRONMENT:
        return _SET_BY_ENVIRONMENT[match.group()] + message[match.end() :]
    return message


def _bad_parameter(e: click.BadParameter) -> str:
    """click's message names a flag and its variable together, whichever was used: name the
    one that was."""
    param, ctx = e.param, e.ctx
    if param is None or ctx is None or not param.name:
        return e.format_message()
    from_environment = ctx.get_parameter_source(param.name) is ParameterSource.ENVIRONMENT
    if from_environment and isinstance(param.envvar, str):
        where = param.envvar
    else:
        where = " / ".join(f"'{name}'" for name in param.opts)
    return f"Invalid value for {where}: {e.message}"


def _fail(message: str) -> NoReturn:
    click.echo(f"tls-sidecar: error: {message}", err=True)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input becomes one line on stderr and exit code 2, never a traceback."""
    logs.hold_warnings()  # the console script's start; python -m proxy holds them earlier
    try:
        code = cli.main(args=argv, prog_name="tls-sidecar", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
        message = _bad_parameter(e) if isinstance(e, click.BadParameter) else e.format_message()
        _fail(message + hint)
    except click.ClickException as e:
        _fail(e.format_message())
    except click.Abort:
        sys.exit(130)
    except ConfigError as e:
        _fail(as_set(str(e)))
    sys.exit(code if isinstance(code, int) else 0)
