"""--spiffe-endpoint against a Workload API server on a unix socket (tests/support/spiffe_agent.py):
start-up with and without an agent, SVID and bundle rotation under HTTP/1.1 and HTTP/2 load,
an agent that restarts, a bad SVID refused, SPIFFE-ID rules and X-Forwarded-Client-Cert."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509

from proxy.tls import certs
from proxy.tls.spiffe import split_der
from proxy.tls.workload_api import (
    FETCH_X509_BUNDLES,
    FETCH_X509_SVID,
    SECURITY_HEADER,
    X509BundlesRequest,
    X509BundlesResponse,
    X509SVIDRequest,
    X509SVIDResponse,
)
from tests.support.proxy import (
    DevCerts,
    ProxyProcess,
    RawClient,
    request_bytes,
    serve_args,
    wait_for,
)
from tests.support.spiffe_agent import (
    SERVER_ID,
    TRUST_DOMAIN,
    FakeAgent,
    Identity,
    client_svid,
    new_svid,
)
from tests.support.upstream import UpstreamApp

CLIENT_ID = f"{TRUST_DOMAIN}/ns/default/sa/client"


@pytest.fixture
def ca() -> certs.Issued:
    return certs.create_ca("example.org SPIFFE CA")


@pytest.fixture
def agent(tmp_path: Path, ca: certs.Issued) -> Iterator[FakeAgent]:
    agent = FakeAgent(tmp_path / "agent.sock", Identity(new_svid(ca), [ca])).start()
    yield agent
    agent.stop()


def write_ca(tmp_path: Path, *cas: certs.Issued) -> Path:
    path = tmp_path / f"trust-{len(list(tmp_path.glob('trust-*')))}.pem"
    path.write_bytes(b"".join(c.cert_pem for c in cas))
    return path


def spiffe_proxy(agent_endpoint: str, upstream: UpstreamApp, *extra: str) -> ProxyProcess:
    return ProxyProcess(
        serve_args(upstream.base, None, "--spiffe-endpoint", agent_endpoint, *extra)
    )


def client_context(
    trust: Path, client: certs.Issued | None = None, tmp: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(trust))
    if client is not None:
        assert tmp is not None
        crt, key = tmp / f"client-{client.certificate.serial_number}.crt", tmp / "client.key"
        crt.write_bytes(client.cert_pem)
        key.write_bytes(client.key_pem)
        ctx.load_cert_chain(str(crt), str(key))
    return ctx


def served_serial(proxy: ProxyProcess, trust: Path) -> int:
    """The serial of the certificate a new connection is served."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        ctx = client_context(trust)
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def get(proxy: ProxyProcess, ctx: ssl.SSLContext, path: str = "/echo") -> httpx.Response:
    with httpx.Client(verify=ctx, timeout=10) as client:
        return client.get(f"https://localhost:{proxy.port}{path}")


# --- start-up -------------------------------------------------------------------------------
def waiting_admin_port(proxy: ProxyProcess) -> int:
    def line() -> dict[str, object] | None:
        for text in list(proxy.stderr_lines):
            if '"msg": "waiting for the certificate"' in text:
                return dict(json.loads(text))
        return None

    found = wait_for(line, 20, "the waiting line")
    admin = found["admin"]
    assert isinstance(admin, list)
    return int(str(admin[0]).rsplit(":", 1)[1])


def test_no_agent_waits_a_bounded_time_not_ready_then_one_line_error(
    tmp_path: Path, upstream: UpstreamApp
) -> None:
    endpoint = f"unix://{tmp_path}/absent.sock"
    proxy = spiffe_proxy(endpoint, upstream, "--spiffe-timeout", "3s").start(expect_ready=False)
    try:
        proxy.admin_port = waiting_admin_port(proxy)
        status, body = proxy.admin_get("/readyz")
        assert status == 503
        assert f"waiting for an X.509 SVID from {endpoint}" in body
        assert proxy.wait(60) == 2
    finally:
        proxy.stop()
    errors = [line for line in proxy.stderr_lines if line.startswith("tls-sidecar: error:")]
    assert len(errors) == 1, proxy.stderr_text()
    assert f"--spiffe-endpoint {endpoint}: no X.509 SVID within 3s" in errors[0]
    assert "cannot be reached" in errors[0] and "SPIRE agent runs" in errors[0]
    assert "Traceback" not in proxy.stderr_text()


