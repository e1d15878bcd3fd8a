"""The data path over real TLS: forwarding, streaming, keep-alive, pipelining, WebSocket."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from pathlib import Path

import pytest
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from tests.conftest import ProxyFactory
from tests.support.proxy import (
    DevCerts,
    ProxyProcess,
    RawClient,
    client_context,
    https,
    request_bytes,
    tls_socket,
    wait_for,
)
from tests.support.upstream import SlowReaderApp, UpstreamApp, pattern

MiB = 1024 * 1024


def echo(proxy: ProxyProcess, ca: Path, **kwargs: object) -> dict[str, object]:
    status, _, body = https(proxy, ca, **kwargs)  # type: ignore[arg-type]
    assert status == 200, body
    return dict(json.loads(body))


def header(doc: dict[str, object], name: str) -> list[str]:
    return [v for n, v in doc["headers"] if n == name]  # type: ignore[attr-defined]


def test_request_reaches_app_with_forwarded_headers(proxy: ProxyProcess, ca: Path) -> None:
    doc = echo(
        proxy,
        ca,
        method="POST",
        path="/echo/x?q=1",
        body=b"hello",
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "http",
            "Forwarded": "for=6.6.6.6",
        },
    )
    assert doc["method"] == "POST"
    assert doc["path"] == "/echo/x?q=1"
    assert doc["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert header(doc, "host") == [f"localhost:{proxy.port}"]
    assert header(doc, "x-forwarded-for") == ["127.0.0.1"], "a client's X-Forwarded-For is replaced"
    assert header(doc, "x-forwarded-proto") == ["https"]
    assert header(doc, "x-forwarded-host") == [f"localhost:{proxy.port}"]
    assert header(doc, "x-forwarded-port") == [str(proxy.port)]
    assert header(doc, "forwarded") == [], "an untrusted Forwarded header is dropped"
    assert len(header(doc, "x-request-id")[0]) == 32


def test_request_id_is_passed_through_and_returned_in_access_log(
    proxy: ProxyProcess, ca: Path
) -> None:
    doc = echo(proxy, ca, path="/echo/rid", headers={"X-Request-Id": "abc-123"})
    assert header(doc, "x-request-id") == ["abc-123"]
    record = wait_for(
        lambda: next((r for r in proxy.access_records() if r["request_id"] == "abc-123"), None),
        what="the access log line",
    )
    assert record["path"] == "/echo/rid"
    assert record["status"] == 200
    assert record["method"] == "GET"
    assert record["client"] == "127.0.0.1"
    assert record["tls"] in ("TLSv1.2", "TLSv1.3")
    assert (
        record["bytes_out"] > 0 and record["duration_ms"] > 0 and record["upstream_ms"] is not None
    )


def test_trusted_forwarded_headers_are_kept_and_extended(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    trusting = start_proxy(upstream.base, "--trust-forwarded-headers")
    doc = echo(
        trusting,
        ca,
        path="/echo/t",
        headers={"X-Forwarded-For": "10.1.2.3", "X-Forwarded-Proto": "http"},
    )
    assert header(doc, "x-forwarded-for") == ["10.1.2.3, 127.0.0.1"]
    assert header(doc, "x-forwarded-proto") == ["http"]


def test_hop_by_hop_headers_are_stripped_both_ways(proxy: ProxyProcess, ca: Path) -> None:
    doc = echo(
        proxy,
        ca,
        path="/echo/hop",
        headers={
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "do-not-forward",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "X-Forwarded-Client-Cert": "By=spoofed",
            "X-Kept": "yes",
        },
    )
    names = {n for n, _ in doc["headers"]}  # type: ignore[attr-defined]
    assert not names & {
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-forwarded-client-cert",
    }
    assert header(doc, "x-kept") == ["yes"]
    status, response_headers, body = https(proxy, ca, path="/hop")
    assert status == 200 and body == b"hop"
    assert "x-internal" not in response_headers and "keep-alive" not in response_headers
    assert response_headers.get("x-app") == "kept"


def test_response_streams_before_the_app_finishes(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    gate = f"stream-{proxy.port}"  # the app outlives this module's proxy of each codec
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(request_bytes("GET", f"/gate/{gate}"))
        received = b""
        while b"first;" not in received:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the first chunk"
            received += chunk
        assert b"last" not in received, "the app has not sent its last chunk yet"
        upstream.open_gate(gate)
        while b"0\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
        assert b"last" in received


def test_10_mib_upload_is_byte_exact(proxy: ProxyProcess, ca: Path) -> None:
    data = pattern(10 * MiB)
    doc = echo(proxy, ca, method="PUT", path="/echo/upload", body=data)
    assert doc["body_length"] == len(data)
    assert doc["body_sha256"] == hashlib.sha256(data).hexdigest()


def test_10_mib_chunked_upload_is_byte_exact(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    # The default --upstream-timeout: over TCP the app's own receive buffer can hold megabytes
    # of the body when the request ends, and on a loaded machine the app may take longer than
    # the `proxy` fixture's 2 s to read and hash them; what this test checks is the bytes.
    proxy = start_proxy(upstream.base)
    data = pattern(10 * MiB)
    conn = http.client.HTTPSConnection(
        "localhost", proxy.port, context=client_context(ca), timeout=30
    )
    conn.request(
        "POST",
        "/echo/chunked-upload",
        body=iter([data[i : i + 100_000] for i in range(0, len(data), 100_000)]),
        encode_chunked=True,
    )
    response = conn.getresponse()
    doc = json.loads(response.read())
    conn.close()
    assert doc["body_length"] == len(data)
    assert doc["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert ["transfer-encoding", "chunked"] in doc["headers"]


def test_the_upstream_timeout_waits_while_the_app_is_still_reading_the_body(
    start_proxy: ProxyFactory, tmp_path: Path, ca: Path
) -> None:
    # --upstream-timeout counts from the end of the request as the app gets it: an app still
    # reading an upload, steadily, is not late. It got 504 while the body's last few hundred
    # KiB still waited in the proxy's buffers. Over a unix socket the kernel tells the proxy
    # what the app has not read.
    app = SlowReaderApp(str(tmp_path / "slow.sock"))
    try:
        proxy = start_proxy(f"unix:{app.path}", "--upstream-timeout", "1s")  # the read takes 2.6 s
        data = pattern(MiB)
        status, _, body = https(proxy, ca, "POST", "/upload", body=data, timeout=60)
        assert (status, body) == (200, hashlib.sha256(data).hexdigest().encode())
        assert proxy.metric("tls_sidecar_timeouts_total", 'phase="upstream"') == 0
    finally:
        app.stop()


def test_10_mib_downloads_are_byte_exact(proxy: ProxyProcess, ca: Path) -> None:
    for path in ("/bytes/10485760", "/chunked/10485760"):
        status, headers, body = https(proxy, ca, path=path)
        assert status == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(pattern(10 * MiB)).digest(), path
    _, headers, _ = https(proxy, ca, path="/bytes/10485760")
    assert headers["content-length"] == str(10 * MiB)


def test_keep_alive_reuses_client_and_upstream_connections(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    conn = http.client.HTTPSConnection(
        "localhost", proxy.port, context=client_context(ca), timeout=10
    )
    before = upstream.connections
    for i in range(20):
        conn.request("GET", f"/echo/keepalive/{i}")
        response = conn.getresponse()
        assert response.status == 200
        response.read()
    sock = conn.sock
    conn.request("GET", "/echo/keepalive/last")
    conn.getresponse().read()
    assert conn.sock is sock, "the client connection was kept open"
    conn.close()
    assert upstream.connections - before <= 2, (
        "upstream connections are pooled, not one per request"
    )


def test_pipelined_requests_are_answered_in_order(proxy: ProxyProcess, ca: Path) -> None:
    with tls_socket(proxy.port, ca) as sock:
        client = RawClient(sock)
        client.send(b"".join(request_bytes("GET", f"/echo/pipe/{i}") for i in range(5)))
        for i in range(5):
            response = client.read_response()
            assert response is not None and response.status == 200
            assert json.loads(response.body)["path"] == f"/echo/pipe/{i}"


def test_head_204_and_304_have_no_body_and_keep_the_connection(
    proxy: ProxyProcess, ca: Path
) -> None:
    with tls_socket(proxy.port, ca) as sock:
        client = RawClient(sock)
        client.send(request_bytes("HEAD", "/bytes/1000"))
        head = client.read_response(method=b"HEAD")
        assert head is not None and head.status == 200 and head.body == b""
        assert head.header("content-length") == "1000"
        for status in (204, 304):
            client.send(request_bytes("GET", f"/status/{status}"))
            response = client.read_response()
            assert response is not None and response.status == status and response.body == b""
        client.send(request_bytes("GET", "/echo/after"))
        after = client.read_response()
        assert after is not None and after.status == 200


def test_expect_100_continue_is_relayed(proxy: ProxyProcess, ca: Path) -> None:
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(
            request_bytes("POST", "/echo/expect", {"Expect": "100-continue", "Content-Length": "5"})
        )
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 100 "), received
        sock.sendall(b"hello")
        client = RawClient(sock)
        rest = received.split(b"\r\n\r\n", 1)[1]
        if rest:
            client.h11.receive_data(rest)
        response = client.read_response()
        assert response is not None and response.status == 200
        assert json.loads(response.body)["body_length"] == 5


def test_http10_request_without_host_is_served(proxy: ProxyProcess, ca: Path) -> None:
    with tls_socket(proxy.port, ca) as sock:
        sock.sendall(b"GET /echo/old HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data[:100]
        assert b'"/echo/old"' in data


def test_websocket_echo_through_the_proxy(proxy: ProxyProcess, ca: Path) -> None:
    with tls_socket(proxy.port, ca) as sock:
        ws = WSConnection(ConnectionType.CLIENT)
        sock.sendall(ws.send(Request(host="localhost", target="/ws")))
        messages: list[str] = []
        accepted = False
        sent = False
        while len(messages) < 2:
            ws.receive_data(sock.recv(65536))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, TextMessage):
                    messages.append(event.data)
            if accepted and not sent:
                sock.sendall(ws.send(TextMessage(data="one")) + ws.send(TextMessage(data="two")))
                sent = True
        assert messages == ["echo:one", "echo:two"]
        sock.sendall(ws.send(CloseConnection(code=1000)))
        closed = False
        while not closed:
            data = sock.recv(65536)
            if not data:
                break
            ws.receive_data(data)
            closed = any(isinstance(e, CloseConnection) for e in ws.events())
    # One more access line when the session ends: how long, and the bytes each way.
    ended = wait_for(
        lambda: next(
            (r for r in proxy.access_records() if r.get("event") == "websocket_end"), None
        ),
        10,
        "the WebSocket session's line",
    )
    assert (ended["path"], ended["status"], ended["upstream_status"]) == ("/ws", 101, 101)
    assert ended["bytes_in"] > 0 and ended["bytes_out"] > 0 and ended["duration_ms"] > 0


def test_the_access_log_says_who_what_and_how(proxy: ProxyProcess, ca: Path) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    doc = echo(
        proxy,
        ca,
        path="/echo/logged",
        headers={
            "User-Agent": "grep-me/1.0",
            "traceparent": traceparent,
            "tracestate": "vendor=opaque",
        },
    )
    assert header(doc, "traceparent") == [traceparent]  # passed on untouched
    assert header(doc, "tracestate") == ["vendor=opaque"]
    record = wait_for(
        lambda: next((r for r in proxy.access_records() if r["path"] == "/echo/logged"), None),
        10,
        "the access line",
    )
    assert record["user_agent"] == "grep-me/1.0"
    assert record["host"].startswith("localhost")
    assert record["sni"] == "localhost"
    assert record["cipher"] and record["tls"].startswith("TLSv1.")
    assert record["upstream_status"] == 200
    assert record["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "local" not in record


def test_admin_paths_on_the_tls_port_go_to_the_app(proxy: ProxyProcess, ca: Path) -> None:
    doc = echo(proxy, ca, path="/metrics")
    assert doc["path"] == "/metrics", "the TLS port never serves admin endpoints"


def test_unix_socket_upstream(start_proxy: ProxyFactory, tmp_path: Path, ca: Path) -> None:
    app = UpstreamApp(unix_path=str(tmp_path / "app.sock")).start()
    try:
        proxy = start_proxy(f"unix:{app.unix_path}")
        doc = echo(proxy, ca, path="/echo/unix")
        assert doc["path"] == "/echo/unix"
        assert header(doc, "host") == [f"localhost:{proxy.port}"]
    finally:
        app.stop()


def test_ipv6_listener(
    start_proxy: ProxyFactory, upstream: UpstreamApp, dev_certs: DevCerts, ca: Path
) -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("this machine has no IPv6 loopback")
    proxy = ProxyProcess(
        [
            "serve",
            "--listen",
            "[::1]:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--upstream",
            upstream.base,
            "--cert",
            str(dev_certs.cert),
            "--key",
            str(dev_certs.key),
        ]
    ).start()
    try:
        raw = socket.create_connection(("::1", proxy.port), timeout=10)
        with client_context(ca).wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(request_bytes("GET", "/echo/v6"))
            response = RawClient(sock).read_response()
            assert response is not None and response.status == 200
            assert json.loads(response.body)["headers"][-5] == ["x-forwarded-for", "::1"]
    finally:
        proxy.stop()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_the_ipv6_wildcard_serves_ipv4_and_ipv6_clients(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path
) -> None:
    # As nginx's and Envoy's [::]: one socket for both families (asyncio alone is IPv6-only).
    proxy = start_proxy(upstream.base, "--listen", "[::]:0", "--admin-listen", "[::]:0")
    hosts = ["127.0.0.1", "::1"] if ipv6_loopback() else ["127.0.0.1"]
    for host in hosts:
        with tls_socket(proxy.port, ca, host=host) as sock:
            sock.sendall(request_bytes("GET", "/echo/dual"))
            response = RawClient(sock).read_response()
            assert response is not None and response.status == 200, host
        with socket.create_connection((host, proxy.admin_port), timeout=10) as admin:
            admin.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert admin.makefile("rb").readline().startswith(b"HTTP/1.1 200"), host


def test_early_answer_before_the_body_keeps_the_connection(
    proxy: ProxyProcess, upstream: UpstreamApp, ca: Path
) -> None:
    """An app that answers before reading the whole body must not cost the client its
    connection: the rest of the body is relayed, then both connections are reused."""
    with tls_socket(proxy.port, ca) as sock:
        client = RawClient(sock)
        body = pattern(1024 * 1024)
        for i in range(3):
            head_and_start = (
                request_bytes("POST", "/early", {"Content-Length": str(len(body))}) + body[:1000]
            )
            client.send(head_and_start)
            response = client.read_response()  # the answer arrives while most of the body is unsent
            assert response is not None and response.status == 401, i
            assert response.body == b"early"
            client.send(body[1000:])
        client.send(request_bytes("GET", "/echo/after-early"))
        after = client.read_response()
        assert after is not None and after.status == 200
