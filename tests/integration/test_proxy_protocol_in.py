"""--accept-proxy-protocol: a TCP load balancer's PROXY header before the TLS handshake gives the
app, the access log and the metrics the original client's address; one that is missing,
malformed, too slow or from an address not in --proxy-protocol-from closes the connection.

Loopback is all of 127.0.0.0/8, so the client, the balancer and the proxy each get an address
of their own: the client connects from 127.0.0.2, the balancer (or the raw-header sender) from
127.0.0.3, and only 127.0.0.3 may send headers."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy import proxy_protocol as pp
from tests.conftest import ProxyFactory
from tests.e2e.test_cli import assert_one_line_error, run_cli
from tests.support.h2client import H2Client
from tests.support.proxy import (
    ProxyProcess,
    RawClient,
    client_context,
    request_bytes,
    tls_socket,
    wait_for,
)
from tests.support.upstream import UpstreamApp

CLIENT = "127.0.0.2"
BALANCER = "127.0.0.3"
HAPROXY = "/usr/sbin/haproxy"


@pytest.fixture(scope="module")
def pp_proxy(start_proxy: ProxyFactory, upstream: UpstreamApp) -> ProxyProcess:
    return start_proxy(
        upstream.base,
        "--accept-proxy-protocol",
        "--proxy-protocol-from",
        f"{BALANCER}/32",
        "--handshake-timeout",
        "2s",
    )


@contextlib.contextmanager
def with_header(port: int, ca: Path, header: bytes, source: str = BALANCER) -> Iterator[RawClient]:
    """A TLS client that sends `header` first, from `source`."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    raw.sendall(header)
    sock = client_context(ca).wrap_socket(raw, server_hostname="localhost")
    try:
        yield RawClient(sock)
    finally:
        sock.close()


def echoed_headers(client: RawClient, path: str) -> dict[str, str]:
    client.send(request_bytes("GET", path))
    response = client.read_response()
    assert response is not None
    assert response.status == 200
    return dict(json.loads(response.body)["headers"])


def rejected(proxy: ProxyProcess, reason: str) -> float:
    value = proxy.metric("tls_sidecar_connections_rejected_total", f'reason="{reason}"')
    return 0.0 if math.isnan(value) else value  # nan: never counted yet


