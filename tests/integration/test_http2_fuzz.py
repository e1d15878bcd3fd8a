"""Hypothesis over HTTP/2 requests with arbitrary bytes in every pseudo-header and field (names
and values), sent as raw frames over TLS to a proxy in front of a recording HTTP/1.1 app: each
stream is refused (RST_STREAM, or an answer of the proxy's own), or the app parses exactly one
request with the same method, target, fields and body. Never two requests, never one the app
cannot parse, never a GOAWAY for one stream.

Bounded in CI (TLS_SIDECAR_FUZZ_EXAMPLES, default 60 per codec); `make fuzz` runs thousands.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2client import H2Client
from tests.support.proxy import ProxyProcess
from tests.support.upstream import UpstreamApp

EXAMPLES = int(os.environ.get("TLS_SIDECAR_FUZZ_EXAMPLES", "60"))

# Fields the proxy itself sets, removes or joins (X-Forwarded-*, the request id, cookies,
# hop-by-hop): they are not compared, and the generator does not aim at them.
OWNED = frozenset(
    {
        b"host",
        b"cookie",
        b"te",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"upgrade",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-client-cert",
        b"x-request-id",
        b"proxy-authorization",
        b"trailer",
        b"expect",
    }
)

nasty = st.sampled_from(
    [b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00", b"\x01", b"\x7f", b"\xff", b"#", b"@", b":", b"/"]
)


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every test here runs once per HTTP/2 codec (with its HTTP/1.1 pair to the app)."""
    return http2_env(http2_codec)


def spliced(base: bytes) -> st.SearchStrategy[bytes]:
    """`base` with arbitrary bytes and a nasty one around it: where injections live."""
    return st.builds(
        lambda a, n, b: base + a + n + b, st.binary(max_size=6), nasty, st.binary(max_size=6)
    )


TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"  # lower case last
PATH_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "#")


