"""gRPC through the proxy: a grpcio client over TLS (HTTP/2), a grpcio server behind
`--upstream h2c://`, generic handlers (no generated code). Every call kind, big messages,
deadlines, cancellation both ways, statuses set by the app, the gRPC health protocol, and the
proxy's own errors answered in gRPC's terms."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from proxy.tls import certs
from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.proxy import DevCerts, ProxyProcess, wait_for

MiB = 1024 * 1024
BIG = [("grpc.max_receive_message_length", 8 * MiB), ("grpc.max_send_message_length", 8 * MiB)]


class EchoApp:
    """The gRPC app: `test.Echo` with one method per call kind, and the health service."""

    def __init__(self, port: int = 0) -> None:
        self.cancelled = threading.Event()
        self.calls = 0  # Unary and Slow calls taken
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=BIG)
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
            "NotFound": grpc.unary_unary_rpc_method_handler(self.not_found),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "Forever": grpc.unary_stream_rpc_method_handler(self.forever),
            "Stall": grpc.unary_stream_rpc_method_handler(self.stall),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Echo", handlers),)
        )
        self.health = health.HealthServicer()
        self.health.set("test.Echo", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.server.start()

    def server_calls(self) -> int:
        return self.calls

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        context.set_trailing_metadata((("x-app-trailer", "seen"),))
        return request

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.calls += 1
        context.add_callback(self.cancelled.set)
        seconds = float(request.decode())
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and context.is_active():
            time.sleep(0.01)
        return b"slow done"

    def not_found(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())
        raise AssertionError("abort raises")

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request.decode())):
            yield b"message %d" % i

    def forever(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)
        while context.is_active():
            yield b"tick"
            time.sleep(0.01)

    def stall(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        """One message, then nothing until the call is gone."""
        yield b"first"
        while context.is_active():
            time.sleep(0.01)

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        sizes = [len(r) for r in requests]
        return b"%d messages, %d bytes" % (len(sizes), sum(sizes))

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield b"echo " + request

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture(scope="module")
def app() -> Iterator[EchoApp]:
    echo = EchoApp()
    yield echo
    echo.stop()


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every test here runs once per HTTP/2 codec (the clients' side, and h2c to the app)."""
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def proxy(start_proxy: ProxyFactory, app: EchoApp) -> ProxyProcess:
    return start_proxy(f"h2c://127.0.0.1:{app.port}", "--upstream-timeout", "2s")


def channel(proxy: ProxyProcess, ca: Path, **keys: Any) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(), **keys)
    return grpc.secure_channel(f"localhost:{proxy.port}", credentials, options=BIG)


@pytest.fixture
def chan(proxy: ProxyProcess, dev_certs: DevCerts) -> Iterator[grpc.Channel]:
    with channel(proxy, dev_certs.ca) as ch:
        yield ch


def test_unary_call_reaches_the_app_and_its_trailers_come_back(
    chan: grpc.Channel, proxy: ProxyProcess
) -> None:
    call = chan.unary_unary("/test.Echo/Unary")
    response, info = call.with_call(b"hello", timeout=10)
    assert response == b"hello"
    assert ("x-app-trailer", "seen") in info.trailing_metadata()
    record = wait_for(
        lambda: next((r for r in proxy.access_records() if r["path"] == "/test.Echo/Unary"), None),
        what="the access-log line",
    )
    assert record["protocol"] == "h2"
    assert record["grpc_status"] == "0"


def test_server_streaming(chan: grpc.Channel) -> None:
    call = chan.unary_stream("/test.Echo/ServerStream")
    assert list(call(b"50", timeout=10)) == [b"message %d" % i for i in range(50)]


def test_client_streaming(chan: grpc.Channel) -> None:
    call = chan.stream_unary("/test.Echo/ClientStream")
    assert call(iter([b"x" * 1000] * 200), timeout=10) == b"200 messages, 200000 bytes"


