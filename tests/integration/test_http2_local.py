"""The proxy's own answers over HTTP/2 (403 of the --allow-* rules, 408, 413, 502, 504, gRPC
trailers-only): each one reaches the client whole, is access-logged and counted, logs no
error, and leaves the connection serving the next stream. A body past --max-body-bytes gets its
413 through to curl and httpx, which read the answer only after sending their body."""

from __future__ import annotations

import math
import ssl
import subprocess
from pathlib import Path

import h2.errors
import h2.settings
import httpx
import pytest

from proxy.tls import certs
from tests.conftest import ProxyFactory
from tests.support.codecs import http2_env
from tests.support.h2client import H2Client
from tests.support.proxy import DevCerts, ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp

LIMIT = 100 * 1024  # --max-body-bytes


@pytest.fixture(scope="module")
def codec_env(http2_codec: str) -> dict[str, str]:
    """Every test here runs once per HTTP/2 codec (with its HTTP/1.1 pair to the app)."""
    return http2_env(http2_codec)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """A CA for client certificates, one certificate it admits and one it does not."""
    out = tmp_path_factory.mktemp("clients")
    ca = certs.create_ca("clients CA")
    (out / "ca.crt").write_bytes(ca.cert_pem)
    found = {}
    for name in ("billing", "intruder"):
        issued = certs.issue(ca, [], common_name=name, client=True)
        (out / f"{name}.crt").write_bytes(issued.cert_pem)
        certs.write_private(out / f"{name}.key", issued.key_pem)
        found[name] = (out / f"{name}.crt", out / f"{name}.key")
    found["ca"] = (out / "ca.crt", out / "ca.crt")
    return found


@pytest.fixture(scope="module")
def mtls(
    start_proxy: ProxyFactory, upstream: UpstreamApp, clients: dict[str, tuple[Path, Path]]
) -> ProxyProcess:
    return start_proxy(
        upstream.base,
        "--client-ca",
        str(clients["ca"][0]),
        "--client-auth",
        "optional",
        "--allow-cn",
        "billing",
        "--max-body-bytes",
        str(LIMIT),
        "--upstream-timeout",
        "1s",
        "--idle-timeout",
        "2s",
    )


@pytest.fixture
def log_mark(mtls: ProxyProcess) -> int:
    """Where this test's part of the proxy's log starts."""
    return len(mtls.stderr_lines)


def _no_error_logged(proxy: ProxyProcess, since: int) -> None:
    text = "\n".join(proxy.stderr_lines[since:])
    assert "Traceback" not in text
    assert "unexpected error" not in text
    errors = proxy.metric("tls_sidecar_http2_connection_errors_total", 'reason="internal_error"')
    assert math.isnan(errors) or errors == 0  # NaN: never counted


def _access(proxy: ProxyProcess, path: str, status: int) -> dict[str, object]:
    record = wait_for(
        lambda: next(
            (r for r in proxy.access_records() if r["path"] == path and r["status"] == status),
            None,
        ),
        what=f"the access line of {path}",
    )
    assert record["protocol"] == "h2"
    return dict(record)


def _counted(proxy: ProxyProcess, code: int) -> float:
    value = proxy.metric("tls_sidecar_http_requests_total", f'code="{code}",protocol="h2"')
    return 0.0 if math.isnan(value) else value


