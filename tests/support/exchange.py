"""An exchange with no sockets: a recording downstream, an upstream link that runs a real
HTTP/1.1 client codec over a byte buffer, a pool of such links, and a clock the test moves.

In the manner of h11's ConnectionPair and uvicorn's MockLoop: the exchange and the codec are the
real ones; only the transports are replaced, so what the app "receives" is real HTTP/1.1 bytes
and what it "answers" goes through the same parser as in production."""

from __future__ import annotations

import asyncio
import heapq
import io
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import h11
from prometheus_client import CollectorRegistry

from proxy import http1
from proxy.config import Config
from proxy.core.client_side import Downstream
from proxy.core.context import ProxyContext
from proxy.core.exchange import Exchange
from proxy.core.headers import ClientInfo, Headers
from proxy.core.links import (
    ClientCodec,
    Tunnel,
    TunnelOwner,
    UpstreamConnectError,
    UpstreamOwner,
)
from proxy.core.request import RequestHead, read_head
from proxy.core.session import Session
from proxy.log import AccessLog
from proxy.metrics import Metrics
from proxy.tls.context import TlsState


@dataclass
class Recorded:
    """What the client would have seen, in order."""

    calls: list[tuple[str, Any]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    holds: set[int] = field(default_factory=set)
    armed: list[tuple[str, float]] = field(default_factory=list)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def first(self, name: str) -> Any:
        return next(arg for n, arg in self.calls if n == name)


class FakeDownstream(Downstream):
    """A downstream that records what the exchange sends it."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session
        self.seen = Recorded()
        self.done = 0  # times the exchange said it is done
        self.aborted = False

    def cork(self) -> None: ...
    def uncork(self) -> None: ...

    def send_head(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        self.seen.calls.append(("head", (status, headers)))

    def send_data(self, data: bytes) -> None:
        self.seen.body += data

    def send_trailers(self, headers: Headers) -> None:
        self.seen.calls.append(("trailers", headers))

    def send_end(self) -> None:
        self.seen.calls.append(("end", None))

    def send_informational(self, status: int, reason: bytes, headers: Headers) -> None:
        self.seen.calls.append(("informational", status))

    def send_local(self, status: int, headers: Headers, body: bytes) -> None:
        self.seen.calls.append(("local", (status, dict(headers), body)))

    def switch_protocols(self, tunnel: Tunnel) -> None:
        self.seen.calls.append(("switch", tunnel))

    def hold(self, reason: int) -> None:
        self.seen.holds.add(reason)

    def release(self, reason: int) -> None:
        self.seen.holds.discard(reason)

    def arm(self, phase: str, timeout: float) -> None:
        self.seen.armed.append((phase, timeout))

    def exchange_done(self) -> None:
        self.done += 1

    def abort_all(self) -> None:
        self.aborted = True


class FakeLink:
    """An upstream link whose transport is a byte buffer; the app's side is `answer`."""

    def __init__(self, codec: ClientCodec, *, reused: bool = False) -> None:
        self.codec = codec
        self.owner: UpstreamOwner | None = None
        self.reused = reused
        self.received_any = False
        self.sent = bytearray()
        self.aborted = False
        self.tunnel: TunnelOwner | None = None

    def write(self, data: bytes) -> None:
        self.sent += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.sent += part

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def abort(self) -> None:
        self.aborted = True

    def as_tunnel(self) -> Tunnel | None:
        return self  # as an HTTP/1.1 connection can (an h2c stream cannot)

    def start_tunnel(self, owner: TunnelOwner) -> None:
        self.tunnel = owner

    def unread_request_bytes(self) -> int:
        return 0  # the byte buffer takes everything at once

    def answer(self, data: bytes) -> None:
        """The app writes `data`."""
        self.received_any = True
        assert self.owner is not None, "nobody is waiting for an answer on this link"
        self.codec.feed(data, self.owner)

    def lose(self, exc: Exception | None = None) -> None:
        """The app closes the connection."""
        owner = self.owner
        assert owner is not None
        owner.upstream_lost(self, exc)

    def request(self) -> h11.Request:
        """The request the app received, parsed by h11 (an independent parser)."""
        app = h11.Connection(h11.SERVER)
        app.receive_data(bytes(self.sent))
        event = app.next_event()
        assert isinstance(event, h11.Request), event
        return event

    def request_body(self) -> bytes:
        app = h11.Connection(h11.SERVER)
        app.receive_data(bytes(self.sent))
        body = b""
        while True:
            event = app.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.NEED_DATA | h11.PAUSED):
                return body


class FakePool:
    """Idle links to hand out at once, then fresh ones (or a connect error) for `connect`."""

    def __init__(self, codec_name: str) -> None:
        self.codec_class = http1.client_codec_class(codec_name)
        self.idle: list[FakeLink] = []
        self.connected: list[FakeLink] = []
        self.refuse: UpstreamConnectError | None = None
        self.released: list[FakeLink] = []
        self.closed: list[FakeLink] = []

    def link(self, *, reused: bool = False) -> FakeLink:
        return FakeLink(self.codec_class(), reused=reused)

    def take_idle(self) -> FakeLink | None:
        return self.idle.pop(0) if self.idle else None

    async def connect(self) -> FakeLink:
        if self.refuse is not None:
            raise self.refuse
        link = self.link()
        self.connected.append(link)
        return link

    def release(self, up: Any) -> None:
        self.released.append(up)

    def close(self, up: Any) -> None:
        self.closed.append(up)

    def close_idle(self) -> None: ...


class FakeClock:
    """The parts of an event loop a PhaseTimer uses, on a clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0
        self._timers: list[tuple[float, int, asyncio.TimerHandle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        handle = asyncio.TimerHandle(when, callback, (), cast(asyncio.AbstractEventLoop, self))
        heapq.heappush(self._timers, (when, next(self._order), handle))
        return handle

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due on the way, in order."""
        until = self.now + seconds
        while self._timers and self._timers[0][0] <= until:
            when, _, handle = heapq.heappop(self._timers)
            self.now = max(self.now, when)
            if not handle.cancelled():
                handle._run()
        self.now = until

    def get_debug(self) -> bool:
        return False

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None: ...


class Harness:
    """A ProxyContext with real Config, Metrics and access log around fake links."""

    def __init__(self, loop: asyncio.AbstractEventLoop, codec: str, **config: Any) -> None:
        self.config = Config(**config)
        self.metrics = Metrics(CollectorRegistry())
        self.log = io.StringIO()
        self.access_log = AccessLog("json", True, self.log)
        self.pool = FakePool(codec)
        self.ctx = ProxyContext(
            loop,
            self.config,
            cast(TlsState, None),  # only client connections use TLS state
            self.metrics,
            self.access_log,
            server_codec=http1.server_codec_class(codec),
            pool=self.pool,
            protocols={},
        )

    def exchange(
        self,
        head: RequestHead,
        *,
        session: Session | None = None,
    ) -> tuple[Exchange, FakeDownstream]:
        session = session or Session(ClientInfo("192.0.2.7", 8443))
        down = FakeDownstream(session)
        return Exchange(self.ctx, down, session, head), down

    def sample(self, name: str, **labels: str) -> float:
        self.metrics.flush()
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def access_lines(self) -> list[str]:
        self.access_log.flush()
        return self.log.getvalue().splitlines()


def head(
    method: bytes = b"GET",
    target: bytes = b"/",
    headers: Headers | None = None,
    version: bytes = b"1.1",
) -> RequestHead:
    """A request head checked by the same `read_head` every codec uses."""
    return read_head(method, target, version, headers or [(b"host", b"example.test")])
