"""The exchange without sockets: a real exchange and a real HTTP/1.1 client codec over byte
buffers (tests/support/exchange.py), for each client codec. What the app receives is parsed
by h11 as an independent check; what the client sees is what the downstream was asked to send."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from proxy.core import errors, grpc
from proxy.core.exchange import HOLD_CONNECT, Exchange
from proxy.core.headers import ClientInfo
from proxy.core.links import UpstreamConnectError
from proxy.core.request import RequestHead
from proxy.core.session import Session
from proxy.http1 import CODECS
from proxy.http2.request import read_h2_head
from tests.support.exchange import FakeDownstream, FakeLink, Harness, head

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A real event loop the test body runs in (the access log flushes on it)."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(params=CODECS)
def codec(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def started(h: Harness, request: RequestHead) -> tuple[FakeLink, Exchange, FakeDownstream]:
    """An exchange started on an idle pooled link: (the link, the exchange, what the client sees)."""
    link = h.pool.link()
    h.pool.idle.append(link)
    exchange, down = h.exchange(request)
    exchange.start()
    return link, exchange, down


async def settle() -> None:
    """Let the exchange's connect task (and the access log's flush) run to completion."""
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_request_reaches_the_app_with_forwarding_headers_and_the_answer_the_client(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    link, exchange, down = started(h, head(target=b"/a?b=1"))
    exchange.request_end()
    request = link.request()
    assert (request.method, request.target) == (b"GET", b"/a?b=1")
    sent = dict(request.headers)
    assert sent[b"x-forwarded-for"] == b"192.0.2.7"
    assert sent[b"x-forwarded-proto"] == b"https"
    assert down.seen.armed[-1] == ("upstream", h.config.upstream_timeout)
    link.answer(OK)
    assert down.seen.first("head")[0] == 200
    assert bytes(down.seen.body) == b"hello"
    assert down.seen.names()[-1] == "end"
    assert h.pool.released == [link]
    assert down.done == 1
    assert (
        h.sample("tls_sidecar_http_requests_total", method="GET", code="200", protocol="http/1.1")
        == 1
    )
    (line,) = h.access_lines()
    assert json.loads(line)["status"] == 200


async def test_a_reused_connection_the_app_closed_unanswered_is_retried_once_on_a_new_one(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    stale = h.pool.link(reused=True)
    h.pool.idle.append(stale)
    exchange, down = h.exchange(head())
    exchange.start()
    exchange.request_end()
    stale.lose()
    assert HOLD_CONNECT in down.seen.holds
    await settle()
    (fresh,) = h.pool.connected
    assert fresh.request().target == b"/"
    fresh.answer(OK)
    assert bytes(down.seen.body) == b"hello"
    assert "local" not in down.seen.names()


@pytest.mark.parametrize(
    "why",
    ["the request has a body", "the app sent bytes first", "the connection was new"],
)
async def test_no_retry_when_the_app_may_have_acted_on_the_request(
    loop: asyncio.AbstractEventLoop, codec: str, why: str
) -> None:
    h = Harness(loop, codec)
    link = h.pool.link(reused=why != "the connection was new")
    h.pool.idle.append(link)
    headers = [(b"host", b"example.test")]
    if why == "the request has a body":
        headers.append((b"content-length", b"2"))
    exchange, down = h.exchange(head(b"POST", headers=headers))
    exchange.start()
    if why == "the request has a body":
        exchange.request_data(b"hi")
    exchange.request_end()
    if why == "the app sent bytes first":
        link.answer(b"HTTP/1.1 200 OK\r\n")  # a head cut short
    link.lose()
    await settle()
    assert h.pool.connected == []
    if why == "the app sent bytes first":
        assert down.aborted or down.seen.first("local")[0] == 502
    else:
        assert down.seen.first("local")[0] == 502


async def test_a_second_loss_after_the_retry_is_answered_502(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    stale = h.pool.link(reused=True)
    h.pool.idle.append(stale)
    exchange, down = h.exchange(head())
    exchange.start()
    exchange.request_end()
    stale.lose()
    await settle()
    (fresh,) = h.pool.connected
    fresh.reused = True  # even a reused-looking link is not retried twice
    fresh.lose()
    status, _, body = down.seen.first("local")
    assert status == 502
    assert b"request id" in body
    assert h.sample("tls_sidecar_local_responses_total", code="502", reason="upstream_closed") == 1


async def test_a_body_over_the_limit_is_answered_413_in_the_middle_and_the_app_is_cut_off(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec, max_body_bytes=10)
    link = h.pool.link()
    h.pool.idle.append(link)
    exchange, down = h.exchange(
        head(b"POST", headers=[(b"host", b"x"), (b"transfer-encoding", b"chunked")])
    )
    exchange.start()
    exchange.request_data(b"123456")
    assert "local" not in down.seen.names()
    exchange.request_data(b"789012")
    status, _, body = down.seen.first("local")
    assert (status, body) == (413, b"413 request body over 10 bytes\n")
    assert link.aborted
    assert h.pool.released == []


async def test_a_declared_length_over_the_limit_never_reaches_the_app(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec, max_body_bytes=10)
    exchange, down = h.exchange(
        head(b"POST", headers=[(b"host", b"x"), (b"content-length", b"11")])
    )
    exchange.start()
    assert down.seen.first("local")[0] == 413
    assert h.pool.connected == [] and h.pool.idle == []


async def test_an_early_answer_is_relayed_and_the_rest_of_the_body_is_dropped(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    link, exchange, down = started(
        h, head(b"POST", headers=[(b"host", b"x"), (b"content-length", b"6")])
    )
    exchange.request_data(b"abc")
    link.answer(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
    assert down.seen.first("head")[0] == 401
    assert down.seen.armed[-1] == ("request_body", h.config.idle_timeout)
    assert down.done == 0  # the client is still sending
    exchange.request_data(b"def")
    exchange.request_end()
    assert down.done == 1
    assert (
        h.sample("tls_sidecar_http_requests_total", method="POST", code="401", protocol="http/1.1")
        == 1
    )


async def test_a_refused_client_certificate_is_answered_403_before_the_app_is_asked(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    session = Session(ClientInfo("192.0.2.7", 8443), denied="certificate")
    exchange, down = h.exchange(head(), session=session)
    exchange.start()
    status, _, body = down.seen.first("local")
    assert status == 403
    assert body == b"403 a client certificate is required\n"
    assert h.pool.connected == []
    (line,) = h.access_lines()
    assert json.loads(line)["local"] == "client_certificate"


@pytest.mark.parametrize(("reason", "status"), [("refused", 502), ("timeout", 504)])
async def test_an_app_that_cannot_be_reached_is_answered_in_http_and_in_grpc_terms(
    loop: asyncio.AbstractEventLoop, codec: str, reason: str, status: int
) -> None:
    h = Harness(loop, codec)
    h.pool.refuse = UpstreamConnectError(reason, status, "upstream 127.0.0.1:1 refused")
    plain, down = h.exchange(head())
    plain.start()
    grpc_call, grpc_down = h.exchange(
        read_h2_head(
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"x"),
                (b":path", b"/pkg.Svc/Call"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ],
            False,
        )
    )
    grpc_call.start()
    await settle()
    assert down.seen.first("local")[0] == status
    grpc_status, grpc_headers, grpc_body = grpc_down.seen.first("local")
    assert (grpc_status, grpc_body) == (200, b"")
    code = next(k.grpc for k in errors.KINDS.values() if k.status == status)
    assert grpc_headers[b"grpc-status"] == grpc.STATUS_BYTES[code]
    assert code in (grpc.UNAVAILABLE, grpc.DEADLINE_EXCEEDED)


async def test_an_app_that_does_not_answer_in_time_gets_504_and_is_cut_off(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    link, exchange, down = started(h, head())
    exchange.request_end()
    assert exchange.timed_out()
    assert down.seen.first("local")[0] == 504
    assert link.aborted
    assert h.sample("tls_sidecar_local_responses_total", code="504", reason="upstream_timeout") == 1


async def test_a_timeout_after_the_answer_started_leaves_the_answer_alone(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    link, exchange, down = started(h, head())
    exchange.request_end()
    link.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert not exchange.timed_out()
    assert "local" not in down.seen.names()


async def test_a_response_cut_short_by_the_app_closes_the_client_side(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    link, exchange, down = started(h, head())
    exchange.request_end()
    link.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    link.lose()
    assert down.aborted
    assert h.pool.released == []
    assert (
        h.sample("tls_sidecar_http_requests_total", method="GET", code="200", protocol="http/1.1")
        == 1
    )


async def test_a_malformed_answer_from_the_app_is_502_never_relayed(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    h = Harness(loop, codec)
    link, exchange, down = started(h, head())
    exchange.request_end()
    link.answer(b"NOT HTTP AT ALL\r\n\r\n")
    assert down.seen.first("local")[0] == 502
    assert "head" not in down.seen.names()
    assert link.aborted


async def test_an_http10_client_gets_no_informational_answer(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    """RFC 9110 §15.2: a 1xx must never reach an HTTP/1.0 client, which would take it for the
    final answer; an HTTP/1.1 client gets the app's 103 Early Hints."""
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK
    for version, relayed in ((b"1.0", False), (b"1.1", True)):
        h = Harness(loop, codec)
        link, exchange, down = started(h, head(version=version))
        exchange.request_end()
        link.answer(hints)
        assert ("informational" in down.seen.names()) is relayed, version
        assert down.seen.first("head")[0] == 200
        assert bytes(down.seen.body) == b"hello"


async def test_a_switch_to_a_protocol_the_client_did_not_ask_for_is_502(
    loop: asyncio.AbstractEventLoop, codec: str
) -> None:
    """The client asked for websocket; an app switching to h2c (or anything else) would make
    the tunnel carry a protocol no rule of the proxy applies to."""
    upgrade = [(b"host", b"x"), (b"connection", b"upgrade"), (b"upgrade", b"websocket")]
    for protocol, switched in ((b"h2c", False), (b"WebSocket", True)):
        h = Harness(loop, codec)
        link, exchange, down = started(h, head(headers=upgrade))
        exchange.request_end()
        link.answer(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: upgrade\r\n\r\n"
            % protocol
        )
        if switched:
            assert "switch" in down.seen.names(), protocol
        else:
            assert down.seen.first("local")[0] == 502
            assert "switch" not in down.seen.names()
            assert link.aborted
