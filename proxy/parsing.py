"""The values a setting is read into (`Address`, `Upstream`), the pure parsers for durations,
sizes, addresses and upstreams, the file checks, and `ConfigError`, which they all raise with one
line naming the setting and the fix. `config.Config` is built from these."""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

LogLevel = Literal["debug", "info", "warning", "error"]


class ConfigError(Exception):
    """A setting a user gave is wrong; the message names it and says how to fix it."""


class CertificateError(ConfigError):
    """Certificate material is unusable; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where the app listens: a TCP address, or a unix socket path."""

    address: Address | None = None
    unix_path: str | None = None
    h2c: bool = False  # HTTP/2 without TLS (prior knowledge), as gRPC servers speak it

    def __str__(self) -> str:
        if self.unix_path:
            return f"{'h2c+' if self.h2c else ''}unix:{self.unix_path}"
        return f"{'h2c' if self.h2c else 'http'}://{self.address}"

    @property
    def authority(self) -> str:
        """Host (HTTP/1.1) or :authority (h2c) for requests that bring none of their own."""
        return str(self.address) if self.address else "localhost"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str, *, option: str = "duration") -> float:
    """'10s', '500ms', '1.5m', '2h' or a bare number of seconds -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise ConfigError(f"{option}: {text!r} is not a duration; use e.g. 10s, 500ms, 2m")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


_SIZE = re.compile(r"^\s*(\d+)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str, *, option: str = "size", allow_unlimited: bool = False) -> int | None:
    """'16384', '16KiB', '10MiB', '1GB' -> bytes; 'unlimited' / '0' -> None when allowed."""
    if allow_unlimited and text.strip().lower() in ("unlimited", "none", "0", ""):
        return None
    match = _SIZE.match(text)
    if not match:
        hint = ", or unlimited" if allow_unlimited else ""
        raise ConfigError(f"{option}: {text!r} is not a size; use e.g. 16384, 16KiB, 10MiB{hint}")
    unit = match.group(2).lower() if match.group(2) else None
    return int(match.group(1)) * _SIZE_UNITS[unit]


def parse_address(text: str, *, option: str = "address", example: str = "0.0.0.0:8443") -> Address:
    """'0.0.0.0:8443', '[::]:8443' (IPv4 and IPv6), ':8443', 'localhost:8443' -> Address;
    `example` is what a message suggests (a listen address, or the app's for --upstream)."""
    text = text.strip()
    host: str
    if "," in text:
        raise ConfigError(
            f"{option}: {text!r} is a list; give one address: [::]:PORT listens on IPv4 and "
            "IPv6 alike"
        )
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ConfigError(f"{option}: {text!r} is not HOST:PORT; write IPv6 as [::1]:8443")
        host, port_text = text[1:end], text[end + 2 :]
        _check_ip(host, option, text)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep and text.isdigit():
            raise ConfigError(
                f"{option}: {text!r} has no host; use HOST:PORT, e.g. {_example(example, port=text)}"
            )
        if not sep:
            raise ConfigError(
                f"{option}: {text!r} has no port; use HOST:PORT, e.g. {_example(example, host=text)}"
            )
        if ":" in host:
            raise ConfigError(f"{option}: {text!r} looks like IPv6; write it as [{host}]:PORT")
        host = host or "0.0.0.0"
        if not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
            raise ConfigError(f"{option}: {host!r} in {text!r} is not a host name or IP address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{option}: port {port_text!r} in {text!r} must be a number 0-65535")
    return Address(host, int(port_text))


def _example(example: str, *, host: str | None = None, port: str | None = None) -> str:
    """`example` (SCHEME://HOST:PORT or HOST:PORT) with the host or the port the user gave."""
    scheme, sep, rest = example.rpartition("://")
    default_host, _, default_port = rest.rpartition(":")
    return f"{scheme}{sep}{host or default_host}:{port or default_port}"


def _check_ip(host: str, option: str, text: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ConfigError(f"{option}: {host!r} in {text!r} is not an IPv6 address") from None


def parse_upstream(text: str, *, option: str = "--upstream") -> Upstream:
    """'http://127.0.0.1:8080', '127.0.0.1:8080', 'unix:/run/app.sock' -> Upstream; the same
    with h2c:// and h2c+unix: (Caddy's spelling) for an app that speaks HTTP/2 (gRPC)."""
    text = text.strip()
    h2c = text.startswith("h2c+unix:")
    if h2c:
        text = text[len("h2c+") :]
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise ConfigError(f"{option}: {text!r} needs an absolute path, e.g. unix:/run/app.sock")
        return Upstream(unix_path=path, h2c=h2c)
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme not in ("http", "h2c"):
            raise ConfigError(
                f"{option}: scheme {scheme!r} is not supported; the app is reached over "
                "plain http://, h2c:// (HTTP/2, e.g. gRPC), unix: or h2c+unix:"
            )
        h2c = scheme == "h2c"
        text = rest
    text = text.rstrip("/")
    if "/" in text:
        raise ConfigError(f"{option}: {text!r} has a path; give only http://HOST:PORT")
    # A bare HOST:PORT is http://HOST:PORT (as ghostunnel's --target); the listening line
    # shows the scheme it was read as.
    example = f"{'h2c' if h2c else 'http'}://127.0.0.1:8080"
    address = parse_address(text, option=option, example=example)
    if address.port == 0:
        raise ConfigError(
            f"{option}: port 0 in {text!r} is no port an app listens on; give the app's port, "
            f"e.g. {example}"
        )
    return Upstream(address=address, h2c=h2c)


def parse_log_level(text: str) -> LogLevel:
    value = text.lower()
    if value not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"--log-level: {text!r} is not one of debug, info, warning, error")
    return value  # type: ignore[return-value]


def readable_file(path: Path, option: str) -> Path:
    """Fail early, with the path and the fix, when a file cannot be read."""
    if not path.exists():
        raise ConfigError(f"{option}: {path} does not exist; check the path")
    if path.is_dir():
        raise ConfigError(f"{option}: {path} is a directory; give the file inside it")
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{option}: {path} cannot be read ({e.strerror}); check permissions"
        ) from None
    return path


def readable_dir(path: Path, option: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{option}: {path} is not a directory; check the path")
    return path


def bind_error(option: str, address: Address, error: OSError) -> ConfigError:
    if error.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{option} {address}: address already in use; stop the other process or pick "
            "another port"
        )
    if error.errno == errno.EACCES:
        return ConfigError(
            f"{option} {address}: permission denied; use a port above 1023 or grant "
            "CAP_NET_BIND_SERVICE"
        )
    if error.errno == errno.EADDRNOTAVAIL or isinstance(error, socket.gaierror):
        return ConfigError(f"{option} {address}: no such local address; check the host part")
    return ConfigError(f"{option} {address}: cannot listen ({error.strerror or error})")
