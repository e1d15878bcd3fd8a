"""The known HTTP/2 attacks, each sent with raw frames at a running proxy: the attacker's
connection ends (GOAWAY with the right code, or its stream reset), and everyone else is served."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import h2.settings
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2client import H2Client, get
from tests.support.proxy import ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp

CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every defence is the connection's own: each test runs once per HTTP/2 codec."""
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    return start_proxy(upstream.base, "--idle-timeout", "1s", "--max-concurrent-streams", "20")


@pytest.fixture(autouse=True)
def others_are_still_served(proxy: ProxyProcess, ca: Path) -> Iterator[None]:
    yield
    assert get(proxy.port, ca, b"/echo").status == 200


def rapid_resets(proxy: ProxyProcess) -> float:
    """GOAWAYs for a spent reset budget so far (none yet before the first)."""
    value = proxy.metric("tls_sidecar_http2_connection_errors_total", 'reason="rapid_reset"')
    return 0.0 if math.isnan(value) else value


def headers_block(client: H2Client, path: bytes = b"/echo") -> bytes:
    fields = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path),
    ]
    return bytes(client.conn.encoder.encode(fields))  # h2's own context: the server's in step


def test_rapid_reset_gets_enhance_your_calm(proxy: ProxyProcess, ca: Path) -> None:
    """CVE-2023-44487: streams opened and reset at once, as fast as the socket takes them."""
    before = rapid_resets(proxy)
    client = H2Client(proxy.port, ca)
    client.pump(lambda: bool(client.remote_settings), 5)
    for _ in range(2000):
        if client.send_failed:
            break
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(
            sid,
            [
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":authority", b"x"),
                (b":path", b"/echo"),
            ],
        )
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.send_raw(client.conn.data_to_send())
    goaway = client.wait_goaway()
    assert goaway.error_code == CALM
    # this connection's GOAWAY was counted (the proxy is shared by the module's tests)
    assert wait_for(lambda: rapid_resets(proxy) - before == 1, what="the rapid_reset count")
    client.close()


@pytest.mark.parametrize("kind", ["past-the-limit", "malformed"])
def test_streams_the_proxy_must_refuse_count_as_resets(
    proxy: ProxyProcess, ca: Path, kind: str
) -> None:
    """A client can make the proxy reset streams as fast as it could reset them itself (streams
    past the limit, malformed requests: the shape of CVE-2025-8671): the same budget applies."""
    before = rapid_resets(proxy)
    client = H2Client(proxy.port, ca)
    client.pump(lambda: bool(client.remote_settings), 5)
    end = ["END_HEADERS", "END_STREAM"]
    waiting = 20 if kind == "past-the-limit" else 0  # at the gate, within the limit
    sid = 1
    while sid < 2000 and client._raw_goaway() is None and not client.closed:
        # in steps of 10 streams, each step refused before the next (a client that sent
        # more than h2's own bound in one go would get PROTOCOL_ERROR instead)
        frames = []
        for _ in range(10):
            if kind == "past-the-limit":
                block = headers_block(client, b"/gate/refused")
            else:  # a connection-specific field, not allowed in HTTP/2
                block = headers_block(client) + bytes(
                    client.conn.encoder.encode([(b"connection", b"x")])
                )
            frames.append(HeadersFrame(sid, block, flags=end))
            sid += 2
        client.send_frames(frames)
        refused = sid // 2 - waiting

        def answered(refused: int = refused) -> bool:
            return len(client.raw_resets()) >= refused or client._raw_goaway() is not None

        client.pump(answered)
    goaway = client.wait_goaway()
    # both codecs (before: nghttp2 ended the connection with PROTOCOL_ERROR at the first
    # stream past the limit, before the budget was spent)
    assert goaway.error_code == CALM
    # this connection's GOAWAY was counted (the proxy is shared by the module's tests)
    assert wait_for(lambda: rapid_resets(proxy) - before == 1, what="the rapid_reset count")
    client.close()