def test_no_identity_issued_is_named_in_the_error(agent: FakeAgent, upstream: UpstreamApp) -> None:
    agent.deny()
    proxy = spiffe_proxy(agent.endpoint, upstream, "--spiffe-timeout", "2s").start(
        expect_ready=False
    )
    try:
        assert proxy.wait(60) == 2
    finally:
        proxy.stop()
    assert "the agent issued no identity to this workload (no identity issued)" in (
        proxy.stderr_text()
    )


def test_the_agent_refuses_a_call_without_the_security_header(agent: FakeAgent) -> None:
    with grpc.insecure_channel(f"unix:{agent.socket_path}") as channel:
        fetch = channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=X509SVIDRequest.SerializeToString,
            response_deserializer=X509SVIDResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            next(iter(fetch(X509SVIDRequest(), timeout=10)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert agent.refused_without_header == 1


def test_the_agents_bundle_stream_pushes_a_rotated_bundle(
    agent: FakeAgent, ca: certs.Issued
) -> None:
    new_ca = certs.create_ca("example.org SPIFFE CA 2")
    with grpc.insecure_channel(f"unix:{agent.socket_path}") as channel:
        fetch = channel.unary_stream(
            FETCH_X509_BUNDLES,
            request_serializer=X509BundlesRequest.SerializeToString,
            response_deserializer=X509BundlesResponse.FromString,
        )
        call = fetch(X509BundlesRequest(), timeout=10, metadata=(SECURITY_HEADER,))
        stream = iter(call)
        first = next(stream)
        agent.push(Identity(agent.identity.svid, [ca, new_ca]))
        rotated = next(stream)
        call.cancel()
    assert split_der(first.bundles[TRUST_DOMAIN]) == [ca.certificate]
    assert split_der(rotated.bundles[TRUST_DOMAIN]) == [ca.certificate, new_ca.certificate]


def test_serves_the_svid_once_the_agent_sends_it(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    try:
        trust = write_ca(tmp_path, ca)
        assert get(proxy, client_context(trust)).status_code == 200
        assert served_serial(proxy, trust) == agent.identity.svid.certificate.serial_number
        assert proxy.admin_get("/readyz")[0] == 200
        expiry = proxy.metric("tls_sidecar_certificate_expiry_timestamp_seconds", SERVER_ID)
        assert expiry == agent.identity.svid.certificate.not_valid_after_utc.timestamp()
        assert agent.refused_without_header == 0
    finally:
        proxy.stop()


# --- rotation -------------------------------------------------------------------------------
def test_a_rotation_that_comes_while_the_first_svid_loads_is_served(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    rotated = new_svid(ca)
    agent.rotate_at_once = Identity(rotated, [ca])
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    trust = write_ca(tmp_path, ca)
    try:
        new = rotated.certificate.serial_number
        wait_for(lambda: served_serial(proxy, trust) == new, 20, "the second SVID")
    finally:
        proxy.stop()


def load_loop(
    call: Callable[[], int], stop: threading.Event, results: list[int], limit: int = 3000
) -> threading.Thread:
    """Requests one after another until told to stop (at most `limit`); each status kept, a
    failure as 0."""

    def run() -> None:
        while not stop.is_set() and len(results) < limit:
            try:
                results.append(call())
            except (httpx.HTTPError, OSError):
                results.append(0)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
def test_rotation_under_load_fails_no_request(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp, http2: bool
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    trust = write_ca(tmp_path, ca)
    ctx = client_context(trust)
    stop = threading.Event()
    kept: list[int] = []
    fresh: list[int] = []
    versions: set[str] = set()
    try:
        with httpx.Client(verify=ctx, http2=http2, timeout=10) as keep_alive:

            def on_kept_connection() -> int:
                response = keep_alive.get(f"https://localhost:{proxy.port}/echo")
                versions.add(response.http_version)
                return response.status_code

            def on_new_connection() -> int:
                with httpx.Client(verify=ctx, http2=http2, timeout=10) as client:
                    return client.get(f"https://localhost:{proxy.port}/echo").status_code

            threads = [
                load_loop(on_kept_connection, stop, kept),
                load_loop(on_new_connection, stop, fresh, limit=1000),
            ]
            wait_for(lambda: len(kept) > 20 and len(fresh) > 5, 30, "load before the rotation")
            before = served_serial(proxy, trust)
            rotated = new_svid(ca)
            agent.push(Identity(rotated, [ca]))
            new = rotated.certificate.serial_number
            wait_for(lambda: served_serial(proxy, trust) == new, 20, "the rotated SVID")
            counted = (len(kept), len(fresh))
            wait_for(
                lambda: len(kept) > counted[0] + 20 and len(fresh) > counted[1] + 5,
                30,
                "load after the rotation",
            )
            stop.set()
            for thread in threads:
                thread.join(30)
        assert proxy.metric("tls_sidecar_certificate_reloads_total", 'result="success"') >= 1
    finally:
        stop.set()
        proxy.stop()
    assert before != new
    assert set(kept) == {200} and set(fresh) == {200}, "no request failed"
    assert versions == {"HTTP/2" if http2 else "HTTP/1.1"}


def test_bundle_rotation_admits_the_new_ca_and_then_refuses_the_old(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream, "--allow-uri-san", CLIENT_ID).start()
    new_ca = certs.create_ca("example.org SPIFFE CA 2")
    other_ca = certs.create_ca("other.org SPIFFE CA")
    trust = write_ca(tmp_path, ca, new_ca)
    old_client = client_context(trust, client_svid(ca, CLIENT_ID), tmp_path)
    new_client = client_context(trust, client_svid(new_ca, CLIENT_ID), tmp_path)
    federated_client = client_context(
        trust, client_svid(other_ca, CLIENT_ID.replace("example", "other")), tmp_path
    )
    try:
        assert get(proxy, old_client).status_code == 200
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):
            get(proxy, new_client)
        # The new CA joins the bundle (and a federated trust domain's bundle comes too)
        both = Identity(agent.identity.svid, [ca, new_ca], {"spiffe://other.org": [other_ca]})
        agent.push(both)
        wait_for(lambda: _admitted(proxy, new_client), 20, "the new CA admitted")
        assert get(proxy, old_client).status_code == 200
        assert _status(proxy, federated_client) == 403, "trusted, but not the allowed ID"
        # The SVID is issued by the new CA and the old one leaves the bundle
        agent.push(Identity(new_svid(new_ca), [new_ca]))
        wait_for(lambda: not _admitted(proxy, old_client), 20, "the old CA refused")
        assert get(proxy, new_client).status_code == 200
    finally:
        proxy.stop()


def _status(proxy: ProxyProcess, ctx: ssl.SSLContext) -> int:
    try:
        return get(proxy, ctx).status_code
    except (httpx.HTTPError, ssl.SSLError):
        return 0


def _admitted(proxy: ProxyProcess, ctx: ssl.SSLContext) -> bool:
    return _status(proxy, ctx) == 200


def test_agent_restart_serving_goes_on_and_the_next_rotation_is_picked_up(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    trust = write_ca(tmp_path, ca)
    try:
        first = served_serial(proxy, trust)
        agent.stop()
        wait_for(
            lambda: "lost the Workload API" in proxy.stderr_text(), 20, "the lost agent logged"
        )
        assert get(proxy, client_context(trust)).status_code == 200
        assert served_serial(proxy, trust) == first
        assert proxy.admin_get("/readyz")[0] == 200, "the last SVID is still valid"
        rotated = new_svid(ca)
        agent.identity = Identity(rotated, [ca])
        opened = agent.streams_opened
        agent.start()
        wait_for(lambda: agent.streams_opened > opened, 30, "the reconnect")
        new = rotated.certificate.serial_number
        wait_for(lambda: served_serial(proxy, trust) == new, 20, "the SVID after the restart")
        assert "connected to the Workload API again" in proxy.stderr_text()
    finally:
        proxy.stop()


def test_an_identity_withdrawn_while_serving_keeps_the_last_svid_and_says_why(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    trust = write_ca(tmp_path, ca)
    try:
        first = served_serial(proxy, trust)
        agent.deny()  # the registration entry deleted: PERMISSION_DENIED on the open stream
        wait_for(
            lambda: any(
                "lost the Workload API" in line and "issued no identity" in line
                for line in proxy.stderr_lines
            ),
            20,
            "the withdrawn identity logged",
        )
        assert served_serial(proxy, trust) == first
        assert get(proxy, client_context(trust)).status_code == 200
        lost = [line for line in proxy.stderr_lines if "lost the Workload API" in line]
        assert len(lost) == 1, "logged once, not once per retry"
    finally:
        proxy.stop()


def test_a_bad_svid_is_refused_counted_logged_and_the_old_one_kept(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    trust = write_ca(tmp_path, ca)
    try:
        first = served_serial(proxy, trust)
        mismatched = Identity(new_svid(ca), [ca], key=certs.new_key())
        agent.push(mismatched)
        wait_for(
            lambda: proxy.metric("tls_sidecar_certificate_reloads_total", 'result="failure"') == 1,
            20,
            "the refused SVID counted",
        )
        refusals = [line for line in proxy.stderr_lines if "certificate reload failed" in line]
        assert len(refusals) == 1
        assert (
            f"the key sent with the X.509 SVID for {SERVER_ID} does not match it" in (refusals[0])
        )
        assert served_serial(proxy, trust) == first
        assert get(proxy, client_context(trust)).status_code == 200
    finally:
        proxy.stop()


# --- identity -------------------------------------------------------------------------------
def test_spiffe_id_rule_and_xfcc(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream, "--allow-uri-san", CLIENT_ID).start()
    trust = write_ca(tmp_path, ca)
    allowed = client_context(trust, client_svid(ca, CLIENT_ID), tmp_path)
    other = client_context(trust, client_svid(ca, f"{TRUST_DOMAIN}/ns/default/sa/other"), tmp_path)
    try:
        response = get(proxy, allowed)
        assert response.status_code == 200
        xfcc = [v for n, v in response.json()["headers"] if n == "x-forwarded-client-cert"]
        assert len(xfcc) == 1
        assert xfcc[0].startswith(f"By={SERVER_ID};Hash=")
        assert xfcc[0].endswith(f"URI={CLIENT_ID}")
        assert get(proxy, other).status_code == 403
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):
            get(proxy, client_context(trust))  # no client certificate at all
    finally:
        proxy.stop()


# --- where the endpoint comes from, and workers ------------------------------------------------
def test_the_standard_variable_is_the_endpoint_when_no_certificate_is_given(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = ProxyProcess(
        serve_args(upstream.base), env={"SPIFFE_ENDPOINT_SOCKET": agent.endpoint}
    ).start()
    try:
        trust = write_ca(tmp_path, ca)
        assert served_serial(proxy, trust) == agent.identity.svid.certificate.serial_number
        assert "NO CERTIFICATE GIVEN" not in proxy.stderr_text()
    finally:
        proxy.stop()


def test_with_cert_and_key_too_it_stops_with_one_line(
    agent: FakeAgent, dev_certs: DevCerts, upstream: UpstreamApp
) -> None:
    proxy = ProxyProcess(
        serve_args(upstream.base, dev_certs, "--spiffe-endpoint", agent.endpoint)
    ).start(expect_ready=False)
    try:
        assert proxy.wait(30) == 2
    finally:
        proxy.stop()
    assert proxy.stderr_lines == [
        "tls-sidecar: error: --spiffe-endpoint and --cert/--key (or --cert-dir, --pkcs12) are "
        "both given; the X.509 SVID is the serving certificate: give one source, not both"
    ]


def test_each_worker_takes_the_svid_and_its_rotation(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream, "--workers", "2").start()
    trust = write_ca(tmp_path, ca)
    try:
        wait_for(lambda: agent.streams_opened == 2, 30, "a stream from each worker")
        wait_for(lambda: proxy.admin_get("/readyz")[0] == 200, 30, "the workers ready")
        rotated = new_svid(ca)
        agent.push(Identity(rotated, [ca]))
        new = rotated.certificate.serial_number
        # The kernel spreads new connections over the workers: many in a row see both.
        wait_for(
            lambda: all(served_serial(proxy, trust) == new for _ in range(20)),
            30,
            "every worker serving the rotated SVID",
        )
    finally:
        proxy.stop()


def test_the_supervisor_is_ready_only_once_every_worker_listens(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    """A worker waiting for its first SVID does not listen yet. Before, the supervisor's /readyz
    answered 200 while a connection to the TLS port was refused (a balancer would send traffic
    to a pod that refuses it)."""
    agent.denied = True  # no identity issued yet: the workers wait for one
    proxy = spiffe_proxy(agent.endpoint, upstream, "--workers", "2").start()
    try:
        wait_for(
            lambda: (
                proxy.admin_get("/readyz")
                == (503, "not ready: 2 of 2 workers are not listening yet\n")
            ),
            30,
            "the supervisor saying its workers are not listening",
        )
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=10).close()
        agent.denied = False
        wait_for(lambda: proxy.admin_get("/readyz")[0] == 200, 60, "every worker listening")
        trust = write_ca(tmp_path, ca)
        # ready means served: by whichever worker the kernel picks, every time
        assert all(served_serial(proxy, trust) > 0 for _ in range(20))
    finally:
        proxy.stop()


def test_check_fetches_and_checks_one_svid(agent: FakeAgent, upstream: UpstreamApp) -> None:
    def run_check(endpoint: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                *(sys.executable, "-m", "proxy", "check", "--upstream", upstream.base),
                *("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"),
                *("--spiffe-endpoint", endpoint),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = run_check(agent.endpoint)
    assert good.returncode == 0, good.stdout + good.stderr
    assert (
        f"ok    certificate {SERVER_ID}: X.509 SVID from {agent.endpoint}, expires" in good.stdout
    )
    agent.push(
        Identity(new_svid(agent.identity.bundle[0]), agent.identity.bundle, key=certs.new_key())
    )
    bad = run_check(agent.endpoint)
    assert bad.returncode == 2
    assert "does not match it" in bad.stdout
    agent.stop()
    gone = run_check(agent.endpoint)
    assert gone.returncode == 2
    assert (
        f"fail  certificates: --spiffe-endpoint {agent.endpoint}: the agent cannot be reached"
        in (gone.stdout)
    )


def test_revalidation_closes_a_connection_whose_ca_left_the_bundle(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(
        agent.endpoint, upstream, "--allow-uri-san", CLIENT_ID, "--client-cert-revalidate", "1h"
    ).start()
    new_ca = certs.create_ca("example.org SPIFFE CA 2")
    trust = write_ca(tmp_path, ca, new_ca)
    old_client = client_context(trust, client_svid(ca, CLIENT_ID), tmp_path)
    try:
        raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        with old_client.wrap_socket(raw, server_hostname="localhost") as sock:
            client = RawClient(sock)
            client.send(request_bytes("GET", "/echo"))
            answered = client.read_response()
            assert answered is not None and answered.status == 200
            # The open connection outlives its CA only until the reload that drops it.
            agent.push(Identity(new_svid(new_ca), [new_ca]))
            assert client.closed_by_peer(), "closed once the bundle no longer has its CA"
        assert (
            proxy.metric("tls_sidecar_client_cert_revalidation_closed_total", 'reason="ca_removed"')
            == 1
        )
    finally:
        proxy.stop()


def test_a_stop_signal_while_waiting_for_the_first_svid_exits_cleanly(
    tmp_path: Path, upstream: UpstreamApp
) -> None:
    endpoint = f"unix://{tmp_path}/absent.sock"
    proxy = spiffe_proxy(endpoint, upstream, "--spiffe-timeout", "10m").start(expect_ready=False)
    try:
        waiting_admin_port(proxy)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
    finally:
        proxy.stop()
    assert "Traceback" not in proxy.stderr_text()
    assert not any(line.startswith("tls-sidecar: error:") for line in proxy.stderr_lines)


def test_without_the_agent_the_last_svid_serves_until_it_expires_then_readiness_fails(
    tmp_path: Path, agent: FakeAgent, ca: certs.Issued, upstream: UpstreamApp
) -> None:
    proxy = spiffe_proxy(agent.endpoint, upstream).start()
    trust = write_ca(tmp_path, ca)
    try:
        # An SVID with seconds to live, so that its expiry comes within the test.
        now = dt.datetime.now(dt.UTC)
        short = certs.issue(
            ca,
            [SERVER_ID, "localhost"],
            common_name="web",
            days=1,
            not_before=now - dt.timedelta(days=1) + dt.timedelta(seconds=8),
        )
        agent.push(Identity(short, [ca]))
        new = short.certificate.serial_number
        wait_for(lambda: served_serial(proxy, trust) == new, 20, "the short-lived SVID")
        agent.stop()
        _, body = wait_for(
            lambda: (r := proxy.admin_get("/readyz"))[0] == 503 and r, 30, "readiness to fail"
        )
        assert "the X.509 SVID expired at" in body and agent.endpoint in body
    finally:
        proxy.stop()
