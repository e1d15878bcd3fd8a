"""From flag values to a running proxy: `build_config` (shared by `serve`, `check`, `demo`),
and `serve_proxy`, which starts one ProxyServer and says where it listens."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from proxy import __version__, compiled, http2, proxy_protocol, spiffe_config
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
from proxy.tls.tickets import check_groups, key_exchange_notes
from proxy.workers import check_workers

log = logging.getLogger("tls_sidecar")


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
        **_spiffe_options(opts),
    ).validate()


def _spiffe_options(opts: dict[str, Any]) -> dict[str, Any]:
    other = bool(opts["cert"] or opts["key"] or opts["cert_dir"] or opts["pkcs12"])
    try:
        endpoint = spiffe_config.endpoint_from(opts["spiffe_endpoint"], other)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return {
        "spiffe_endpoint": endpoint,
        "spiffe_timeout": parse_duration(opts["spiffe_timeout"], option="--spiffe-timeout"),
    }


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
    core_compiled = compiled.in_use()
    if not core_compiled and not compiled.switched_off():
        log.info(f"the core runs as plain Python: {compiled.HOW_TO_BUILD}")
    if core_compiled and (edited := compiled.stale()):
        log.warning(
            f"{', '.join(edited)}: the source is newer than the compiled module, which is what "
            "runs; rebuild (make .venv/.installed, or pip install -e .) or set "
            "TLS_SIDECAR_COMPILED=0"
        )
    log.info(
        "listening",
        extra={
            "listen": [str(a) for a in bound.listen],
            "admin": [str(a) for a in bound.admin],
            "upstream": str(config.upstream),
            "certificates": [c.subject for c in server.tls.served],
            "version": __version__,
            "http2_codec": http2.resolve(config.http2_codec) if config.http2 else "off",
            **(
                {"h2c_codec": http2.client_codec_name(config.http2_codec)}
                if config.upstream.h2c
                else {}
            ),
            "compiled": core_compiled,
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