def test_bidi_streaming_goes_both_ways_at_once(chan: grpc.Channel) -> None:
    """Each reply arrives before the next request is sent: nothing waits for the stream's end."""
    call = chan.stream_stream("/test.Echo/Bidi")
    outbox: list[bytes] = []
    ready = threading.Semaphore(0)

    def requests() -> Iterator[bytes]:
        for i in range(20):
            outbox.append(b"%d" % i)
            yield b"%d" % i
            assert ready.acquire(timeout=10), "the reply to the last request did not arrive"

    replies = []
    for reply in call(requests(), timeout=20):
        replies.append(reply)
        ready.release()
    assert replies == [b"echo " + m for m in outbox]


def test_a_4_mib_message_both_ways(chan: grpc.Channel) -> None:
    payload = bytes(range(256)) * (4 * MiB // 256)
    assert chan.unary_unary("/test.Echo/Unary")(payload, timeout=30) == payload


def test_status_and_details_set_by_the_app_reach_the_client(
    chan: grpc.Channel, proxy: ProxyProcess
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        chan.unary_unary("/test.Echo/NotFound")(b"thing-42", timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no such thing: thing-42"
    record = wait_for(
        lambda: next(
            (r for r in proxy.access_records() if r["path"] == "/test.Echo/NotFound"), None
        ),
        what="the access-log line",
    )
    assert record["grpc_status"] == "5"
    assert proxy.metric("tls_sidecar_grpc_responses_total", 'grpc_status="5"') >= 1


def test_a_client_deadline_expires_and_the_app_sees_the_cancellation(
    chan: grpc.Channel, app: EchoApp
) -> None:
    app.cancelled.clear()
    with pytest.raises(grpc.RpcError) as caught:
        chan.unary_unary("/test.Echo/Slow")(b"5", timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert app.cancelled.wait(5), "the app's stream was not reset when the client gave up"


def test_the_proxys_upstream_timeout_is_deadline_exceeded(
    chan: grpc.Channel, proxy: ProxyProcess
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        chan.unary_unary("/test.Echo/Slow")(b"4", timeout=20)  # --upstream-timeout 2s
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "504 Gateway Timeout: request id" in (caught.value.details() or "")


def test_an_app_stalled_mid_stream_is_deadline_exceeded(
    chan: grpc.Channel, proxy: ProxyProcess
) -> None:
    """The response's head and a message went out, then the app says nothing past
    --upstream-timeout: the call ends DEADLINE_EXCEEDED (Envoy's answer), not CANCELLED."""
    call = chan.unary_stream("/test.Echo/Stall")(b"", timeout=20)
    assert next(call) == b"first"
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stalled" in (caught.value.details() or "")


def test_a_cancelled_stream_is_reset_at_the_app(chan: grpc.Channel, app: EchoApp) -> None:
    app.cancelled.clear()
    call = chan.unary_stream("/test.Echo/Forever")(b"", timeout=20)
    assert next(call) == b"tick"
    call.cancel()
    assert app.cancelled.wait(5), "the client's RST_STREAM did not reach the app"


def test_the_health_checking_protocol_works_through_the_proxy(chan: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(chan)
    reply = stub.Check(health_pb2.HealthCheckRequest(service="test.Echo"), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_app_down_is_unavailable(
    start_proxy: ProxyFactory, dev_certs: DevCerts, refused_port: int
) -> None:
    down = start_proxy(f"h2c://127.0.0.1:{refused_port}")
    with channel(down, dev_certs.ca) as ch, pytest.raises(grpc.RpcError) as caught:
        ch.unary_unary("/test.Echo/Unary")(b"hello", timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details() or ""
    assert details.startswith("502 Bad Gateway: request id"), details
    assert "127.0.0.1" not in details  # the app's address stays in the log
    record = wait_for(lambda: next(iter(down.access_records()), None), what="an access line")
    assert (record["status"], record["grpc_status"], record["local"]) == (
        200,
        "14",
        "upstream_refused",
    )
    assert down.metric("tls_sidecar_grpc_responses_total", 'grpc_status="14"') == 1


def test_calls_in_flight_finish_when_the_app_stops_gracefully(
    start_proxy: ProxyFactory, dev_certs: DevCerts
) -> None:
    """An app that stops with a grace period (a rollout) says GOAWAY and finishes the calls it
    took (RFC 9113 §6.8): they reach the client whole, and the next call gets a new
    connection to a new app."""
    first = EchoApp()
    proxy = start_proxy(f"h2c://127.0.0.1:{first.port}")
    with channel(proxy, dev_certs.ca) as ch:
        assert ch.unary_unary("/test.Echo/Unary")(b"warm", timeout=10) == b"warm"
        slow = ch.unary_unary("/test.Echo/Slow").future(b"1.5", timeout=20)
        wait_for(lambda: first.server_calls() >= 2, what="the slow call at the app")
        stopped = first.server.stop(grace=10)
        assert slow.result() == b"slow done"
        assert stopped.wait(10)
        second = EchoApp(first.port)  # the new version, on the same port
        try:
            assert ch.unary_unary("/test.Echo/Unary")(b"again", timeout=10) == b"again"
            assert second.server_calls() == 1
        finally:
            second.stop()


def test_a_body_over_the_limit_is_resource_exhausted(
    start_proxy: ProxyFactory, app: EchoApp, dev_certs: DevCerts
) -> None:
    small = start_proxy(f"h2c://127.0.0.1:{app.port}", "--max-body-bytes", "1KiB")
    with channel(small, dev_certs.ca) as ch:
        assert ch.unary_unary("/test.Echo/Unary")(b"small", timeout=10) == b"small"
        with pytest.raises(grpc.RpcError) as caught:
            ch.unary_unary("/test.Echo/Unary")(b"x" * 4096, timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_refused_client_certificate_is_permission_denied(
    start_proxy: ProxyFactory, app: EchoApp, dev_certs: DevCerts, tmp_path: Path
) -> None:
    ca = certs.create_ca("clients CA")
    (tmp_path / "clients.crt").write_bytes(ca.cert_pem)
    mtls = start_proxy(
        f"h2c://127.0.0.1:{app.port}",
        "--client-ca",
        str(tmp_path / "clients.crt"),
        "--client-auth",
        "optional",
        "--allow-cn",
        "billing",
    )
    allowed = certs.issue(ca, [], common_name="billing", client=True)
    other = certs.issue(ca, [], common_name="intruder", client=True)
    with channel(
        mtls, dev_certs.ca, private_key=allowed.key_pem, certificate_chain=allowed.cert_pem
    ) as ch:
        assert ch.unary_unary("/test.Echo/Unary")(b"ok", timeout=10) == b"ok"
    with (
        channel(
            mtls, dev_certs.ca, private_key=other.key_pem, certificate_chain=other.cert_pem
        ) as ch,
        pytest.raises(grpc.RpcError) as caught,
    ):
        ch.unary_unary("/test.Echo/Unary")(b"ok", timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_grpcio_trusts_what_certs_init_makes(
    start_proxy: ProxyFactory, app: EchoApp, tmp_path: Path
) -> None:
    """grpcio verifies with BoringSSL, which checks fewer kinds of name constraints than
    OpenSSL: the development CA, server and client certificates of `certs init` pass it, by name
    and by address, with mutual TLS too."""
    made = subprocess.run(
        [sys.executable, "-m", "proxy", "certs", "init", "--certs-dir", str(tmp_path / "certs")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    files = tmp_path / "certs"
    dev = DevCerts(files / "ca.crt", files / "server.crt", files / "server.key", files)
    mtls = start_proxy(
        f"h2c://127.0.0.1:{app.port}",
        "--cert",
        str(dev.cert),
        "--key",
        str(dev.key),
        "--client-ca",
        str(dev.ca),
        "--allow-cn",
        "tls-sidecar-dev-client",
        with_cert=False,
    )
    keys = {
        "private_key": (files / "client.key").read_bytes(),
        "certificate_chain": (files / "client.crt").read_bytes(),
    }
    credentials = grpc.ssl_channel_credentials(root_certificates=dev.ca.read_bytes(), **keys)
    for target in (f"localhost:{mtls.port}", f"127.0.0.1:{mtls.port}"):
        with grpc.secure_channel(target, credentials) as ch:
            assert ch.unary_unary("/test.Echo/Unary")(b"dev", timeout=10) == b"dev", target