@pytest.mark.parametrize("who", ["no certificate", "intruder"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_refused_client_gets_403_and_the_connection_serves_on(
    mtls: ProxyProcess,
    log_mark: int,
    dev_certs: DevCerts,
    clients: dict[str, tuple[Path, Path]],
    who: str,
    method: str,
) -> None:
    before = _counted(mtls, 403)
    expected = "client_not_allowed" if who == "intruder" else "client_no_certificate"
    client = H2Client(
        mtls.port, dev_certs.ca, client_cert=None if who != "intruder" else clients[who]
    )
    try:
        path = f"/echo?403-{method}-{who.replace(' ', '-')}"
        body = b"x" * 1000 if method == "POST" else None
        first = client.response(client.request(path.encode(), method=method.encode(), body=body))
        assert first.status == 403
        assert first.reset is None
        again = client.response(client.request(b"/echo"))
        assert again.status == 403  # the same rule, on the same connection
        assert client.goaway is None
    finally:
        client.close()
    record = _access(mtls, path, 403)
    assert record["local"] == expected
    assert wait_for(lambda: _counted(mtls, 403) >= before + 2)
    _no_error_logged(mtls, log_mark)


@pytest.mark.parametrize(
    ("path", "headers", "status", "reason"),
    [
        ("/reset", [], 502, "upstream_closed"),
        ("/stall", [], 504, "upstream_timeout"),
        ("/reset", [(b"content-type", b"application/grpc")], 200, "upstream_closed"),
    ],
)
def test_answers_for_the_app_keep_the_connection(
    mtls: ProxyProcess,
    log_mark: int,
    dev_certs: DevCerts,
    clients: dict[str, tuple[Path, Path]],
    path: str,
    headers: list[tuple[bytes, bytes]],
    status: int,
    reason: str,
) -> None:
    client = H2Client(mtls.port, dev_certs.ca, client_cert=clients["billing"])
    try:
        sid = client.request(path.encode(), method=b"POST", headers=headers, body=b"{}")
        answer = client.response(sid, timeout=15)
        assert (answer.status, answer.reset) == (status, None)
        if headers:
            assert answer.header(b"grpc-status") == b"14"  # UNAVAILABLE, in the head alone
            assert answer.body == b""
        assert client.response(client.request(b"/echo")).status == 200
        assert client.goaway is None
    finally:
        client.close()
    assert _access(mtls, path, status)["local"] == reason
    assert mtls.metric("tls_sidecar_local_responses_total", f'reason="{reason}"') >= 1
    _no_error_logged(mtls, log_mark)


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_over_the_limit_gets_413_and_the_stream_ends_cleanly(
    mtls: ProxyProcess,
    log_mark: int,
    dev_certs: DevCerts,
    clients: dict[str, tuple[Path, Path]],
    declared: bool,
) -> None:
    """Declared (content-length) or found while relaying: the 413 goes out whole, the rest of
    the body is read and dropped, the client's END_STREAM ends the stream without a reset."""
    client = H2Client(mtls.port, dev_certs.ca, client_cert=clients["billing"])
    path = f"/echo?413-{declared}"
    body = b"y" * (3 * LIMIT)
    try:
        length = [(b"content-length", b"%d" % len(body))] if declared else []
        sid = client.request(path.encode(), method=b"POST", headers=length, end=False)
        for i in range(0, len(body), 16384):
            client.pump(lambda: client.conn.local_flow_control_window(sid) >= 16384, timeout=10)
            client.conn.send_data(sid, body[i : i + 16384], end_stream=i + 16384 >= len(body))
            client.flush()
        answer = client.response(sid)
        assert (answer.status, answer.reset) == (413, None)
        assert client.raw_resets() == {}  # not even NO_ERROR: the client finished sending
        assert client.response(client.request(b"/echo")).status == 200
    finally:
        client.close()
    assert _access(mtls, path, 413)["local"] == "body_too_large"
    _no_error_logged(mtls, log_mark)


def test_curl_and_httpx_see_the_413(
    mtls: ProxyProcess,
    log_mark: int,
    dev_certs: DevCerts,
    clients: dict[str, tuple[Path, Path]],
    tmp_path: Path,
) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"z" * (10 * LIMIT))
    cert, key = clients["billing"]
    url = f"https://localhost:{mtls.port}/echo"
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(dev_certs.ca),
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--data-binary",
            f"@{upload}",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (curl.returncode, curl.stdout, curl.stderr) == (0, "413 2", "")
    context = ssl.create_default_context(cafile=dev_certs.ca)
    context.load_cert_chain(cert, key)
    with httpx.Client(http2=True, verify=context, timeout=30) as client:
        data = upload.read_bytes()
        declared = client.post(url, content=data)
        streamed = client.post(url, content=iter([data[:50_000], data[50_000:]]))
        after = client.get(url)
    assert (declared.http_version, declared.status_code) == ("HTTP/2", 413)
    assert streamed.status_code == 413
    assert after.status_code == 200
    _no_error_logged(mtls, log_mark)


def test_a_stalled_request_body_gets_408(
    mtls: ProxyProcess, log_mark: int, dev_certs: DevCerts, clients: dict[str, tuple[Path, Path]]
) -> None:
    """A body that stops coming for --idle-timeout: 408 on its stream, then RST_STREAM
    NO_ERROR (the client is not sending); the connection serves on."""
    client = H2Client(mtls.port, dev_certs.ca, client_cert=clients["billing"])
    try:
        sid = client.request(b"/echo?408", method=b"POST", body=b"part", end=False)
        answer = client.response(sid, timeout=15)
        assert answer.status == 408
        assert answer.body.startswith(b"408 request body not received in time")
        client.pump(lambda: sid in client.raw_resets(), timeout=5)
        assert client.raw_resets() == {sid: h2.errors.ErrorCodes.NO_ERROR}
        assert client.response(client.request(b"/echo")).status == 200
    finally:
        client.close()
    assert _access(mtls, "/echo?408", 408)["local"] == "request_timeout"
    _no_error_logged(mtls, log_mark)


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [("/reset-mid/1000", b"14", "upstream_closed"), ("/gate/never", b"4", "upstream_timeout")],
)
def test_a_grpc_response_the_app_fails_mid_stream_ends_with_its_status(
    mtls: ProxyProcess,
    log_mark: int,
    dev_certs: DevCerts,
    clients: dict[str, tuple[Path, Path]],
    path: str,
    status: bytes,
    reason: str,
) -> None:
    """After the response's head: an app that crashes is UNAVAILABLE, one that stalls past
    --upstream-timeout DEADLINE_EXCEEDED, in trailers (as Envoy answers), not a reset that a
    gRPC client reads as INTERNAL or CANCELLED."""
    client = H2Client(mtls.port, dev_certs.ca, client_cert=clients["billing"])
    grpc = [(b"content-type", b"application/grpc")]
    try:
        answer = client.response(
            client.request(path.encode(), method=b"POST", headers=grpc, body=b""), timeout=15
        )
        assert (answer.status, answer.ended, answer.reset) == (200, True, None)
        assert answer.body  # the part the app sent
        assert dict(answer.trailers)[b"grpc-status"] == status
        assert client.response(client.request(b"/echo")).status == 200
    finally:
        client.close()
    record = _access(mtls, path, 200)
    assert (record["grpc_status"], record["local"]) == (status.decode(), reason)
    _no_error_logged(mtls, log_mark)