def test_continuation_flood_is_bounded_by_max_header_bytes(proxy: ProxyProcess, ca: Path) -> None:
    """CVE-2024-27316: one header block in endless CONTINUATION frames. The block is cut at
    twice --max-header-bytes (32 KiB) in total, long before h2's own 64-frame limit."""
    client = H2Client(proxy.port, ca)
    block = headers_block(client)
    client.send_frames([HeadersFrame(1, block, flags=[])])
    sent = 0
    for _ in range(60):
        if client.send_failed:
            break
        client.send_frames([ContinuationFrame(1, b"\x00\x01a\x01b" * 800)])  # 4 KiB each
        sent += 4000
    goaway = client.wait_goaway()
    assert goaway.error_code == CALM
    # h2 decodes a block once whole and cuts it encoded (header_block); nghttp2 decodes as
    # it arrives and cuts the decoded list first (header_list): the same bound either way
    cut = [
        proxy.metric("tls_sidecar_http2_connection_errors_total", f'reason="{reason}"')
        for reason in ("header_block", "header_list")
    ]
    assert any(value >= 1 for value in cut), cut
    client.close()


@pytest.mark.parametrize("kind", ["settings", "ping", "empty-data"])
def test_control_frame_floods_get_enhance_your_calm(
    proxy: ProxyProcess, ca: Path, kind: str
) -> None:
    client = H2Client(proxy.port, ca)
    if kind == "empty-data":
        client.send_frames([HeadersFrame(1, headers_block(client), flags=["END_HEADERS"])])
        flood = DataFrame(1, b"").serialize()
    elif kind == "ping":
        flood = PingFrame(0, os.urandom(8)).serialize()
    else:
        flood = SettingsFrame(0, {h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384}).serialize()
    for _ in range(30):
        if client.send_failed:
            break
        client.send_raw(flood * 500)
    goaway = client.wait_goaway()
    assert goaway.error_code == CALM
    client.close()


