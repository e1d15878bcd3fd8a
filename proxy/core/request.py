"""A request head as every codec hands it over, its framing checks, and what the app gets (pure).

Both HTTP/1.1 codecs (httptools and h11) call `read_head` on what their parser accepted, so the
checks a lenient parser would skip run once, for both; `upstream_request` then decides what to
send the app, or which answer the proxy gives itself.
"""

from __future__ import annotations

from typing import Final

from proxy.core import headers as hdr
from proxy.core.errors import KINDS
from proxy.core.headers import ClientInfo, Headers

# Upgrade protocols that are never tunnelled over TLS, whatever --upgrade says: h2c skips every
# per-request rule once the app switches (the "h2c smuggling" technique).
NEVER_UPGRADED: Final = frozenset({b"h2c"})


_VERSIONS: Final = frozenset({b"1.1", b"1.0", b"2"})
# The headers read_head looks at; every other one costs one set lookup.
_FRAMING: Final = frozenset(
    {b"content-length", b"transfer-encoding", b"host", b"connection", b"upgrade", b"expect", b"te"}
)


class BadRequest(Exception):
    """The request cannot be trusted or served. `reason` names its kind in `errors.KINDS`, which
    gives the HTTP status it is answered with (looked up here, on the error path only), the gRPC
    status and the HTTP/2 reset code, the same table for every protocol."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = KINDS[reason].status  # a reason outside the table is a bug: fail loudly


class RequestHead:
    """What a downstream codec parsed, already checked for framing by `read_head`.

    A plain class, not a dataclass: compiled, the `__init__` a dataclass generates stays
    interpreted, and one is built for every request."""

    __slots__ = (
        "chunked",
        "connection",
        "content_length",
        "expect_continue",
        "grpc",
        "has_body",
        "headers",
        "keep_alive",
        "method",
        "request_id",
        "size",
        "target",
        "trailers",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: bytes,  # b"1.1", b"1.0"; b"2" for HTTP/2 streams
        headers: Headers,  # lower-case names, in the client's order
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,  # the client did not ask to close after this request
        upgrade: bytes | None,  # the Upgrade header when Connection names it (HTTP/1.1 only)
        request_id: bytes | None = None,  # the client's X-Request-Id, unchecked
        connection: bool = False,  # a Connection header is present (it may name more to drop)
        size: int = 0,  # bytes of the head as received (method, target, headers)
        has_body: bool = False,  # chunked, or a Content-Length above 0
        expect_continue: bool = False,  # `Expect: 100-continue`: the client waits for 100
        grpc: bool = False,  # content-type application/grpc*: the proxy's errors speak gRPC
        trailers: bool = False,  # `TE: trailers` (HTTP/1.1): a chunked answer may carry them
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.request_id = request_id
        self.connection = connection
        self.size = size
        self.has_body = has_body
        self.expect_continue = expect_continue
        self.grpc = grpc
        self.trailers = trailers

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r}, {self.target!r}, {self.version!r})"


def read_head(
    method: bytes, target: bytes, version: bytes, headers: Headers, size: int = -1
) -> RequestHead:
    """One pass over the headers: framing, Host and keep-alive, the same for every codec.

    Refuses what parsers disagree on or let through (RFC 9112 §6.3): Content-Length together
    with Transfer-Encoding, repeated or non-numeric Content-Length, a transfer coding other than
    chunked, a missing or repeated Host on HTTP/1.1, and a chunked upgrade request (llhttp would
    take its body for the new protocol's bytes)."""
    if version not in _VERSIONS:
        raise BadRequest("version_not_supported", "only HTTP/1.0, HTTP/1.1 and HTTP/2")
    length: bytes | None = None
    te: bytes | None = None
    hosts = 0
    close = version == b"1.0"
    upgrade: bytes | None = None
    connection_upgrade = False
    connection = False
    expect_continue = False
    trailers = False
    request_id: bytes | None = None
    for name, value in headers:
        if name not in _FRAMING:
            if name == b"x-request-id" and request_id is None:
                request_id = value
            continue
        if name == b"content-length":
            if length is not None:
                raise BadRequest("bad_request", "more than one Content-Length")
            length = value
        elif name == b"transfer-encoding":
            if te is not None:
                raise BadRequest("bad_request", "more than one Transfer-Encoding")
            te = value
        elif name == b"host":
            hosts += 1
        elif name == b"connection":
            connection = True
            for raw in value.lower().split(b","):
                token = raw.strip()
                # An HTTP/1.0 connection closes after its answer even with `keep-alive`: h11
                # cannot keep one open, and both codecs must frame alike (docs/DESIGN.md).
                if token == b"close":
                    close = True
                elif token == b"upgrade":
                    connection_upgrade = True
        elif name == b"upgrade":
            upgrade = value
        elif name == b"expect":
            expect_continue = value.strip().lower() == b"100-continue"
        elif name == b"te":
            trailers = trailers or b"trailers" in (t.strip() for t in value.lower().split(b","))
    if te is not None:
        if version == b"1.0":
            # RFC 9112 §6.1: HTTP/1.0 has no transfer codings; such a request's framing is
            # faulty (a smuggling vector between an HTTP/1.0-minded parser and ours). nginx: 400.
            raise BadRequest("bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if te.strip().lower() != b"chunked":
            raise BadRequest("bad_request", "the only transfer coding accepted is chunked")
        if length is not None:
            raise BadRequest("bad_request", "both Content-Length and Transfer-Encoding")
    content_length: int | None = None
    if length is not None:
        if not length.isdigit() or len(length) > 18:
            raise BadRequest("bad_request", "Content-Length is not a number")
        content_length = int(length)
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        raise BadRequest("bad_request", "HTTP/1.1 needs exactly one Host header")
    if not connection_upgrade or version == b"1.0":
        upgrade = None  # RFC 9110 §7.8: Upgrade is HTTP/1.1's; an HTTP/1.0 request's is ignored
    elif upgrade is not None and te is not None:
        raise BadRequest("bad_request", "an upgrade request cannot have a chunked body")
    if size < 0:
        size = len(method) + len(target) + sum(len(n) + len(v) + 4 for n, v in headers)
    return RequestHead(
        method,
        target,
        version,
        headers,
        content_length,
        te is not None,
        not close,
        upgrade,
        request_id,
        connection,
        size,
        te is not None or bool(content_length),
        expect_continue and version == b"1.1",
        trailers=trailers and version == b"1.1",
    )


def upgrade_protocol(value: bytes) -> bytes:
    """`websocket` from `WebSocket`, `h2c` from `h2c, foo/2`: the first protocol's name."""
    return value.split(b",", 1)[0].split(b"/", 1)[0].strip().lower()


def allowed_upgrade(head: RequestHead, allowed: frozenset[bytes]) -> bool:
    """Whether the head's Upgrade goes to the app (`--upgrade`); any other is stripped."""
    if head.upgrade is None:
        return False
    protocol = upgrade_protocol(head.upgrade)
    return protocol in allowed and protocol not in NEVER_UPGRADED


class UpstreamRequest:
    """What the app is sent: origin-form target and rewritten headers."""

    __slots__ = ("headers", "target", "upgrade")

    def __init__(self, target: bytes, headers: Headers, upgrade: bool) -> None:
        self.target = target
        self.headers = headers
        self.upgrade = upgrade


def upstream_request(
    head: RequestHead,
    client: ClientInfo,
    *,
    trust_forwarded: bool,
    request_id: bytes,
    upstream_host: bytes,
    max_header_bytes: int,
    max_body_bytes: int | None,
    allowed_upgrades: frozenset[bytes],
    xfcc: bytes | None,
) -> UpstreamRequest | BadRequest:
    """The request for the app, or the answer the proxy gives itself instead (431, 405,
    400 for an unusable target, 413 for a declared body over the limit)."""
    names = head.headers
    target = head.target
    bad_target = ""
    if target[:1] != b"/":
        try:
            absolute = hdr.origin_form(target, names)
        except ValueError as e:
            absolute, target, bad_target = None, b"", str(e)
        if absolute is not None:
            target, names = absolute
        elif target == b"*" and head.method != b"OPTIONS":
            target, bad_target = b"", "asterisk-form is only for OPTIONS"
        elif target != b"*" and target:
            target, bad_target = b"", "authority-form is only for CONNECT"
    upgrade = head.upgrade is not None and allowed_upgrade(head, allowed_upgrades)
    out = hdr.forwarded_headers(
        names,
        client,
        trust_forwarded=trust_forwarded,
        request_id=request_id,
        upgrade=upgrade,
        connection=head.connection,
    )
    if head.expect_continue:
        # The proxy answers 100 Continue itself (see Exchange.start): the app is not asked.
        out = [(n, v) for n, v in out if n != b"expect"]
    if xfcc is not None:
        out.append((b"x-forwarded-client-cert", xfcc))
    if head.version == b"2":
        no_host = not names or names[0][0] != b"host"  # read_h2_head puts it first
    else:
        no_host = head.version == b"1.0" and not hdr.has_header(names, b"host")
    if no_host:
        out.insert(0, (b"host", upstream_host))
    # The parsers cap a head that arrives in pieces; one that arrived whole is measured here.
    if head.size + 12 > max_header_bytes:
        return BadRequest("header_too_large", f"request head over {max_header_bytes} bytes")
    if head.method == b"CONNECT":
        return BadRequest("method_not_allowed", "CONNECT is not supported")
    if not target:
        return BadRequest("bad_request", f"bad request target: {bad_target}")
    if (
        max_body_bytes is not None
        and head.content_length is not None
        and head.content_length > max_body_bytes
    ):
        return BadRequest("body_too_large", f"request body over {max_body_bytes} bytes")
    return UpstreamRequest(target, out, upgrade)
