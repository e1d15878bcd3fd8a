"""--client-cert-revalidate: connections already open when their client certificate is revoked
(by a CRL loaded since) are closed after the request in flight (HTTP/2: GOAWAY), counted and
logged once each; a connection whose certificate is still good stays."""

from __future__ import annotations

import math
import signal
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.tls import certs, crl
from tests.conftest import ProxyFactory
from tests.e2e.test_cli import assert_one_line_error, run_cli
from tests.support.h2client import H2Client
from tests.support.proxy import ProxyProcess, RawClient, client_context, request_bytes, wait_for
from tests.support.upstream import UpstreamApp


class Clients:
    """A client CA, its CRL file, and client certificates by name."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.ca = certs.create_ca("revalidation clients CA")
        (out / "clients-ca.crt").write_bytes(self.ca.cert_pem)
        self.serials: dict[str, int] = {}
        for name in ("doomed", "fine"):
            leaf = certs.issue(self.ca, [], common_name=name, client=True)
            (out / f"{name}.crt").write_bytes(leaf.cert_pem)
            certs.write_private(out / f"{name}.key", leaf.key_pem)
            self.serials[name] = leaf.certificate.serial_number
        self.revoke()

    def revoke(self, *names: str) -> None:
        made = crl.make_crl(self.ca, [self.serials[n] for n in names])
        (self.out / "clients.crl").write_bytes(made.public_bytes(Encoding.PEM))

    def pair(self, name: str) -> tuple[Path, Path]:
        return self.out / f"{name}.crt", self.out / f"{name}.key"


@pytest.fixture
def clients(tmp_path: Path) -> Clients:
    return Clients(tmp_path)


def h1_client(proxy: ProxyProcess, ca: Path, pair: tuple[Path, Path]) -> RawClient:
    ctx = client_context(ca)
    ctx.load_cert_chain(pair[0], pair[1])
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    return RawClient(ctx.wrap_socket(raw, server_hostname="localhost"))


def closed_count(proxy: ProxyProcess, reason: str) -> float:
    value = proxy.metric("tls_sidecar_client_cert_revalidation_closed_total", f'reason="{reason}"')
    return 0.0 if math.isnan(value) else value


def test_revocation_closes_open_h1_and_h2_connections_after_their_request(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: Path, clients: Clients
) -> None:
    proxy = start_proxy(
        upstream.base,
        "--client-ca", str(clients.out / "clients-ca.crt"), "--allow-all",
        "--client-crl", str(clients.out / "clients.crl"),
        "--client-cert-revalidate", "1h",  # the reload's own check is the one under test
        "--reload-interval", "0",
    )  # fmt: skip
    h1 = h1_client(proxy, ca, clients.pair("doomed"))
    bystander = h1_client(proxy, ca, clients.pair("fine"))
    h2 = H2Client(proxy.port, ca, client_cert=clients.pair("doomed"))
    try:
        h1.send(request_bytes("GET", "/echo/reval-before"))
        response = h1.read_response()
        assert response is not None
        assert response.status == 200
        assert h2.response(h2.request(b"/echo/reval-h2-before")).status == 200
        # a request in flight on each when the certificate is revoked (its head already sent)
        gate_h1, gate_h2 = f"reval-h1-{proxy.port}", f"reval-h2-{proxy.port}"
        h1.send(request_bytes("GET", f"/gate/{gate_h1}"))
        head = h1.read_response(head_only=True)
        assert head is not None
        assert head.status == 200
        sid = h2.request(f"/gate/{gate_h2}".encode())
        assert h2.pump(lambda: h2.responses[sid].status == 200)

        clients.revoke("doomed")
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: closed_count(proxy, "revoked") == 2, what="two connections retired")

        h2.wait_goaway()
        upstream.open_gate(gate_h1)
        upstream.open_gate(gate_h2)
        finished = h1.read_response()
        assert finished is not None
        assert finished.body == b"first;last", "the request in flight is answered in full"
        assert h1.closed_by_peer(), "then the connection is closed"
        assert h2.pump(lambda: h2.raw_body(sid)[1]), "the stream in flight did not end"
        assert h2.raw_body(sid) == (b"first;last", True)
        assert h2.pump(lambda: h2.closed), "the HTTP/2 connection ends after its last stream"

        bystander.send(request_bytes("GET", "/echo/reval-bystander"))
        still = bystander.read_response()
        assert still is not None
        assert still.status == 200, "a connection whose certificate is still good stays"
        lines = [line for line in proxy.stderr_lines if "is no longer valid" in line]
        assert len(lines) == 2, "logged once each"
        assert all('"reason": "revoked"' in line for line in lines)
    finally:
        h1.sock.close()
        bystander.sock.close()
        h2.close()


def test_revalidate_needs_client_ca() -> None:
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--client-cert-revalidate", "1m",
    )  # fmt: skip
    assert_one_line_error(result, "--client-cert-revalidate needs --client-ca")
