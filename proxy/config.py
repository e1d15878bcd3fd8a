"""The one validated Config: every setting, its default, and the relations between settings
checked once (`Config.validate`). The values and parsers it is built from are in `parsing`."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.identity import AccessPolicy
from proxy.parsing import (
    Address,
    CertificateError,
    ConfigError,
    LogLevel,
    Upstream,
    bind_error,
    parse_address,
    parse_duration,
    parse_log_level,
    parse_size,
    parse_upstream,
    readable_dir,
    readable_file,
)
from proxy.proxy_protocol import IPNetwork
from proxy.spiffe_config import DEFAULT_TIMEOUT_SECONDS, problem

# Re-exported: the settings' one import for callers (`from proxy.config import ...`).
__all__ = [
    "NGHTTP2_HOW_TO_BUILD",
    "Address",
    "CertificateError",
    "ClientAuth",
    "Config",
    "ConfigError",
    "Http2Codec",
    "HttpCodec",
    "LogFormat",
    "LogLevel",
    "TlsVersion",
    "Upstream",
    "bind_error",
    "nghttp2_built",
    "parse_address",
    "parse_duration",
    "parse_log_level",
    "parse_size",
    "parse_upstream",
    "readable_dir",
    "readable_file",
]

TlsVersion = Literal["1.2", "1.3"]
ClientAuth = Literal["none", "optional", "require"]
LogFormat = Literal["json", "text"]
HttpCodec = Literal["auto", "httptools", "h11"]
Http2Codec = Literal["auto", "nghttp2", "h2"]
NGHTTP2_HOW_TO_BUILD = (
    "the nghttp2 HTTP/2 codec is not built; install a C compiler and libnghttp2's headers "
    "(Debian: apt-get install libnghttp2-dev gcc python3-dev) and reinstall tls-sidecar"
)


def nghttp2_built() -> bool:
    """Whether the nghttp2 codec's extension loads here: built at install, and libnghttp2
    there at run time. Imported by name: the settings layer knows no protocol module."""
    try:
        importlib.import_module("proxy.http2._nghttp2")
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Config:
    listen: Address = Address("0.0.0.0", 8443)
    upstream: Upstream = Upstream(address=Address("127.0.0.1", 8080))
    admin_listen: Address = Address("0.0.0.0", 9901)
    cert_files: tuple[Path, ...] = ()
    key_files: tuple[Path, ...] = ()
    cert_dir: Path | None = None
    key_password_file: Path | None = None
    pkcs12_file: Path | None = None
    pkcs12_password_file: Path | None = None
    allow_expired: bool = False
    reload_interval: float = 5.0
    tls_min_version: TlsVersion = "1.2"
    tls_groups: str | None = None  # None: OpenSSL's own list (X25519MLKEM768 first from 3.5)
    session_resumption: bool = True
    client_ca: Path | None = None
    client_auth: ClientAuth = "require"
    policy: AccessPolicy = field(default_factory=AccessPolicy)
    client_cert_header: bool = True
    client_cert_header_pem: bool = False
    handshake_timeout: float = 10.0
    header_timeout: float = 15.0
    idle_timeout: float = 60.0
    upstream_connect_timeout: float = 5.0
    upstream_timeout: float = 60.0
    upstream_idle_timeout: float = 30.0
    upstream_max_idle: int = 128
    upstream_health_path: str | None = None  # readiness GETs this on the app when set
    drain_timeout: float = 30.0
    shutdown_delay: float = 0.0
    max_connections: int = 10000
    max_header_bytes: int = 16384
    max_body_bytes: int | None = None
    trust_forwarded_headers: bool = False
    http: HttpCodec = "auto"
    http2: bool = True
    http2_codec: Http2Codec = "auto"
    max_concurrent_streams: int = 100
    upgrades: tuple[str, ...] = ("websocket",)
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"
    access_log: bool = True
    workers: int = 1
    worker_index: int | None = None  # set in the worker processes of --workers N
    # Session ticket keys the supervisor hands every worker (through a pipe, never argv or env).
    ticket_keys: bytes | None = field(default=None, repr=False)
    # PROXY protocol: a header before the TLS handshake, taken only from these networks
    accept_proxy_protocol: bool = False
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    # PROXY protocol out: each app connection begins with a header; pools per client connection
    upstream_proxy_protocol: Literal["v1", "v2"] | None = None
    # Client certificate revocation: CRLs checked in every handshake, reloaded with the certs
    client_crl_files: tuple[Path, ...] = ()
    # Re-validation of open connections' client certificates: every this many seconds (0: off)
    client_cert_revalidate: float = 0.0
    # The SPIFFE Workload API as the certificate source (proxy/spiffe_config.py)
    spiffe_endpoint: str | None = None
    spiffe_timeout: float = DEFAULT_TIMEOUT_SECONDS

    @property
    def has_certificates(self) -> bool:
        """Certificates were given (else `serve` makes a throwaway one for the run)."""
        return bool(self.cert_files or self.cert_dir or self.pkcs12_file or self.spiffe_endpoint)

    @property
    def mutual_tls(self) -> bool:
        """Client certificates are asked for: --client-ca, or the SPIFFE trust bundle with a rule."""
        return self.client_ca is not None or (
            self.spiffe_endpoint is not None and self.policy.has_rules
        )

    def validate(self) -> Config:
        """Check the relations between settings; return self so it chains."""
        if len(self.cert_files) != len(self.key_files):
            if not self.key_files or not self.cert_files:
                given, missing = ("--cert", "--key") if self.cert_files else ("--key", "--cert")
                raise ConfigError(f"{given} was given without {missing}; give both, or neither")
            raise ConfigError(
                f"{len(self.cert_files)} --cert but {len(self.key_files)} --key; "
                "give one --key after each --cert"
            )
        if self.pkcs12_password_file and not self.pkcs12_file:
            raise ConfigError("--pkcs12-password-file needs --pkcs12")
        if self.client_ca is not None and not self.policy.has_rules:
            raise ConfigError(
                "--client-ca needs a rule for who may pass: --allow-all (any certificate the CA "
                "signed), or --allow-cn / --allow-ou / --allow-dns-san / --allow-uri-san"
            )
        spiffe = problem(
            endpoint=self.spiffe_endpoint,
            timeout=self.spiffe_timeout,
            other_source=bool(self.cert_files or self.cert_dir or self.pkcs12_file),
            client_ca=self.client_ca is not None,
            client_crl=bool(self.client_crl_files),
            no_client_auth_with_rules=self.client_auth == "none" and self.policy.has_rules,
        )
        if spiffe is not None:
            raise ConfigError(spiffe)
        if not self.mutual_tls and self.policy.has_rules:
            raise ConfigError(
                "--allow-* rules need --client-ca, the CA that signs client certificates"
            )
        if self.client_ca is not None and self.client_auth == "none":
            raise ConfigError("--client-auth none contradicts --client-ca; use optional or require")
        if self.reload_interval < 0:
            raise ConfigError("--reload-interval must be 0 (off) or more, e.g. 5s")
        if self.listen.port != 0 and self.listen == self.admin_listen:
            raise ConfigError(
                f"--admin-listen {self.admin_listen} is the same as --listen; "
                "the admin port must differ from the TLS port"
            )
        if (
            self.listen.port != 0
            and self.listen.port == self.admin_listen.port
            and (_wildcard(self.listen.host) or _wildcard(self.admin_listen.host))
        ):
            raise ConfigError(
                f"--admin-listen {self.admin_listen} overlaps --listen {self.listen}; "
                "use another admin port"
            )
        for name, value in (
            ("--handshake-timeout", self.handshake_timeout),
            ("--header-timeout", self.header_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--upstream-connect-timeout", self.upstream_connect_timeout),
            ("--upstream-timeout", self.upstream_timeout),
            ("--upstream-idle-timeout", self.upstream_idle_timeout),
        ):
            if value <= 0:
                raise ConfigError(f"{name} must be greater than zero, e.g. 10s")
        if self.max_connections < 1:
            raise ConfigError("--max-connections must be at least 1")
        if self.upstream_health_path is not None and (
            not self.upstream_health_path.startswith("/") or " " in self.upstream_health_path
        ):
            raise ConfigError(
                f"--upstream-health-path {self.upstream_health_path!r} must be a path, e.g. /healthz"
            )
        if self.max_concurrent_streams < 1:
            raise ConfigError("--max-concurrent-streams must be at least 1")
        if self.max_header_bytes < 1024:
            raise ConfigError("--max-header-bytes must be at least 1KiB (1024)")
        if self.http == "httptools" and importlib.util.find_spec("httptools") is None:
            raise ConfigError(
                "--http httptools: the httptools package is not installed; "
                "pip install httptools, or use --http h11"
            )
        # the codec serves both sides: clients' HTTP/2 and an h2c app (even with --no-http2)
        uses_http2 = self.http2 or self.upstream.h2c
        if uses_http2 and self.http2_codec == "nghttp2" and not nghttp2_built():
            raise ConfigError(
                f"--http2-codec nghttp2: {NGHTTP2_HOW_TO_BUILD}, or use --http2-codec h2"
            )
        for protocol in self.upgrades:
            if protocol.lower() == "h2c":
                raise ConfigError(
                    "--upgrade h2c: h2c is never upgraded over TLS (it would skip every "
                    "per-request rule); clients use HTTP/2 through ALPN instead"
                )
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", protocol):
                raise ConfigError(
                    f"--upgrade {protocol!r} is not a protocol name; use e.g. --upgrade websocket"
                )
        self._validate_proxy_protocol()
        if self.client_crl_files and self.client_ca is None:
            raise ConfigError("--client-crl needs --client-ca, the CA whose revocations it lists")
        if self.client_cert_revalidate < 0:
            raise ConfigError("--client-cert-revalidate must be off or a duration, e.g. 1m")
        if self.client_cert_revalidate and not self.mutual_tls:
            raise ConfigError(
                "--client-cert-revalidate needs --client-ca: without mutual TLS there is no "
                "client certificate to check again"
            )
        return self

    def _validate_proxy_protocol(self) -> None:
        if self.accept_proxy_protocol and not self.proxy_protocol_from:
            raise ConfigError(
                "--accept-proxy-protocol needs --proxy-protocol-from CIDR (the load balancers' "
                "addresses, e.g. 10.0.0.0/8): a PROXY header is never taken from anyone"
            )
        if self.proxy_protocol_from and not self.accept_proxy_protocol:
            raise ConfigError(
                "--proxy-protocol-from is given without --accept-proxy-protocol; add it, or "
                "drop --proxy-protocol-from"
            )


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")
