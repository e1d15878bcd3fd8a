"""`tls-sidecar check`: a dry run of a configuration, as `nginx -t` or `caddy validate`.

Everything `serve` would do before accepting a connection, without serving: the flags, every
certificate and key (loaded, matched, their days to expiry), the client CA and the rules, the
listen addresses, and one try of the app. One line per check; the exit code says the worst."""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import click

from proxy import log as logs
from proxy.config import Address, Config, ConfigError
from proxy.launch import build_config
from proxy.options import CONTEXT, as_set, note_environment, serve_options
from proxy.readiness import check_app
from proxy.tls.context import build_bundle

OK, WARN, FAIL = "ok", "warn", "fail"
EXIT = {OK: 0, WARN: 1, FAIL: 2}
EXPIRY_WARNING_DAYS = 14
SVID_FETCH_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Finding:
    level: str
    what: str
    detail: str

    def line(self) -> str:
        return f"{self.level:<4}  {self.what}: {self.detail}"


def check(build: Callable[[], Config]) -> list[Finding]:
    """Run every check; `build` makes the Config from the flags (and may raise ConfigError)."""
    try:
        config = build()
    except ConfigError as e:
        return [Finding(FAIL, "flags", str(e))]
    found = [Finding(OK, "flags", f"upstream {config.upstream}, listen {config.listen}")]
    found += _certificates(config) if config.spiffe_endpoint is None else [_svid(config)]
    if config.client_ca is not None:
        found.append(_client_ca(config))
    found.append(_bindable("listen", config.listen))
    if config.worker_index is None:
        found.append(_bindable("admin-listen", config.admin_listen))
    found.append(_upstream(config))
    return found


def exit_code(found: list[Finding]) -> int:
    return max(EXIT[f.level] for f in found)


def _client_ca(config: Config) -> Finding:
    from proxy.tls.certload import check_client_ca  # noqa: PLC0415

    assert config.client_ca is not None
    try:
        check_client_ca(config.client_ca)
    except ConfigError as e:
        return Finding(FAIL, "client CA", str(e))
    return Finding(OK, "client CA", f"{config.client_ca} ({config.client_auth}); {_rules(config)}")


def _certificates(config: Config) -> list[Finding]:
    try:
        bundle, warnings = build_bundle(config)
    except ConfigError as e:
        if config.client_ca is not None and str(e).startswith("--client-ca"):
            # The client CA's own line says it; the server certificates still get theirs.
            return _certificates(replace(config, client_ca=None))
        return [Finding(FAIL, "certificates", str(e))]
    found = [Finding(WARN, "certificates", w) for w in warnings]
    if not config.has_certificates:
        found.append(
            Finding(
                WARN,
                "certificates",
                "none given: serve would make a self-signed certificate clients do not trust",
            )
        )
        return found
    now = time.time()
    for served in bundle.served:
        days = (served.not_after - now) / 86400
        expires = time.strftime("%Y-%m-%d", time.gmtime(served.not_after))
        names = ", ".join(served.dns_names) or served.subject
        detail = f"{served.subject} for {names}, expires {expires} ({days:.0f} days)"
        if days < 0:
            level = WARN if config.allow_expired else FAIL
            detail = f"{served.subject} expired on {expires}" + (
                " (served anyway: --allow-expired)" if config.allow_expired else ""
            )
        elif days < EXPIRY_WARNING_DAYS:
            level = WARN
        else:
            level = OK
        found.append(Finding(level, f"certificate {served.name}", detail))
    return found


def _svid(config: Config) -> Finding:
    """--spiffe-endpoint: one SVID fetched and checked as `serve` would check it."""
    import grpc  # noqa: PLC0415

    from proxy.tls.spiffe import bundle_from  # noqa: PLC0415
    from proxy.tls.workload_api import describe, fetch_once  # noqa: PLC0415

    endpoint = config.spiffe_endpoint
    try:
        bundle, _ = bundle_from(config, fetch_once(endpoint or "", SVID_FETCH_SECONDS))
    except grpc.RpcError as e:
        return Finding(
            FAIL,
            "certificates",
            f"--spiffe-endpoint {endpoint}: {describe(e)}; check that the SPIRE agent runs, "
            "that its socket is mounted there, and that a registration entry matches",
        )
    except ConfigError as e:
        return Finding(FAIL, "certificates", str(e))
    served = bundle.served[0]
    minutes = (served.not_after - time.time()) / 60
    expires = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(served.not_after))
    return Finding(
        OK,
        f"certificate {served.name}",
        f"X.509 SVID from {endpoint}, expires {expires} ({minutes:.0f} minutes; the agent "
        "rotates it)",
    )


def _rules(config: Config) -> str:
    policy = config.policy
    if policy.allow_all:
        return "any certificate the CA signed is allowed"
    rules = [
        *(f"cn={v}" for v in policy.allow_cn),
        *(f"ou={v}" for v in policy.allow_ou),
        *(f"dns-san={v}" for v in policy.allow_dns_san),
        *(f"uri-san={v}" for v in policy.allow_uri_san),
    ]
    return "allowed: " + ", ".join(rules)


def _bindable(option: str, address: Address) -> Finding:
    if address.port == 0:
        return Finding(OK, option, f"{address} (a free port at start)")
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address.host, address.port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                why = "in use by another process"
            elif e.errno == errno.EACCES:
                why = "permission denied (a port below 1024 needs CAP_NET_BIND_SERVICE)"
            else:
                why = e.strerror or str(e)
            return Finding(FAIL, option, f"{address}: {why}")
    return Finding(OK, option, f"{address} can be bound")


def _upstream(config: Config) -> Finding:
    timeout = config.upstream_connect_timeout
    problem = asyncio.run(check_app(config, timeout)).problem
    if problem is None:
        how = f", GET {config.upstream_health_path} answered" if config.upstream_health_path else ""
        return Finding(OK, "upstream", f"{config.upstream} accepts connections{how}")
    # Not fatal: the app may start after the sidecar (it does in a native-sidecar pod).
    return Finding(WARN, "upstream", f"{problem} (readiness stays 503 until it does)")


@click.command("check", context_settings=CONTEXT)
@serve_options
def check_command(**opts: Any) -> None:
    """Check a configuration without serving: the same flags and variables as serve.

    Loads and matches every certificate and key, reports days to expiry, checks the client CA
    and rules and the listen addresses, tries the app once. One line per check; exit 0 (all
    good), 1 (warnings: expiry within 14 days, the app not up) or 2 (serve would not start)."""
    logs.configure("text", "error")
    note_environment(click.get_current_context())
    found = check(lambda: build_config(opts))
    for finding in found:
        click.echo(replace(finding, detail=as_set(finding.detail)).line())
    sys.exit(exit_code(found))
