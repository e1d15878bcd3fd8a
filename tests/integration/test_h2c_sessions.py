"""The nghttp2 client codec's session is freed on every path an h2c connection to the app
ends by: the pool's sweep of an idle connection, the app resetting a stream and then the drain,
the app's GOAWAY, the app breaking HTTP/2. Counted in-process (the shim counts the sessions it
has not freed), over many connections, so a path that leaks one leaves the count above where
it began."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy import http2
from proxy.config import Config, parse_upstream
from proxy.core.headers import Headers
from proxy.http2 import nghttp2_client
from proxy.http2.pool import H2UpstreamPool
from proxy.metrics import Metrics
from tests.support import tools
from tests.support.h2app import H2App

ROUNDS = 20


class _Owner:
    """An exchange's part as the h2c stream sees it: records how the answer went."""

    def __init__(self) -> None:
        self.status = 0
        self.ended = False
        self.lost: Exception | None = None
        self.malformed = ""
        self.down = self

    def cork(self) -> None: ...
    def uncork(self) -> None: ...

    def response_head(self, status: int, reason: bytes, headers: Headers, length: Any) -> None:
        self.status = status

    def response_informational(self, status: int, reason: bytes, headers: Headers) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def response_trailers(self, headers: Headers) -> None: ...

    def response_end(self) -> None:
        self.ended = True

    def response_malformed(self, message: str) -> None:
        self.malformed = message

    def upstream_lost(self, upstream: Any, exc: Exception | None) -> None:
        self.lost = exc or ConnectionResetError()

    def upstream_write_paused(self, paused: bool) -> None: ...

    @property
    def over(self) -> bool:
        return self.ended or self.lost is not None or bool(self.malformed)


async def _until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def app() -> Iterator[H2App]:
    if not http2.available("nghttp2"):
        tools.missing(http2.HOW_TO_BUILD)
    started = H2App().start()
    yield started
    started.stop()


async def _ask(pool: H2UpstreamPool, path: bytes) -> tuple[_Owner, int]:
    """The answer, and the sessions alive while the request was under way."""
    stream = await pool.connect()
    live = nghttp2_client.live_sessions()
    owner = _Owner()
    stream.owner = owner
    stream.codec.request_head(b"GET", path, [(b"host", b"localhost")], chunked=False)
    stream.codec.request_end()
    await _until(lambda: owner.over, f"the answer to {path!r}")
    pool.release(stream)
    return owner, live


@pytest.mark.parametrize(
    ("path", "ends"),
    [
        (b"/ok", "sweep"),  # answered; the idle connection is swept
        (b"/reset-mid", "drain"),  # the app resets the stream; the pool is drained
        (b"/goaway", "app"),  # the app says GOAWAY; the connection closes
        (b"/bad-padding", "app"),  # the app breaks HTTP/2; the connection is cut
    ],
)
def test_every_app_connection_frees_its_session(app: H2App, path: bytes, ends: str) -> None:
    config = Config(
        upstream=parse_upstream(app.url), http2_codec="nghttp2", upstream_idle_timeout=0.1
    )

    async def run() -> tuple[int, int, int]:
        loop = asyncio.get_running_loop()
        before = nghttp2_client.live_sessions()
        pool = H2UpstreamPool(config, Metrics(), loop)
        peak = 0
        for _ in range(ROUNDS):
            owner, live = await _ask(pool, path)
            assert owner.over
            peak = max(peak, live - before)
            if ends == "drain":
                pool.close_idle()
            await _until(lambda: not pool.connections, f"the app connection to end ({ends})")
        await _until(lambda: nghttp2_client.live_sessions() == before, "the sessions freed")
        return before, peak, nghttp2_client.live_sessions()

    before, peak, after = asyncio.run(run())
    assert peak >= 1  # the codec under test was nghttp2's
    assert after == before
