"""Request and response header rewriting: hop-by-hop removal and X-Forwarded-* (pure)."""

from __future__ import annotations

import http
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

Headers = list[tuple[bytes, bytes]]
HeaderSeq = Sequence[tuple[bytes, bytes]]

# `name.translate(LOWER)` is `name.lower()`; compiled, translate is a direct C call (and hands
# back the same object when nothing changes) where lower() is a method looked up by name.
LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")

# The one set of connection-specific fields: RFC 9113 §8.2.2's, which make an HTTP/2 message
# malformed (`te` is allowed there as "trailers" only, so it is not among them).
CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# RFC 9110 §7.6.1 hop-by-hop fields, plus the legacy ones proxies have always dropped.
HOP_BY_HOP: Final = CONNECTION_SPECIFIC | {
    b"te",
    b"trailer",
    b"proxy-authenticate",
    b"proxy-authorization",
}

# A client naming these in `Connection` must not make us drop them.
_NEVER_DROPPED: Final = frozenset({b"host", b"content-length"})
# Connection tokens in a response that name nothing to drop (`keep-alive` is hop-by-hop anyway).
_RESPONSE_KEPT: Final = frozenset({b"", b"keep-alive", b"close", b"content-length"})

# Set by us from the connection; a client's values are only kept with trust_forwarded.
_FORWARDED: Final = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
    }
)

# Only the sidecar may set the client-certificate header; a client's copy is always dropped.
_ALWAYS_STRIPPED: Final = frozenset({b"x-forwarded-client-cert"})

