"""The proxy's own answers: their body and headers, and the one way a request refused before it
had an exchange (a head that cannot be read, over either protocol) is answered, counted and
access-logged; over HTTP/2, the one way a stream reset instead of answered is counted and
access-logged."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from proxy.core import headers as hdr
from proxy.core.errors import kind
from proxy.core.headers import Headers
from proxy.core.request import BadRequest
from proxy.core.session import Session

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext


def local_body(status: int, message: str, request_id: bytes | None = None) -> bytes:
    """The body of an answer of the proxy's own. A 4xx says what was wrong with the request; a
    5xx says only that the app failed, with the request id to find the detail in the logs
    (addresses and errors of the app are the operator's, not the client's)."""
    if status >= 500:
        rid = request_id.decode("latin-1") if request_id else "-"
        return f"{status} {hdr.reason_phrase(status).decode()}: request id {rid}\n".encode()
    return f"{status} {message}\n".encode("utf-8", "replace")


def local_headers(request_id: bytes | None) -> Headers:
    out = [(b"content-type", b"text/plain; charset=utf-8")]
    if request_id is not None:
        out.append((b"x-request-id", request_id))
    return out


class Answers(Protocol):
    """A downstream that can answer for the proxy (an HTTP/1.1 connection, an HTTP/2 stream)."""

    def send_local(self, status: int, headers: Headers, body: bytes) -> None: ...


def refuse(
    ctx: ProxyContext, down: Answers, session: Session, error: BadRequest, protocol: bytes
) -> None:
    """A request refused before it had an exchange: the same answer, count and access line for
    HTTP/1.1 (`protocol` b"1.1") and HTTP/2 (b"2") as the exchange gives its own answers."""
    status = error.status
    metrics = ctx.metrics
    metrics.local.add(str(status), error.reason)
    body = local_body(status, str(error))
    down.send_local(status, local_headers(None), body)
    metrics.counts.request_done(b"OTHER", status, 0.0, protocol)
    ctx.access(
        session,
        None,
        status=status,
        bytes_in=0,
        bytes_out=len(body),
        duration=0.0,
        upstream_duration=None,
        request_id=b"-",
        local=error.reason,
        detail=str(error),
        protocol=protocol,
    )


def refuse_stream(ctx: ProxyContext, session: Session, reason: str, detail: str) -> int:
    """An HTTP/2 stream reset before it had an exchange (a malformed head, a stream refused):
    no answer, so no `local_responses_total` sample; counted as a reset with its reason, and
    access-logged as one (status 0, event `stream_reset`). Returns the code to reset it with."""
    ctx.metrics.resets.add(reason)
    ctx.access(
        session,
        None,
        status=0,
        bytes_in=0,
        bytes_out=0,
        duration=0.0,
        upstream_duration=None,
        request_id=b"-",
        local=reason,
        detail=detail,
        event="stream_reset",
        protocol=b"2",
    )
    return kind(reason).reset
