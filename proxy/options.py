"""`serve`'s flags and TLS_SIDECAR_* variables, declared once for `serve`, `check` and `demo`,
and the messages that name what the user set (the flag, or the variable)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

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
        # The SPIFFE Workload API as the certificate source
        _option(
            "--spiffe-endpoint",
            None,
            "SPIFFE Workload API socket, e.g. unix:///run/spire/agent.sock: the X.509 SVID is the "
            "serving certificate, the trust bundle the client CA (with an --allow-* rule). "
            "Default: SPIFFE_ENDPOINT_SOCKET when no --cert is given.",
        ),
        _option(
            "--spiffe-timeout",
            "30s",
            "With --spiffe-endpoint: the longest wait for the first SVID at start-up.",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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
