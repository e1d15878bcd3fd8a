"""--client-crl: a revoked client certificate fails the handshake with the certificate_revoked
alert, counted by reason; CRLs come from `tls-sidecar certs revoke` (the development CA), are
PEM or DER, and are reloaded like certificates; a CRL past its next update is warned of and
refuses that CA's clients (fail closed)."""

from __future__ import annotations

import datetime as dt
import http.client
import math
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.tls import certs, crl
from tests.conftest import ProxyFactory
from tests.e2e.test_cli import assert_one_line_error, run_cli
from tests.support.proxy import ProxyProcess, wait_for
from tests.support.upstream import UpstreamApp


@dataclass(frozen=True)
class DevCa:
    dir: Path

    def path(self, name: str) -> Path:
        return self.dir / name

    def client(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def tls_sidecar(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def dev_ca(tmp_path_factory: pytest.TempPathFactory) -> DevCa:
    """`certs init`, two more clients, and `certs revoke` of one of them."""
    out = tmp_path_factory.mktemp("dev-ca")
    tls_sidecar("certs", "init", "--out", str(out))
    for name in ("good", "revoked", "later"):
        tls_sidecar(
            "certs", "issue", "--client", "--name", f"{name}.test", "--file-name", name,
            "--out", str(out), "--ca", str(out / "ca.crt"), "--ca-key", str(out / "ca.key"),
        )  # fmt: skip
    said = tls_sidecar("certs", "revoke", "--certs-dir", str(out), "--name", "revoked")
    assert "revoked     serial" in said
    return DevCa(out)


def serve_mtls(
    start_proxy: ProxyFactory, upstream: UpstreamApp, ca: DevCa, *extra: str
) -> ProxyProcess:
    return start_proxy(
        upstream.base,
        "--cert", str(ca.path("server.crt")), "--key", str(ca.path("server.key")),
        "--client-ca", str(ca.path("ca.crt")), "--allow-all",
        *extra,
        with_cert=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def crl_proxy(start_proxy: ProxyFactory, upstream: UpstreamApp, dev_ca: DevCa) -> ProxyProcess:
    return serve_mtls(start_proxy, upstream, dev_ca, "--client-crl", str(dev_ca.path("ca.crl")))


def status_with(proxy: ProxyProcess, ca: DevCa, client: tuple[Path, Path]) -> int | str:
    """The status of a GET with this client certificate, or the TLS error that refused it."""
    ctx = ssl.create_default_context(cafile=str(ca.path("ca.crt")))
    ctx.load_cert_chain(str(client[0]), str(client[1]))
    conn = http.client.HTTPSConnection("localhost", proxy.port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/echo/crl")
        return conn.getresponse().status
    except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected) as e:
        return str(e)
    finally:
        conn.close()


def errors(proxy: ProxyProcess, reason: str) -> float:
    value = proxy.metric("tls_sidecar_tls_handshake_errors_total", f'reason="{reason}"')
    return 0.0 if math.isnan(value) else value


def test_a_revoked_certificate_gets_the_certificate_revoked_alert(
    crl_proxy: ProxyProcess, dev_ca: DevCa
) -> None:
    before = errors(crl_proxy, "client_certificate_revoked")
    refused = status_with(crl_proxy, dev_ca, dev_ca.client("revoked"))
    assert isinstance(refused, str)
    assert "CERTIFICATE_REVOKED" in refused.upper()
    assert errors(crl_proxy, "client_certificate_revoked") == before + 1
    assert status_with(crl_proxy, dev_ca, dev_ca.client("good")) == 200
    next_update = crl_proxy.metric(
        "tls_sidecar_client_crl_next_update_timestamp_seconds", 'crl="ca.crl"'
    )
    assert next_update > dt.datetime.now(dt.UTC).timestamp()


@pytest.mark.needs("curl", install="apt-get install curl")
def test_curl_with_a_revoked_certificate_is_refused(crl_proxy: ProxyProcess, dev_ca: DevCa) -> None:
    def curl(name: str, *tls: str) -> subprocess.CompletedProcess[str]:
        cert, key = dev_ca.client(name)
        return subprocess.run(
            [
                "curl", "-sS", *tls, "--cacert", str(dev_ca.path("ca.crt")),
                "--cert", str(cert), "--key", str(key),
                f"https://localhost:{crl_proxy.port}/echo/curl-crl",
            ],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip

    before = errors(crl_proxy, "client_certificate_revoked")
    # TLS 1.2: the client waits for the server's Finished, so it reads the alert itself
    revoked = curl("revoked", "--tlsv1.2", "--tls-max", "1.2")
    assert revoked.returncode != 0
    assert "certificate revoked" in revoked.stderr.lower(), revoked.stderr
    # TLS 1.3: the client has finished when the server refuses; it may see only the close
    assert curl("revoked").returncode != 0
    assert errors(crl_proxy, "client_certificate_revoked") == before + 2
    assert curl("good").returncode == 0


def test_a_new_crl_is_taken_on_reload(
    start_proxy: ProxyFactory, upstream: UpstreamApp, dev_ca: DevCa, tmp_path: Path
) -> None:
    crl_file = tmp_path / "reloaded.crl"
    crl_file.write_bytes(dev_ca.path("ca.crl").read_bytes())
    proxy = serve_mtls(start_proxy, upstream, dev_ca, "--client-crl", str(crl_file))
    assert status_with(proxy, dev_ca, dev_ca.client("later")) == 200
    ca = certs.Issued(
        certs.load_chain(dev_ca.path("ca.crt"))[0], certs.load_key(dev_ca.path("ca.key"))
    )
    later = certs.load_chain(dev_ca.path("later.crt"))[0].serial_number
    revoked = certs.load_chain(dev_ca.path("revoked.crt"))[0].serial_number
    # DER this time: the reload takes either form
    crl_file.write_bytes(crl.make_crl(ca, [later, revoked]).public_bytes(Encoding.DER))
    proxy.signal(signal.SIGHUP)
    wait_for(
        lambda: proxy.metric("tls_sidecar_certificate_reloads_total", 'result="success"') >= 1,
        what="the reload",
    )
    refused = status_with(proxy, dev_ca, dev_ca.client("later"))
    assert isinstance(refused, str)
    assert "CERTIFICATE_REVOKED" in refused.upper()
    assert status_with(proxy, dev_ca, dev_ca.client("good")) == 200


def test_a_crl_past_its_next_update_is_warned_and_fails_closed(
    start_proxy: ProxyFactory, upstream: UpstreamApp, dev_ca: DevCa, tmp_path: Path
) -> None:
    ca = certs.Issued(
        certs.load_chain(dev_ca.path("ca.crt"))[0], certs.load_key(dev_ca.path("ca.key"))
    )
    stale = crl.make_crl(ca, [], days=1, last_update=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    crl_file = tmp_path / "stale.crl"
    crl_file.write_bytes(stale.public_bytes(Encoding.PEM))
    proxy = serve_mtls(start_proxy, upstream, dev_ca, "--client-crl", str(crl_file))
    assert "stale.crl: past its next update" in proxy.stderr_text()
    assert (
        proxy.metric("tls_sidecar_client_crl_next_update_timestamp_seconds", 'crl="stale.crl"')
        < dt.datetime.now(dt.UTC).timestamp()
    )
    before = errors(proxy, "client_crl_expired")
    assert isinstance(status_with(proxy, dev_ca, dev_ca.client("good")), str)
    wait_for(lambda: errors(proxy, "client_crl_expired") == before + 1, what="counted")


def test_a_crl_of_another_ca_stops_start_up(dev_ca: DevCa, tmp_path: Path) -> None:
    other = certs.create_ca("another CA")
    crl_file = tmp_path / "other.crl"
    crl_file.write_bytes(crl.make_crl(other, [1]).public_bytes(Encoding.PEM))
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--cert", str(dev_ca.path("server.crt")), "--key", str(dev_ca.path("server.key")),
        "--client-ca", str(dev_ca.path("ca.crt")), "--allow-all",
        "--client-crl", str(crl_file),
    )  # fmt: skip
    assert_one_line_error(result, "not signed by a CA of --client-ca")


def test_client_crl_needs_client_ca(dev_ca: DevCa) -> None:
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--client-crl", str(dev_ca.path("ca.crl")),
    )  # fmt: skip
    assert_one_line_error(result, "--client-crl needs --client-ca")


def test_not_a_crl_is_named(dev_ca: DevCa) -> None:
    result = run_cli(
        "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
        "--cert", str(dev_ca.path("server.crt")), "--key", str(dev_ca.path("server.key")),
        "--client-ca", str(dev_ca.path("ca.crt")), "--allow-all",
        "--client-crl", str(dev_ca.path("ca.crt")),
    )  # fmt: skip
    assert_one_line_error(result, "holds no CRL")


def test_revoke_keeps_earlier_revocations(dev_ca: DevCa, tmp_path: Path) -> None:
    copy = tmp_path / "ca"
    copy.mkdir()
    for name in ("ca.crt", "ca.key", "ca.crl", "good.crt"):
        (copy / name).write_bytes(dev_ca.path(name).read_bytes())
    tls_sidecar("certs", "revoke", "--certs-dir", str(copy), "--serial", "ab:cd")
    serials = {e.serial_number for c in crl.load_crls(copy / "ca.crl") for e in c}
    revoked = certs.load_chain(dev_ca.path("revoked.crt"))[0].serial_number
    assert serials == {revoked, 0xABCD}
