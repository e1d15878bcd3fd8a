"""Faults on either side: retries only when safe, and nothing leaks after aborted exchanges."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from tests.conftest import ProxyFactory
from tests.support.proxy import ProxyProcess, https, request_bytes, tls_socket, wait_for
from tests.support.upstream import UpstreamApp


def at_rest(proxy: ProxyProcess) -> None:
    """The warm-up's app connection closed too (--upstream-max-idle 0 closes it after its
    answer, which can be after the client's): the baseline must not count it."""
    gauge = "tls_sidecar_upstream_connections_active"
    wait_for(
        lambda: proxy.metric(gauge, 'state="idle"') == 0 == proxy.metric(gauge, 'state="busy"'),
        what="no app connection open",
    )


def open_fds(proxy: ProxyProcess) -> int:
    """The proxy's open descriptors, less the admin port's sockets (our own /metrics calls)."""
    assert proxy.proc is not None
    pid = proxy.proc.pid
    admin_inodes = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == proxy.admin_port:
                admin_inodes.add(fields[9])
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not (target.startswith("socket:[") and target[8:-1] in admin_inodes):
            count += 1
    return count


def test_reused_connection_closed_by_the_app_is_retried_once_without_a_body(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(upstream.base)
    second = f"/once/second-{proxy.port}"  # the app outlives the proxy of each codec
    assert https(proxy, ca, path="/once/first")[0] == 200  # leaves a pooled connection
    before = upstream.connections
    status, _, body = https(proxy, ca, path=second)  # reuses it; the app closes it unanswered
    assert status == 200, body
    assert upstream.connections == before + 1, "sent once more, on a new connection"
    assert upstream.count(second) == 2


def test_reused_connection_closed_by_the_app_is_not_retried_with_a_body(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(upstream.base)
    post = f"/once/post-{proxy.port}"
    assert https(proxy, ca, path="/once/warm")[0] == 200
    status, _, body = https(proxy, ca, method="POST", path=post, body=b"not idempotent")
    assert status == 502, body
    assert upstream.count(post) == 1, "a request with a body is never sent twice"


def abort_mid_upload(port: int, ca: Path) -> None:
    with tls_socket(port, ca) as sock:
        sock.sendall(
            request_bytes("POST", "/echo/abort-up", {"Content-Length": str(10 * 1024 * 1024)})
        )
        sock.sendall(b"x" * 200_000)


def abort_mid_download(port: int, ca: Path) -> None:
    with tls_socket(port, ca) as sock:
        sock.sendall(request_bytes("GET", "/bytes/20000000"))
        sock.recv(65536)


def abort_while_app_stalls(port: int, ca: Path) -> None:
    with tls_socket(port, ca) as sock:
        sock.sendall(request_bytes("GET", "/stall"))


def abort_mid_handshake(port: int, _ca: Path) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")


def reset_by_app(port: int, ca: Path) -> None:
    with tls_socket(port, ca) as sock:
        sock.sendall(request_bytes("GET", "/reset-mid"))
        try:
            while sock.recv(65536):
                pass
        except (ConnectionResetError, ssl.SSLError):
            pass


ABORTS = [
    abort_mid_upload,
    abort_mid_download,
    abort_while_app_stalls,
    abort_mid_handshake,
    reset_by_app,
]


@pytest.mark.parametrize("abort", ABORTS, ids=[a.__name__ for a in ABORTS])
def test_client_going_away_frees_everything(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path, abort: object
) -> None:
    proxy = start_proxy(upstream.base, "--upstream-max-idle", "0", "--upstream-timeout", "30s")
    assert https(proxy, ca, path="/echo/warm")[0] == 200
    wait_for(lambda: proxy.metric("tls_sidecar_connections_active") == 0)
    at_rest(proxy)
    baseline = open_fds(proxy)
    abort(proxy.port, ca)  # type: ignore[operator]
    wait_for(
        lambda: proxy.metric("tls_sidecar_connections_active") == 0,
        what="the client connection forgotten",
    )
    wait_for(
        lambda: proxy.metric("tls_sidecar_http_requests_in_flight") == 0,
        what="no request in flight",
    )
    wait_for(
        lambda: proxy.metric("tls_sidecar_upstream_connections_active", 'state="busy"') == 0,
        what="upstream freed",
    )
    wait_for(lambda: open_fds(proxy) == baseline, what=f"file descriptors back to {baseline}")
    assert https(proxy, ca, path="/echo/after")[0] == 200


def test_1000_aborted_exchanges_leave_no_descriptor_or_gauge_behind(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    proxy = start_proxy(
        upstream.base, "--upstream-max-idle", "0", "--upstream-timeout", "30s", "--no-access-log"
    )
    assert https(proxy, ca, path="/echo/warm")[0] == 200
    wait_for(lambda: proxy.metric("tls_sidecar_connections_active") == 0)
    at_rest(proxy)
    baseline = open_fds(proxy)
    errors: list[BaseException] = []

    def run(worker: int) -> None:
        for i in range(200):
            try:
                ABORTS[(worker + i) % len(ABORTS)](proxy.port, ca)
            except (OSError, ssl.SSLError) as e:
                errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert proxy.metric("tls_sidecar_connections_accepted_total") >= 1000
    wait_for(
        lambda: proxy.metric("tls_sidecar_connections_active") == 0,
        30,
        "every connection forgotten",
    )
    wait_for(
        lambda: proxy.metric("tls_sidecar_http_requests_in_flight") == 0, 30, "no request in flight"
    )
    wait_for(
        lambda: proxy.metric("tls_sidecar_upstream_connections_active") == 0,
        30,
        "no upstream connection",
    )
    wait_for(lambda: open_fds(proxy) == baseline, 30, f"file descriptors back to {baseline}")
    assert https(proxy, ca, path="/echo/after")[0] == 200
    assert len(errors) < 50, errors[:5]  # the clients' own errors (resets) are expected, rarely
