"""What an idle keep-alive HTTP/1.1 connection costs the proxy (S5 in small): the TLS
connection and ours, after one request, with each HTTP/1.1 codec. The HTTP/2 figures are in
test_http2_memory."""

from __future__ import annotations

import http.client
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.support.proxy import DevCerts, ProxyProcess, client_context, wait_for
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.slow

IDLE = 500
# Per idle HTTP/1.1 connection, as measured here with 500 from 10 clients: ~29 KiB with either
# codec, most of it the TLS connection itself (OpenSSL's state, uvloop's TLS transport), ~5 KiB
# ours; 34-37 KiB while each connection's TLS read buffer took pages earlier handshakes had
# written (process.clean_tls_read_buffer). A per-connection buffer of 5 KiB kept past its
# request would fail the bound.
IDLE_BUDGET = 32 * 1024


def _rss(pid: int) -> int:
    """The process's resident set, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_an_idle_http1_connection_costs_little_memory(
    start_proxy: ProxyFactory, upstream: UpstreamApp, dev_certs: DevCerts, http_codec: str
) -> None:
    proxy: ProxyProcess = start_proxy(upstream.base, "--no-access-log", "--idle-timeout", "600s")
    assert proxy.proc is not None
    pid = proxy.proc.pid
    context = client_context(dev_certs.ca)
    held: list[http.client.HTTPSConnection] = []

    def one_request(_: int) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection("localhost", proxy.port, context=context, timeout=30)
        conn.request("GET", "/")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        return conn  # kept open: idle between requests

    def open_and_settle(count: int) -> int:
        # from 10 clients at once, as real ones come: handshakes interleave in the proxy
        with ThreadPoolExecutor(10) as clients:
            held.extend(clients.map(one_request, range(count)))
        wait_for(
            lambda: proxy.metric("tls_sidecar_connections_active") >= len(held),
            what=f"{len(held)} connections open",
        )
        return _rss(pid)

    try:
        before = open_and_settle(50)  # the allocator and the caches warmed first
        after = open_and_settle(IDLE)
        per = (after - before) / IDLE
        print(f"\n{http_codec}: {per / 1024:.1f} KiB per idle HTTP/1.1 connection")
        assert per < IDLE_BUDGET, f"{per / 1024:.1f} KiB per idle HTTP/1.1 connection"
    finally:
        for conn in held:
            conn.close()