def test_hpack_bomb_is_refused(proxy: ProxyProcess, ca: Path) -> None:
    """A small header block that decodes to a huge header list: one 4 KiB field entered in the
    dynamic table, then named again by index a hundred times (~400 KiB decoded)."""
    client = H2Client(proxy.port, ca)
    bomb = [(b"x-bomb", b"a" * 4000)] * 100
    block = headers_block(client, b"/echo")
    block += bytes(client.conn.encoder.encode(bomb))
    assert len(block) < 4500
    client.send_frames([HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"])])
    goaway = client.wait_goaway()
    assert goaway.error_code in (CALM, h2.errors.ErrorCodes.COMPRESSION_ERROR)
    client.close()


def test_max_concurrent_streams_is_advertised_and_enforced(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    """Streams past the advertised limit are refused one by one (REFUSED_STREAM, so the client
    may retry them); the connection and the streams within the limit go on, on both codecs.
    Before: nghttp2 (1.52) ended the connection (GOAWAY PROTOCOL_ERROR) for a stream past
    the limit the client had acknowledged."""
    client = H2Client(proxy.port, ca)
    client.pump(lambda: bool(client.remote_settings), 5)
    assert client.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 20
    frames = [
        HeadersFrame(
            sid, headers_block(client, b"/gate/limit"), flags=["END_HEADERS", "END_STREAM"]
        )
        for sid in range(1, 2 * 25, 2)
    ]
    client.send_frames(frames)
    client.pump(lambda: len(client.raw_resets()) >= 5, 10)
    assert client.raw_resets() == dict.fromkeys(
        range(41, 50, 2), h2.errors.ErrorCodes.REFUSED_STREAM
    )
    upstream.open_gate("limit")
    client.pump(lambda: len([f for f in client.raw_frames() if "END_STREAM" in f.flags]) >= 20)
    ended = {f.stream_id for f in client.raw_frames() if "END_STREAM" in f.flags}
    assert ended == set(range(1, 40, 2))  # the twenty within the limit were answered
    assert client._raw_goaway() is None
    client.close()


def test_a_shut_window_is_cut_by_the_idle_timeout_and_buffers_stay_bounded(
    proxy: ProxyProcess, ca: Path
) -> None:
    """A client that never opens its window: nothing is sent, the proxy buffers a bounded
    amount per stream (it stops reading the app), and the stream is reset after
    --idle-timeout (1 s here)."""
    rss_before = _rss_kib(proxy)
    client = H2Client(proxy.port, ca, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    streams = [client.request(b"/bytes/20000000") for _ in range(10)]  # 200 MB asked for
    for sid in streams:
        assert client.response(sid, timeout=15).reset == h2.errors.ErrorCodes.CANCEL
    grown = _rss_kib(proxy) - rss_before
    assert grown < 40 * 1024, f"the proxy grew by {grown} KiB for 10 stalled streams"
    assert proxy.metric("tls_sidecar_timeouts_total", 'phase="send"') >= 10
    client.close()


def _rss_kib(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])


@pytest.mark.parametrize("case", ["lower", "after-its-answer", "after-its-reset"])
def test_a_stream_id_used_again_or_going_down_is_a_protocol_error(
    proxy: ProxyProcess, ca: Path, case: str
) -> None:
    """RFC 9113 §5.1.1: a new stream's id must be greater than every id the client used; an
    unexpected one is a connection error PROTOCOL_ERROR, whatever became of that stream."""
    client = H2Client(proxy.port, ca)
    end = ["END_HEADERS", "END_STREAM"]
    if case == "lower":
        client.send_frames([HeadersFrame(5, headers_block(client), flags=end)])
        reused = 3
    elif case == "after-its-answer":
        reused = client.request(b"/echo")
        assert client.response(reused).status == 200
    else:
        reused = 1
        client.send_frames(
            [
                HeadersFrame(1, headers_block(client), flags=["END_HEADERS"]),
                RstStreamFrame(1, error_code=h2.errors.ErrorCodes.CANCEL),
            ]
        )
    client.send_frames([HeadersFrame(reused, headers_block(client), flags=end)])
    assert client.pump(lambda: client.closed, 10), "the connection stayed open"
    goaways = [f for f in client.raw_frames() if isinstance(f, GoAwayFrame)]
    assert [g.error_code for g in goaways] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert proxy.metric("tls_sidecar_http2_connection_errors_total", 'reason="stream_reused"') >= 1
    client.close()


def test_a_frame_out_of_place_is_a_protocol_error(proxy: ProxyProcess, ca: Path) -> None:
    client = H2Client(proxy.port, ca)
    client.send_frames([ContinuationFrame(7, b"junk", flags=["END_HEADERS"])])  # no HEADERS before
    assert client.wait_goaway().error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    client.close()


def test_an_idle_connection_gets_goaway_and_is_closed(proxy: ProxyProcess, ca: Path) -> None:
    """--idle-timeout (1 s here) with no stream open: GOAWAY NO_ERROR, then the close."""
    client = H2Client(proxy.port, ca)
    assert client.response(client.request(b"/echo")).status == 200
    assert client.pump(lambda: client.closed, 10), "the idle connection stayed open"
    goaway = client.wait_goaway(1)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    assert goaway.last_stream_id == 1
    client.close()


def test_websocket_over_http2_is_not_offered(proxy: ProxyProcess, ca: Path) -> None:
    """No SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441): browsers keep WebSocket on HTTP/1.1; an
    extended CONNECT anyway is malformed here and resets its stream only."""
    client = H2Client(proxy.port, ca, validate=False)
    client.pump(lambda: bool(client.remote_settings), 5)
    assert client.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL, 0) == 0
    sid = client.request(
        fields=[
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", b"/ws"),
        ],
        end=False,
    )
    assert client.response(sid).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.response(client.request(b"/echo")).status == 200
    client.close()


def test_a_connection_that_opens_no_stream_is_closed_after_the_idle_timeout(
    proxy: ProxyProcess, ca: Path
) -> None:
    """Before: only a connection whose streams had ended was timed; one that never opened a
    stream held its slot (and its memory) until the client left."""
    client = H2Client(proxy.port, ca)
    client.pump(lambda: bool(client.remote_settings), 5)
    assert client.wait_goaway().error_code == h2.errors.ErrorCodes.NO_ERROR
    assert client.pump(lambda: client.closed, 10), "the connection stayed open"
    client.close()