_REASONS: Final = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status code (empty for unknown codes)."""
    return _REASONS.get(status, b"")


# Every request header forwarded_headers does something with other than pass it on.
_REQUEST_SPECIAL: Final = (
    HOP_BY_HOP | _FORWARDED | _ALWAYS_STRIPPED | {b"x-request-id", b"host", b"content-length"}
)

_REQUEST_ID: Final = re.compile(rb"^[A-Za-z0-9._:+/=\-]{1,200}$")


def connection_tokens(headers: HeaderSeq) -> set[bytes]:
    """The lower-cased, comma-separated tokens of every Connection header."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def _has_connection(headers: HeaderSeq) -> bool:
    return any(name == b"connection" for name, _ in headers)


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What the proxy knows about the downstream connection."""

    address: str
    local_port: int
    address_bytes: bytes = field(init=False, repr=False, compare=False)
    port_bytes: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Encoded once per connection, not per request.
        object.__setattr__(self, "address_bytes", self.address.encode("ascii"))
        object.__setattr__(self, "port_bytes", str(self.local_port).encode("ascii"))


def forwarded_headers(
    headers: HeaderSeq,
    client: ClientInfo,
    *,
    trust_forwarded: bool,
    request_id: bytes,
    upgrade: bool = False,
    connection: bool = True,
) -> Headers:
    """Return request headers for the upstream: hop-by-hop removed, X-Forwarded-* set.

    With trust_forwarded the client's X-Forwarded-* are kept (the client address is appended
    to X-Forwarded-For); otherwise they and `Forwarded` are replaced by what this hop saw.
    With upgrade (an allowed protocol upgrade) Upgrade is kept and Connection says upgrade;
    otherwise Upgrade goes with the other hop-by-hop fields. `connection` False promises that
    no Connection header is present (the caller's parser saw none).
    """
    named = (
        connection_tokens(headers) - _NEVER_DROPPED
        if connection and _has_connection(headers)
        else ()
    )
    out: Headers = []
    host = b""
    prior_for: list[bytes] = []
    prior: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _REQUEST_SPECIAL:  # one set lookup for the common, untouched header
            if name == b"host":
                host = value
            elif name in _FORWARDED:
                if trust_forwarded:
                    if name == b"x-forwarded-for":
                        prior_for.append(value)
                    else:
                        prior.setdefault(name, value)
                        if name == b"forwarded":
                            out.append((name, value))
                continue
            elif upgrade and name == b"upgrade":
                out.append((name, value))
                continue
            elif name != b"content-length" or name in named:
                continue  # hop-by-hop, always stripped, or x-request-id (set below)
        elif name in named:
            continue
        out.append((name, value))
    xff = b", ".join([*prior_for, client.address_bytes]) if prior_for else client.address_bytes
    out.append((b"x-forwarded-for", xff))
    if prior:
        out.append((b"x-forwarded-proto", prior.get(b"x-forwarded-proto", b"https")))
        if host or b"x-forwarded-host" in prior:
            out.append((b"x-forwarded-host", prior.get(b"x-forwarded-host", host)))
        out.append((b"x-forwarded-port", prior.get(b"x-forwarded-port", client.port_bytes)))
    else:
        out.append((b"x-forwarded-proto", b"https"))
        if host:
            out.append((b"x-forwarded-host", host))
        out.append((b"x-forwarded-port", client.port_bytes))
    out.append((b"x-request-id", request_id))
    if upgrade:
        out.append((b"connection", b"upgrade"))
    return out


class RequestIds:
    """New request ids: a random per-process prefix and a counter. Unique, not secret, and
    without a system call per request (uuid4 was 4% of the hot path)."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex().encode("ascii")
        self._count = 0

    def __call__(self) -> bytes:
        count = self._count
        self._count = count + 1
        return self._prefix + b"%016x" % count


def valid_request_id(value: bytes) -> bool:
    """A client's X-Request-Id is kept when it is a sane token."""
    return _REQUEST_ID.match(value) is not None


def response_headers(headers: HeaderSeq, *, switching_protocols: bool = False) -> Headers:
    """Return upstream response headers for the client: hop-by-hop removed.

    Framing (Content-Length / chunked) is redone by our HTTP layer, so Transfer-Encoding goes;
    a 101 keeps Upgrade and says Connection: upgrade.
    """
    out: Headers = []
    named: set[bytes] | None = None
    chunked = False
    for name, value in headers:
        if name in HOP_BY_HOP:
            if name == b"connection" and value.translate(LOWER) not in _RESPONSE_KEPT:
                tokens = {t.strip().lower() for t in value.split(b",")} - _RESPONSE_KEPT
                named = tokens if named is None else named | tokens
            elif name == b"transfer-encoding":
                chunked = True
            continue
        out.append((name, value))
    if named:  # fields the app's Connection header names are hop-by-hop too
        out = [(n, v) for n, v in out if n not in named]
    if chunked:
        # The app's body is chunked: a Content-Length beside it is wrong (RFC 9112 §6.3).
        out = [(n, v) for n, v in out if n != b"content-length"]
    if switching_protocols:
        out.extend((n, v) for n, v in headers if n == b"upgrade")
        out.append((b"connection", b"upgrade"))
    return out


def get_header(headers: HeaderSeq, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def trailer_fields(headers: HeaderSeq) -> Headers:
    """Trailers for the client: no pseudo-headers, nothing hop-by-hop, no framing."""
    return [
        (n, v)
        for n, v in headers
        if n[:1] != b":" and n not in HOP_BY_HOP and n != b"content-length"
    ]


_TRACEPARENT: Final = re.compile(rb"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


def trace_id(traceparent: bytes) -> str | None:
    """The trace id of a W3C traceparent (`00-<trace id>-<parent id>-<flags>`), if valid."""
    match = _TRACEPARENT.match(traceparent.strip())
    if match is None or match.group(1) == b"0" * 32:
        return None
    return match.group(1).decode()


def has_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bool:
    return any(n == name for n, _ in headers)


def origin_form(target: bytes, headers: Headers) -> tuple[bytes, Headers] | None:
    """An absolute-form target (`http://host/path`) as origin-form plus the Host it names.

    RFC 9112 §3.2.2: the target's authority wins over any Host header. None when the target is
    not absolute-form; ValueError when it is absolute but unusable.
    """
    lowered = target[:8].lower()
    if not (lowered.startswith(b"http://") or lowered.startswith(b"https://")):
        return None
    rest = target.split(b"://", 1)[1]
    authority, slash, path = rest.partition(b"/")
    authority = authority.rsplit(b"@", 1)[-1]  # userinfo is never forwarded
    if not authority or b"?" in authority:
        raise ValueError("absolute-form target without a host")
    new_target = b"/" + path if slash else b"/"
    if not slash and b"?" in rest:
        raise ValueError("absolute-form target with a query but no path")
    replaced = [(b"host", authority)] + [(n, v) for n, v in headers if n != b"host"]
    return new_target, replaced
