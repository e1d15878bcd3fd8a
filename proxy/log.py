"""Operational logs (stderr) and the access log (stdout), as JSON lines or text."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _timestamp(seconds: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        + f".{int(seconds % 1 * 1000):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        line = f"{_timestamp(record.created)} {record.levelname.lower():7} {record.getMessage()}"
        if fields:
            line += " " + fields
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _HeldWarnings:
    """warnings.showwarning until `configure` knows the log format: a warning raised while
    the process starts (a library's import, a worker still loading) is kept, then logged in
    that format, instead of going to stderr as raw text first."""

    LIMIT = 100

    def __init__(self, original: Callable[..., None]) -> None:
        self.original = original
        self.held: list[tuple[Warning | str, type[Warning], str, int]] = []
        atexit.register(self.release)  # never configured (--help, certs ...): print them plainly

    def __call__(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: IO[str] | None = None,
        line: str | None = None,
    ) -> None:
        if len(self.held) < self.LIMIT:
            self.held.append((message, category, filename, lineno))

    def release(self) -> None:
        """Put the original back, then show what was held (through logging, once configured)."""
        if warnings.showwarning is self:
            warnings.showwarning = self.original
        held, self.held = self.held, []
        for message, category, filename, lineno in held:
            warnings.showwarning(message, category, filename, lineno)


def hold_warnings() -> None:
    """Keep warnings until `configure` (the first thing `python -m proxy` does)."""
    if not isinstance(warnings.showwarning, _HeldWarnings):
        warnings.showwarning = _HeldWarnings(warnings.showwarning)


def configure(log_format: str, level: str, stream: IO[str] | None = None) -> None:
    held = warnings.showwarning if isinstance(warnings.showwarning, _HeldWarnings) else None
    if held is not None:
        warnings.showwarning = held.original  # what captureWarnings saves and wraps
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger("tls_sidecar")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # Library warnings (DeprecationWarning, ResourceWarning, ...) become log lines in the same
    # format instead of raw text on stderr, which would break one-JSON-object-per-line.
    logging.captureWarnings(True)
    warnings_log = logging.getLogger("py.warnings")
    warnings_log.handlers[:] = [handler]
    warnings_log.propagate = False
    if held is not None:
        held.release()  # through logging now


def connection_facts(
    client: str,
    tls_version: str,
    cipher: str | None,
    sni: str | None,
    identity: str | None,
    denied: str | None,
) -> str:
    """The access line's fields that are the same for every request of a connection, as JSON
    members: encoded once per connection, not on every line."""
    facts: dict[str, object] = {"client": client, "tls": tls_version, "cipher": cipher, "sni": sni}
    if identity is not None or denied is not None:
        facts["identity"] = identity
        facts["denied"] = denied
    return json.dumps(facts)[1:-1]


@dataclass(slots=True)
class AccessRecord:
    """One answered request, as the access log writes it."""

    time: float
    client: str
    method: str
    path: str
    status: int
    bytes_in: int
    bytes_out: int
    duration: float
    upstream_duration: float | None
    tls_version: str
    request_id: str
    worker: int | None = None
    local: str | None = None  # why the proxy answered itself (a local_responses reason)
    detail: str | None = None  # what went wrong, for the operator (never sent to the client)
    protocol: str = "http/1.1"  # http/1.1, http/1.0 or h2
    grpc_status: str | None = None  # a gRPC request's outcome (the app's, or the proxy's own)
    host: str | None = None  # Host, or :authority
    user_agent: str | None = None
    sni: str | None = None  # the server name the client asked for in TLS
    cipher: str | None = None
    upstream_status: int | None = None  # what the app answered (None: it did not)
    identity: str | None = None  # mutual TLS: the client's SPIFFE id, else its subject
    denied: str | None = None  # mutual TLS: why the client certificate was refused
    trace_id: str | None = None  # from a W3C traceparent, passed to the app untouched
    event: str | None = None  # "websocket_end": the line of a WebSocket session that ended
    # the per-connection fields (client, tls, cipher, sni, identity), JSON-encoded once per
    # connection by `connection_facts`
    facts: str | None = None

    def as_json(self) -> str:
        extra: dict[str, object] = {} if self.worker is None else {"worker": self.worker}
        if self.local is not None:
            extra["local"] = self.local
            extra["detail"] = self.detail
        if self.grpc_status is not None:
            extra["grpc_status"] = self.grpc_status
        if self.trace_id is not None:
            extra["trace_id"] = self.trace_id
        if self.event is not None:
            extra["event"] = self.event
        line = json.dumps(
            {
                "time": _timestamp(self.time),
                "method": self.method,
                "path": self.path,
                "status": self.status,
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "duration_ms": round(self.duration * 1000, 3),
                "upstream_ms": None
                if self.upstream_duration is None
                else round(self.upstream_duration * 1000, 3),
                "upstream_status": self.upstream_status,
                "host": self.host,
                "user_agent": self.user_agent,
                "protocol": self.protocol,
                "request_id": self.request_id,
                **extra,
            }
        )
        facts = self.facts
        if facts is None:
            facts = connection_facts(
                self.client, self.tls_version, self.cipher, self.sni, self.identity, self.denied
            )
        return f"{line[:-1]}, {facts}}}"

    def as_text(self) -> str:
        upstream = "-" if self.upstream_duration is None else f"{self.upstream_duration * 1000:.1f}"
        return (
            f'{_timestamp(self.time)} {self.client} "{self.method} {self.path}" {self.status} '
            f"in={self.bytes_in} out={self.bytes_out} {self.duration * 1000:.1f}ms "
            f"upstream={upstream}ms {self.protocol} {self.tls_version} id={self.request_id}"
            f" host={self.host or '-'} sni={self.sni or '-'} ua={self.user_agent or '-'!r}"
            + ("" if self.grpc_status is None else f" grpc_status={self.grpc_status}")
            + ("" if self.identity is None else f" identity={self.identity}")
            + ("" if self.denied is None else f" denied={self.denied}")
            + ("" if self.trace_id is None else f" trace_id={self.trace_id}")
            + ("" if self.event is None else f" event={self.event}")
            + ("" if self.local is None else f" local={self.local} detail={self.detail!r}")
        )


class AccessLog:
    """Collects records during one loop iteration and writes them in one call afterwards."""

    def __init__(self, log_format: str, enabled: bool, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self._json = log_format == "json"
        self._stream = stream or sys.stdout
        self._pending: list[str] = []

    def write(self, record: AccessRecord) -> None:
        if not self.enabled:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self._pending.append(record.as_json() if self._json else record.as_text())

    def flush(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("\n".join(lines) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # stdout closed or full: losing access lines must never stop the proxy


class FailureLog:
    """At most one log line per failure reason every `every` seconds, saying how many were
    left out since: a scanner cannot flood the log, and nothing goes unseen."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, reason: str) -> int | None:
        """None when this one is left out; else how many were left out before it."""
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) < self.every:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return None
        if len(self._last) > 64:  # reasons are a closed set, but stay bounded anyway
            self._last.clear()
        self._last[reason] = now
        return self._suppressed.pop(reason, 0)
