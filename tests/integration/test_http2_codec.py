"""`--http2-codec`: which HTTP/2 codec serves clients, how a user sees it, and that a process
running one never loads the other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proxy import http2
from tests.support import tools
from tests.support.h2client import get
from tests.support.proxy import DevCerts, ProxyProcess, serve_args
from tests.support.upstream import UpstreamApp


def _started(upstream: UpstreamApp, dev_certs: DevCerts, codec: str) -> ProxyProcess:
    env = {"TLS_SIDECAR_HTTP2_CODEC": codec}
    return ProxyProcess(serve_args(upstream.base, dev_certs), env=env).start()


def test_auto_is_nghttp2_when_built_and_under_ci_it_must_be(
    upstream: UpstreamApp, dev_certs: DevCerts
) -> None:
    """No silent fallback: a CI run on h2 alone would say nothing of the codec users get."""
    built = http2.available("nghttp2")
    if tools.in_ci():
        assert built, http2.HOW_TO_BUILD
    proxy = _started(upstream, dev_certs, "auto")
    try:
        listening = proxy._listening()
        assert listening is not None
        expected = "nghttp2" if built else "h2"
        assert listening["http2_codec"] == expected
        assert proxy.metric("tls_sidecar_build_info", f'http2_codec="{expected}"') == 1
        if not built:  # one line says how to get the fast codec
            assert "apt-get install libnghttp2-dev gcc python3-dev" in proxy.stderr_text()
        assert get(proxy.port, dev_certs.ca, b"/echo").status == 200
    finally:
        proxy.stop()


@pytest.mark.parametrize("codec", http2.CODECS)
def test_the_codec_asked_for_is_the_one_serving(
    upstream: UpstreamApp, dev_certs: DevCerts, codec: str
) -> None:
    if not http2.available(codec):
        tools.missing(http2.HOW_TO_BUILD)
    proxy = _started(upstream, dev_certs, codec)
    try:
        listening = proxy._listening()
        assert listening is not None and listening["http2_codec"] == codec
        assert proxy.metric("tls_sidecar_build_info", f'http2_codec="{codec}"') == 1
        assert get(proxy.port, dev_certs.ca, b"/echo").status == 200
    finally:
        proxy.stop()


def test_without_http2_build_info_says_off(upstream: UpstreamApp, dev_certs: DevCerts) -> None:
    proxy = ProxyProcess(serve_args(upstream.base, dev_certs, "--no-http2")).start()
    try:
        assert proxy.metric("tls_sidecar_build_info", 'http2_codec="off"') == 1
    finally:
        proxy.stop()


# What `serve` loads for HTTP/2 with one codec: the server, the codec the registry resolves and
# the client connection, as `server.build_context` loads them; and the h2c pool with its codec.
_LOADED = """
import json, sys
from proxy import http2, cli, server
import proxy.http2.server, proxy.http2.pool
http2.server_codec_class(http2.resolve(sys.argv[1]))
http2.client_codec_class(http2.client_codec_name(sys.argv[1]))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("h2", "hpack", "hyperframe")
    or m.startswith("proxy.http2."))))
"""


@pytest.mark.parametrize(("codec", "never"), [("nghttp2", "h2"), ("h2", "proxy.http2._nghttp2")])
def test_one_codec_never_loads_the_other(codec: str, never: str) -> None:
    if not http2.available(codec):
        tools.missing(http2.HOW_TO_BUILD)
    out = subprocess.run(
        [sys.executable, "-c", _LOADED, codec], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert never not in loaded, loaded
    others = (
        ("proxy.http2.h2_codec", "proxy.http2.h2_client")
        if codec == "nghttp2"
        else ("proxy.http2.nghttp2_codec", "proxy.http2.nghttp2_client")
    )
    assert not set(others) & set(loaded), loaded


def test_nghttp2_asked_for_but_not_built_stops_start_up_with_one_line(dev_certs: DevCerts) -> None:
    """The extension made unimportable, as on a machine that built without a compiler."""
    args = serve_args("http://127.0.0.1:9", dev_certs, "--http2-codec", "nghttp2")
    script = (
        "import sys; sys.modules['proxy.http2._nghttp2'] = None\n"
        "from proxy.cli import main; main(sys.argv[1:])"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--http2-codec nghttp2" in lines[0]
    assert "apt-get install libnghttp2-dev gcc python3-dev" in lines[0]
    assert "Traceback" not in done.stderr