def text(alphabet: str, min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[bytes]:
    return st.text(alphabet, min_size=min_size, max_size=max_size).map(str.encode)


# Each part has a form HTTP/1.1 can carry and a wild one (arbitrary bytes, or a valid form
# with a nasty byte spliced in); a request has no wild part, one, or all of them, so that
# accepted requests are compared often and refused ones are tried everywhere.
PARTS: dict[str, tuple[st.SearchStrategy[bytes], st.SearchStrategy[bytes]]] = {
    "method": (
        st.one_of(st.sampled_from([b"GET", b"POST", b"OPTIONS", b"PATCH"]), text(TOKEN, 1)),
        st.one_of(spliced(b"GET"), st.binary(max_size=8)),
    ),
    "path": (
        st.builds(lambda tail: b"/echo/fuzz" + tail, text(PATH_CHARS, max_size=12)),
        st.one_of(st.sampled_from([b"*", b""]), spliced(b"/echo/fuzz"), st.binary(max_size=12)),
    ),
    "authority": (
        st.sampled_from([b"localhost", b"localhost:8443", b"[::1]:8443", b"127.0.0.1", b"a.b-c"]),
        st.one_of(st.sampled_from([b""]), spliced(b"localhost"), st.binary(max_size=10)),
    ),
    "scheme": (st.sampled_from([b"https", b"http"]), st.binary(max_size=6)),
    "name": (
        st.builds(lambda tail: b"x-" + tail, text(TOKEN[:-26], max_size=6)),
        st.one_of(
            st.sampled_from([b"X-Upper", b"te", b"host", b"connection"]),
            spliced(b"x-"),
            st.binary(min_size=1, max_size=6),
        ),
    ),
    "value": (
        st.one_of(
            st.sampled_from([b"1", b"a b", b"a\tb", b"\xe9t\xe9", b""]),
            text(PATH_CHARS + " ", max_size=10).map(bytes.strip),
        ),
        st.one_of(spliced(b"v"), st.binary(max_size=10)),
    ),
}


@dataclass
class Sent:
    method: bytes
    scheme: bytes
    path: bytes
    authority: bytes | None
    fields: list[tuple[bytes, bytes]]
    body: bytes | None


@st.composite
def requests(draw: st.DrawFn) -> Sent:
    wild = draw(st.sampled_from([None, None, None, *PARTS, "all"]))

    def part(kind: str) -> bytes:
        valid, nasty_form = PARTS[kind]
        return draw(nasty_form if wild in (kind, "all") else valid)

    fields = [(part("name"), part("value")) for _ in range(draw(st.integers(0, 4)))]
    authority = None if draw(st.integers(0, 5)) == 0 else part("authority")
    body = draw(st.one_of(st.none(), st.binary(max_size=24)))
    return Sent(part("method"), part("scheme"), part("path"), authority, fields, body)


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    # Longer than any answer takes on a loaded machine: a 504 would look like a refusal.
    return start_proxy(upstream.base, "--upstream-timeout", "30s")


def send(proxy: ProxyProcess, ca: Path, sent: Sent) -> H2Client:
    """One stream of raw frames (no client-side check stands in the way); the answer read."""
    client = H2Client(proxy.port, ca)
    block = [(b":method", sent.method), (b":scheme", sent.scheme)]
    if sent.authority is not None:
        block.append((b":authority", sent.authority))
    block += [(b":path", sent.path), *sent.fields]
    if sent.body is not None:
        block.append((b"content-length", b"%d" % len(sent.body)))
    encoded = bytes(client.conn.encoder.encode(block))
    frames: list[Frame]
    if sent.body is None:
        frames = [HeadersFrame(1, encoded, flags=["END_HEADERS", "END_STREAM"])]
    else:
        frames = [
            HeadersFrame(1, encoded, flags=["END_HEADERS"]),
            DataFrame(1, sent.body, flags=["END_STREAM"]),
        ]
    client.send_frames(frames)

    def over() -> bool:
        for f in client.raw_frames():
            if isinstance(f, (RstStreamFrame, GoAwayFrame)) or (
                f.stream_id == 1 and "END_STREAM" in f.flags
            ):
                return True
        return False

    assert client.pump(over, 10), "no answer, reset or GOAWAY for the stream"
    return client


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sent=requests())
def test_a_stream_is_refused_or_reaches_the_app_as_one_and_the_same_request(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path, sent: Sent
) -> None:
    requests, malformed = len(upstream.requests), upstream.malformed
    client = send(proxy, ca, sent)
    frames = client.raw_frames()
    client.close()
    assert not [f for f in frames if isinstance(f, GoAwayFrame)], "GOAWAY for one stream"
    assert upstream.malformed == malformed, "the app read a request it could not parse"
    assert "Traceback" not in proxy.stderr_text()
    reset = any(isinstance(f, RstStreamFrame) and f.stream_id == 1 for f in frames)
    body, _ = client.raw_body(1)
    answered_by_app = not reset and body[:1] == b"{"
    new = upstream.requests[requests:]
    event("reset" if reset else "answered by the app" if answered_by_app else "answered by us")
    if not answered_by_app:  # refused, or answered by the proxy itself (4xx)
        assert new == [], f"a refused stream reached the app: {new}"
        return
    assert len(new) == 1, f"one stream, {len(new)} requests at the app"
    got = new[0]
    echoed = json.loads(body)
    assert got.method.encode() == sent.method == echoed["method"].encode()
    assert got.path.encode("latin-1") == sent.path
    fields = [(n.encode(), v.encode("latin-1")) for n, v in got.headers]
    assert [f for f in fields if f[0] not in OWNED] == [f for f in sent.fields if f[0] not in OWNED]
    hosts = [v for n, v in fields if n == b"host"]
    if sent.authority is not None:
        assert hosts == [sent.authority]
    assert got.body_sha256 == hashlib.sha256(sent.body or b"").hexdigest()
