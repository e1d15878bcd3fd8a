"""What one exchange is (its state, in slots) and how it ends: the timeouts of the app's phase
and of the request body, the proxy's own answer (for gRPC, in gRPC's terms), the cut of a response
under way, a client gone, and the one record of it all: metrics and the access line.

`exchange.Exchange` adds the request's way to the app and the response's way back."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from proxy.core import grpc
from proxy.core.answers import local_body, local_headers
from proxy.core.client_side import Downstream
from proxy.core.errors import kind
from proxy.core.headers import Headers
from proxy.core.links import Pool, UpstreamLink
from proxy.core.request import RequestHead, UpstreamRequest
from proxy.core.session import Session
from proxy.metrics.counts import DataCounts

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext

log: Final = logging.getLogger("tls_sidecar.http")


class ExchangeEnds:
    """An exchange's state and its ends (the base of `exchange.Exchange`)."""

    __slots__ = (
        "_pending",
        "_unread",
        "bytes_in",
        "bytes_out",
        "connect_task",
        "counts",
        "ctx",
        "down",
        "finished",
        "grpc_status",
        "head",
        "local_reason",
        "pool",
        "request",
        "request_complete",
        "request_id",
        "request_trailers",
        "reset_code",
        "response_complete",
        "response_started",
        "retried",
        "sent_at",
        "session",
        "started",
        "status",
        "upstream",
        "upstream_duration",
        "upstream_status",
    )

    ctx: ProxyContext
    counts: DataCounts
    down: Downstream
    session: Session
    pool: Pool
    head: RequestHead
    started: float
    request_id: bytes
    request: UpstreamRequest | None
    upstream: UpstreamLink | None
    connect_task: asyncio.Task[None] | None
    request_complete: bool
    response_started: bool
    response_complete: bool
    finished: bool
    retried: bool
    status: int
    bytes_in: int
    bytes_out: int
    sent_at: float
    upstream_duration: float | None
    upstream_status: int | None  # what the app answered, if it did
    local_reason: tuple[str, str] | None  # (reason, detail) of our own answer
    request_trailers: Headers | None  # the client's, sent on with the end
    reset_code: int | None  # how the app's HTTP/2 stream was reset
    grpc_status: bytes | None
    _unread: int  # request bytes the app had not read when last asked
    _pending: list[bytes] | None  # body that arrived while connecting

    # --- ends -----------------------------------------------------------------------------------
    def app_still_reading(self) -> bool:
        """--upstream-timeout counts from the end of the request: from when the app has it,
        not from when the proxy read its last byte while megabytes of it still waited in
        buffers. True while the app has request bytes unread and took some since last asked;
        an app that takes nothing for a whole timeout gets its 504."""
        upstream = self.upstream
        if upstream is None or self.response_started or not self.request_complete:
            return False
        unread = upstream.unread_request_bytes()
        progress = 0 < unread < self._unread
        self._unread = unread
        return progress

    def timed_out(self) -> bool:
        """The upstream phase ran out: 504 when nothing was answered yet; a gRPC response under
        way ends with DEADLINE_EXCEEDED."""
        if self.finished:
            return False
        if self.response_started:
            if not self.head.grpc:
                return False
            self._cut("upstream_timeout", "the app stalled mid-response")
            return True
        self.local(504, "upstream_timeout", "the app did not answer in time")
        return True

    def body_timed_out(self) -> bool:
        """The request body stalled past --idle-timeout: 408 when nothing was answered yet."""
        if self.response_started or self.finished:
            return False
        self.local(408, "request_timeout", "request body not received in time")
        return True

    def local(self, status: int, reason: str, message: str) -> None:
        """Answer the client ourselves instead of the app (for gRPC, in gRPC's terms)."""
        self.ctx.metrics.local.add(str(status), reason)
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()
        self.status = status
        self.local_reason = (reason, message)
        if status >= 500:
            log.warning(
                "answered for the app",
                extra={
                    "status": status,
                    "reason": reason,
                    "detail": message,
                    "request_id": self.request_id.decode("latin-1"),
                    "client": self.session.client.address,
                },
            )
        if self.head.grpc:
            code = kind(reason).grpc
            self.grpc_status = grpc.STATUS_BYTES[code]
            text = local_body(status, message, self.request_id).decode().strip()
            self.down.send_local(200, grpc.trailers_only(code, text, self.request_id), b"")
            self._finish(200)
            return
        body = local_body(status, message, self.request_id)
        self.bytes_out = len(body)  # the access log's bytes_out: the body the client got
        self.down.send_local(status, local_headers(self.request_id), body)
        self._finish(status)

    def downstream_lost(self) -> None:
        """The client went away before the exchange ended."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()
        if self.connect_task is not None:
            self.connect_task.cancel()
        self._finish(self.status if self.response_started else 499)

    def _cut(self, reason: str, message: str) -> None:
        """A response under way cannot be completed. A gRPC call ends with trailers carrying
        `code` (UNAVAILABLE for an app that failed, DEADLINE_EXCEEDED for one that stalled, as
        Envoy answers), which a client reads as the call's status; a reset would say INTERNAL
        or CANCELLED. Anything else is cut (truncated: closing is the only honest signal left),
        and so is a stream the app reset itself: its code is relayed."""
        if not self.head.grpc or self.reset_code is not None:
            self.down.abort_all()
            self._finish(self.status)
            return
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.abort()
        code = kind(reason).grpc
        self.grpc_status = grpc.STATUS_BYTES[code]
        self.local_reason = (reason, message)
        self._finish(self.status)
        self.down.send_trailers(grpc.status_trailers(code, message))

    def _finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        ctx = self.ctx
        duration = time.perf_counter() - self.started
        head = self.head
        counts = self.counts
        counts.in_flight -= 1
        counts.request_done(head.method, status, duration, head.version)
        if self.grpc_status is not None:
            ctx.metrics.grpc_done(self.grpc_status)
        if ctx.access_log.enabled:
            local = self.local_reason
            ctx.access(
                self.session,
                head,
                status=status,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                duration=duration,
                upstream_duration=self.upstream_duration,
                request_id=self.request_id,
                local=local[0] if local else None,
                detail=local[1] if local else None,
                grpc_status=self.grpc_status,
                upstream_status=self.upstream_status,
            )
