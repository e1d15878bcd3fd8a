"""HTTP/2 flow control under several streams at once: many large responses sharing one client
connection with the default 65,535-byte windows all complete, and an app's reset mid-body
reaches the client as RST_STREAM at once; for an HTTP/1.1 app and an h2c app."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import h2.errors
import pytest

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2app import H2App
from tests.support.h2client import H2Client
from tests.support.proxy import DevCerts, ProxyProcess
from tests.support.upstream import UpstreamApp, pattern

STREAMS = 12  # the proxy's --max-concurrent-streams in these tests
SIZE = 1_000_000


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every test here runs once per HTTP/2 codec (with its HTTP/1.1 pair to the app)."""
    return http2_env(http2_codec)


@pytest.fixture(scope="module", params=["http1", "h2c"])
def app_url(request: pytest.FixtureRequest, upstream: UpstreamApp) -> Iterator[str]:
    """The app behind the proxy: the HTTP/1.1 test app, or the h2c one."""
    if request.param == "http1":
        yield upstream.base
        return
    app = H2App().start()
    yield app.url
    app.stop()


@pytest.fixture(scope="module")
def flow_proxy(start_proxy: ProxyFactory, app_url: str) -> ProxyProcess:
    # An app that is stuck for this long would show as CANCEL resets, not as a hung test.
    return start_proxy(
        app_url, "--upstream-timeout", "20s", "--max-concurrent-streams", str(STREAMS)
    )


def _finished(client: H2Client, sids: list[int]) -> bool:
    return all(client.responses[s].ended or client.responses[s].reset is not None for s in sids)


def test_concurrent_large_responses_on_one_connection_all_complete(
    flow_proxy: ProxyProcess, dev_certs: DevCerts
) -> None:
    """As many 1 MB downloads as the stream limit allows, on one connection whose client keeps
    h2's default windows and acknowledges what it reads: every body arrives whole."""
    client = H2Client(flow_proxy.port, dev_certs.ca)
    try:
        sids = [client.request(f"/bytes/{SIZE}".encode()) for _ in range(STREAMS)]
        client.pump(lambda: _finished(client, sids), timeout=60)
        outcome = {
            sid: (len(r.body), r.ended, r.reset)
            for sid, r in ((s, client.responses[s]) for s in sids)
        }
        assert outcome == dict.fromkeys(sids, (SIZE, True, None))
        expected = pattern(SIZE)
        assert all(client.responses[s].body == expected for s in sids)
        # and the connection serves the next stream
        assert client.response(client.request(b"/bytes/10")).body == pattern(10)
    finally:
        client.close()


def test_an_app_reset_mid_body_is_relayed_at_once_to_every_stream(
    flow_proxy: ProxyProcess, dev_certs: DevCerts
) -> None:
    """Streams whose app resets after part of the body, more than the client's windows and the
    proxy's buffers hold at once: every one ends with RST_STREAM, long before
    --upstream-timeout would cut it (CANCEL)."""
    # 300,000 bytes each, then a TCP reset (HTTP/1.1) or RST_STREAM INTERNAL_ERROR (h2c).
    path = b"/reset-mid/300000"
    client = H2Client(flow_proxy.port, dev_certs.ca)
    try:
        for _ in range(3):
            sids = [client.request(path) for _ in range(STREAMS)]
            assert client.pump(functools.partial(_finished, client, sids), timeout=15), {
                s: len(client.responses[s].body) for s in sids if not _finished(client, [s])
            }
            codes = {client.responses[s].reset for s in sids}
            assert codes == {h2.errors.ErrorCodes.INTERNAL_ERROR}
            assert not any(client.responses[s].ended for s in sids)
    finally:
        client.close()


def test_a_client_not_reading_leaves_a_shared_h2c_connection_to_others(
    start_proxy: ProxyFactory, dev_certs: DevCerts
) -> None:
    """One client opens 95 downloads and reads none: its streams to the app pause, and what
    they hold back must not shut the h2c connection's window, which another client's download
    on the same connection to the app needs."""
    app = H2App().start()  # 100 streams per connection: both clients share one
    try:
        proxy = start_proxy(app.url, "--max-concurrent-streams", "100")
        stuck = H2Client(proxy.port, dev_certs.ca)
        reader = H2Client(proxy.port, dev_certs.ca)
        try:
            for _ in range(95):
                stuck.request(b"/bytes/1000000")  # and never read
            size = 4_000_000
            sid = reader.request(b"/bytes/%d" % size)
            answer = reader.response(sid, timeout=30)
            assert (len(answer.body), answer.ended) == (size, True)
            assert app.connections == 1
        finally:
            stuck.close()
            reader.close()
    finally:
        app.stop()