def refused_before_tls(port: int, data: bytes, source: str = BALANCER) -> bool:
    """Send `data` (not finishing a header) and tell whether the proxy closes without a byte."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0)
    ) as sock:
        if data:
            sock.sendall(data)
        try:
            return sock.recv(1024) == b""
        except ConnectionResetError:
            return True


@pytest.mark.parametrize("version", [1, 2])
def test_the_header_s_client_reaches_the_app_and_the_access_log(
    pp_proxy: ProxyProcess, upstream: UpstreamApp, ca: Path, version: int
) -> None:
    source, destination = ("192.0.2.7", 56324), ("198.51.100.1", 443)
    header = pp.build_v1(source, destination) if version == 1 else pp.build_v2(source, destination)
    path = f"/echo/pp{version}-{uuid.uuid4().hex}"
    with with_header(pp_proxy.port, ca, header) as client:
        headers = echoed_headers(client, path)
    assert headers["x-forwarded-for"] == "192.0.2.7"
    assert headers["x-forwarded-port"] == "443"
    record = wait_for(
        lambda: next((r for r in pp_proxy.access_records() if r.get("path") == path), None),
        what="the access log line",
    )
    assert record["client"] == "192.0.2.7"


def test_an_http2_client_behind_the_balancer(pp_proxy: ProxyProcess, ca: Path) -> None:
    header = pp.build_v2(("2001:db8::7", 4444), ("2001:db8::1", 443))
    client = H2Client(pp_proxy.port, ca, preface=header, source=BALANCER)
    try:
        response = client.response(client.request(b"/echo/pp-h2"))
    finally:
        client.close()
    assert response.status == 200
    assert dict(json.loads(response.body)["headers"])["x-forwarded-for"] == "2001:db8::7"


def test_v2_local_keeps_the_balancer_s_own_address(pp_proxy: ProxyProcess, ca: Path) -> None:
    local = pp.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    with with_header(pp_proxy.port, ca, local) as client:
        headers = echoed_headers(client, "/echo/local")
    assert headers["x-forwarded-for"] == BALANCER


def test_no_header_is_refused_and_counted(pp_proxy: ProxyProcess, ca: Path) -> None:
    before = rejected(pp_proxy, "proxy_protocol_missing")
    raw = socket.create_connection(
        ("127.0.0.1", pp_proxy.port), timeout=10, source_address=(BALANCER, 0)
    )
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        client_context(ca).wrap_socket(raw, server_hostname="localhost")
    raw.close()
    wait_for(lambda: rejected(pp_proxy, "proxy_protocol_missing") == before + 1, what="counted")


def test_a_malformed_header_is_refused_and_counted(pp_proxy: ProxyProcess) -> None:
    before = rejected(pp_proxy, "proxy_protocol_malformed")
    assert refused_before_tls(pp_proxy.port, b"PROXY TCP4 192.0.2.7 nonsense 1 2\r\n")
    assert refused_before_tls(pp_proxy.port, pp.V2_SIGNATURE + bytes([0x21, 0x12, 0, 12]))
    wait_for(lambda: rejected(pp_proxy, "proxy_protocol_malformed") == before + 2, what="counted")


def test_half_a_header_is_cut_at_the_handshake_timeout(pp_proxy: ProxyProcess) -> None:
    before = rejected(pp_proxy, "proxy_protocol_timeout")
    assert refused_before_tls(pp_proxy.port, b"PROXY TCP4 192.0.2.7")
    assert rejected(pp_proxy, "proxy_protocol_timeout") == before + 1


@pytest.mark.parametrize("version", [1, 2])
def test_a_header_from_an_untrusted_address_is_refused(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path, version: int
) -> None:
    proxy = start_proxy(
        upstream.base, "--accept-proxy-protocol", "--proxy-protocol-from", "10.0.0.0/8"
    )
    source, destination = ("192.0.2.7", 1), ("198.51.100.1", 443)
    header = pp.build_v1(source, destination) if version == 1 else pp.build_v2(source, destination)
    before = rejected(proxy, "proxy_protocol_untrusted")
    assert refused_before_tls(proxy.port, header, source="127.0.0.1")
    assert rejected(proxy, "proxy_protocol_untrusted") == before + 1
    assert upstream.count("/echo/untrusted") == 0


def test_without_the_flag_a_header_is_not_read(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    """A plain proxy does not take a client's PROXY line for a header: the TLS layer gets it
    and the handshake fails."""
    proxy = start_proxy(upstream.base)
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r\n"
    with (
        pytest.raises((ssl.SSLError, ConnectionResetError, OSError)),
        with_header(proxy.port, ca, line) as client,
    ):
        echoed_headers(client, "/echo/plain")
    with tls_socket(proxy.port, ca) as sock:  # and it serves TLS as always
        assert echoed_headers(RawClient(sock), "/echo/plain")["x-forwarded-for"] == "127.0.0.1"


@pytest.mark.needs("haproxy", install="apt-get install haproxy", path=HAPROXY)
def test_haproxy_send_proxy_v2_gives_the_app_the_client_s_address(
    pp_proxy: ProxyProcess, ca: Path, tmp_path: Path
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n"
        "  mode tcp\n"
        "  timeout connect 5s\n"
        "  timeout client 30s\n"
        "  timeout server 30s\n"
        "frontend tls\n"
        # the listening socket the test made and holds: no port picked and released
        f"  bind fd@{listener.fileno()}\n"
        "  default_backend sidecar\n"
        "backend sidecar\n"
        f"  server s1 127.0.0.1:{pp_proxy.port} send-proxy-v2 source {BALANCER}\n"
    )
    haproxy = subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)],
        pass_fds=[listener.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        port = listener.getsockname()[1]
        raw = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as sock:
            headers = echoed_headers(RawClient(sock), f"/echo/haproxy-{uuid.uuid4().hex}")
        assert headers["x-forwarded-for"] == CLIENT
    finally:
        haproxy.terminate()
        output = haproxy.communicate(timeout=10)[0]
        listener.close()
    assert "ALERT" not in output, output


def test_accepting_without_from_stops_start_up_with_one_line() -> None:
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--accept-proxy-protocol",
    )  # fmt: skip
    assert_one_line_error(result, "--accept-proxy-protocol needs --proxy-protocol-from")


def test_env_vars_and_a_bad_cidr() -> None:
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        env={
            "TLS_SIDECAR_ACCEPT_PROXY_PROTOCOL": "true",
            "TLS_SIDECAR_PROXY_PROTOCOL_FROM": "10.0.0.0/8 10.0.0.0/33",
        },
    )  # fmt: skip
    assert_one_line_error(result, "TLS_SIDECAR_PROXY_PROTOCOL_FROM '10.0.0.0/33'")  # what was set