def test_a_client_that_stops_reading_is_the_clients_timeout(
    mtls: ProxyProcess, dev_certs: DevCerts, clients: dict[str, tuple[Path, Path]]
) -> None:
    """Windows wide open, but the client reads nothing: the stream is cut after --idle-timeout
    and counted as `timeouts_total{phase="send"}`, not as the app's (`upstream`)."""

    def count(phase: str) -> float:
        value = mtls.metric("tls_sidecar_timeouts_total", f'phase="{phase}"')
        return 0.0 if math.isnan(value) else value

    upstream, send = count("upstream"), count("send")
    wide = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1}
    client = H2Client(mtls.port, dev_certs.ca, settings=wide, client_cert=clients["billing"])
    try:
        client.conn.increment_flow_control_window(2**31 - 1 - 65535)
        client.request(b"/bytes/50000000")  # and never read
        wait_for(lambda: count("send") > send, timeout=15, what="the send timeout")
    finally:
        client.close()
    assert count("upstream") == upstream


def test_a_head_over_max_header_bytes_gets_431_on_its_stream(
    mtls: ProxyProcess, log_mark: int, dev_certs: DevCerts, clients: dict[str, tuple[Path, Path]]
) -> None:
    """A header list past --max-header-bytes (16 KiB here) but within twice it is a stream's
    431, as over HTTP/1.1; the connection serves on."""
    client = H2Client(mtls.port, dev_certs.ca, client_cert=clients["billing"])
    try:
        big = [(b"x-big", b"a" * 20_000)]
        answer = client.response(client.request(b"/echo?431", headers=big))
        assert (answer.status, answer.reset) == (431, None)
        assert client.goaway is None
        assert client.response(client.request(b"/echo")).status == 200
    finally:
        client.close()
    assert _access(mtls, "/echo?431", 431)["local"] == "header_too_large"
    _no_error_logged(mtls, log_mark)
