"""Certificates and identity over real handshakes: SNI, key formats, mutual TLS, XFCC, rotation."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.client
import json
import os
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.tls import certs
from tests.conftest import ProxyFactory
from tests.support.proxy import ProxyProcess, serve_args, wait_for
from tests.support.upstream import UpstreamApp


@dataclass
class Pki:
    dir: Path
    ca: certs.Issued

    def write(self, name: str, issued: certs.Issued, chain: bool = True) -> tuple[Path, Path]:
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(issued.cert_pem + (self.ca.cert_pem if chain else b""))
        certs.write_private(key_path, issued.key_pem)
        return cert_path, key_path

    @property
    def ca_path(self) -> Path:
        path = self.dir / "ca.crt"
        if not path.exists():
            path.write_bytes(self.ca.cert_pem)
        return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"), certs.create_ca("identity tests CA"))


def handshake(
    port: int, ca: Path, server_name: str | None, client: tuple[Path, Path] | None = None
) -> x509.Certificate:
    ctx = ssl.create_default_context(cafile=str(ca))
    if server_name is None:
        ctx.check_hostname = False
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name) as sock,
    ):
        der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def get(
    port: int,
    ca: Path,
    path: str,
    client: tuple[Path, Path] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if client:
        ctx.load_cert_chain(str(client[0]), str(client[1]))
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --- SNI -----------------------------------------------------------------------------------


def test_sni_picks_the_certificate_by_name(
    start_proxy: ProxyFactory, upstream: UpstreamApp, pki: Pki
) -> None:
    default = pki.write("sni-default", certs.issue(pki.ca, ["localhost"], common_name="default"))
    a = pki.write("sni-a", certs.issue(pki.ca, ["a.example.test"], common_name="a"))
    b = pki.write("sni-b", certs.issue(pki.ca, ["*.b.example.test"], common_name="b-wildcard"))
    proxy = start_proxy(
        upstream.base,
        "--cert",
        str(default[0]),
        "--key",
        str(default[1]),
        "--cert",
        str(a[0]),
        "--key",
        str(a[1]),
        "--cert",
        str(b[0]),
        "--key",
        str(b[1]),
        with_cert=False,
    )
    assert common_name(handshake(proxy.port, pki.ca_path, "a.example.test")) == "a"
    assert common_name(handshake(proxy.port, pki.ca_path, "x.b.example.test")) == "b-wildcard"
    assert common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "default"
    assert common_name(handshake(proxy.port, pki.ca_path, None)) == "default", "no SNI: the default"
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(
            proxy.port, pki.ca_path, "unknown.example.test"
        )  # served the default, which does not match
    assert (
        proxy.metric("tls_sidecar_certificate_expiry_timestamp_seconds", 'cert="sni-a"')
        > time.time()
    )


def test_cert_dir_serves_each_folder(
    start_proxy: ProxyFactory, upstream: UpstreamApp, pki: Pki, tmp_path: Path
) -> None:
    for name, host in (("api", "api.example.test"), ("www", "www.example.test")):
        folder = tmp_path / name
        folder.mkdir()
        issued = certs.issue(pki.ca, [host], common_name=name)
        (folder / "tls.crt").write_bytes(issued.cert_pem)
        certs.write_private(folder / "tls.key", issued.key_pem)
    proxy = start_proxy(upstream.base, "--cert-dir", str(tmp_path), with_cert=False)
    assert common_name(handshake(proxy.port, pki.ca_path, "www.example.test")) == "www"
    assert common_name(handshake(proxy.port, pki.ca_path, "api.example.test")) == "api"


# --- key formats -----------------------------------------------------------------------------


def test_encrypted_key_with_password_file(
    start_proxy: ProxyFactory, upstream: UpstreamApp, pki: Pki, tmp_path: Path
) -> None:
    issued = certs.issue(pki.ca, ["localhost"], common_name="encrypted")
    (tmp_path / "tls.crt").write_bytes(issued.cert_pem)
    encrypted = issued.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"s3cret"),
    )
    certs.write_private(tmp_path / "tls.key", encrypted)
    (tmp_path / "pw").write_text("s3cret\n")
    proxy = start_proxy(
        upstream.base,
        "--cert",
        str(tmp_path / "tls.crt"),
        "--key",
        str(tmp_path / "tls.key"),
        "--key-password-file",
        str(tmp_path / "pw"),
        with_cert=False,
    )
    assert common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "encrypted"


def test_pkcs12_bundle(
    start_proxy: ProxyFactory, upstream: UpstreamApp, pki: Pki, tmp_path: Path
) -> None:
    issued = certs.issue(pki.ca, ["localhost"], common_name="from-p12")
    bundle = pkcs12.serialize_key_and_certificates(
        b"svc",
        issued.key,
        issued.certificate,
        [pki.ca.certificate],
        serialization.BestAvailableEncryption(b"pw12"),
    )
    (tmp_path / "svc.p12").write_bytes(bundle)
    (tmp_path / "p12pw").write_text("pw12")
    proxy = start_proxy(
        upstream.base,
        "--pkcs12",
        str(tmp_path / "svc.p12"),
        "--pkcs12-password-file",
        str(tmp_path / "p12pw"),
        with_cert=False,
    )
    assert common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "from-p12"


# --- mutual TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clients(pki: Pki) -> dict[str, tuple[Path, Path]]:
    other_ca = certs.create_ca("someone else's CA")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    return {
        "cn": pki.write(
            "c-cn", certs.issue(pki.ca, [], common_name="allowed-client", client=True), chain=False
        ),
        "ou": pki.write(
            "c-ou",
            certs.issue(pki.ca, [], common_name="x", organizational_unit="ops", client=True),
            chain=False,
        ),
        "dns": pki.write(
            "c-dns",
            certs.issue(pki.ca, ["worker.internal"], common_name="y", client=True),
            chain=False,
        ),
        "uri": pki.write(
            "c-uri",
            certs.issue(pki.ca, ["spiffe://td.test/ns/prod/sa/api"], common_name="z", client=True),
            chain=False,
        ),
        "denied": pki.write(
            "c-denied",
            certs.issue(
                pki.ca, ["spiffe://td.test/ns/dev/sa/api"], common_name="intruder", client=True
            ),
            chain=False,
        ),
        "wrong_ca": pki.write(
            "c-wrong",
            certs.issue(other_ca, [], common_name="allowed-client", client=True),
            chain=False,
        ),
        "expired": pki.write(
            "c-expired",
            certs.issue(
                pki.ca, [], common_name="allowed-client", client=True, days=1, not_before=past
            ),
            chain=False,
        ),
    }


@pytest.fixture(scope="module")
def mtls(start_proxy: ProxyFactory, upstream: UpstreamApp, pki: Pki) -> ProxyProcess:
    server = pki.write(
        "mtls-server", certs.issue(pki.ca, ["localhost", "spiffe://td.test/sidecar"])
    )
    return start_proxy(
        upstream.base,
        "--cert",
        str(server[0]),
        "--key",
        str(server[1]),
        "--client-ca",
        str(pki.ca_path),
        "--allow-cn",
        "allowed-client",
        "--allow-ou",
        "ops",
        "--allow-dns-san",
        "worker.internal",
        "--allow-uri-san",
        "spiffe://td.test/ns/prod/*",
        with_cert=False,
    )


def refused_at_handshake(port: int, ca: Path, client: tuple[Path, Path] | None) -> bool:
    """TLS 1.3 clients learn of a refused certificate on their first read, not in the handshake."""
    try:
        status, _ = get(port, ca, "/echo/should-not-pass", client)
    except (ssl.SSLError, ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
        return True
    raise AssertionError(f"the proxy answered {status}")


@pytest.mark.parametrize("who", ["cn", "ou", "dns", "uri"])
def test_allowed_clients_reach_the_app_with_their_identity(
    mtls: ProxyProcess, pki: Pki, clients: dict[str, tuple[Path, Path]], who: str
) -> None:
    status, body = get(
        mtls.port,
        pki.ca_path,
        f"/echo/mtls-{who}",
        clients[who],
        headers={"X-Forwarded-Client-Cert": "By=spoofed;Hash=00"},
    )
    assert status == 200, body
    xfcc = [v for n, v in json.loads(body)["headers"] if n == "x-forwarded-client-cert"]
    assert len(xfcc) == 1, "the client's own header is dropped, ours is the only one"
    leaf = x509.load_pem_x509_certificate(clients[who][0].read_bytes())
    assert xfcc[0].startswith(
        "By=spiffe://td.test/sidecar;Hash=" + leaf.fingerprint(hashes.SHA256()).hex()
    )
    assert f'Subject="{leaf.subject.rfc4514_string()}"' in xfcc[0]
    if who == "uri":
        assert xfcc[0].endswith("URI=spiffe://td.test/ns/prod/sa/api")
    if who == "dns":
        assert xfcc[0].endswith("DNS=worker.internal")
    assert "Cert=" not in xfcc[0]
    record = wait_for(
        lambda: next((r for r in mtls.access_records() if r["path"] == f"/echo/mtls-{who}"), None)
    )
    expected = "spiffe://td.test/ns/prod/sa/api" if who == "uri" else leaf.subject.rfc4514_string()
    assert (record["identity"], record["denied"]) == (expected, None)


def test_certificate_the_rules_do_not_admit_gets_403(
    mtls: ProxyProcess, upstream: UpstreamApp, pki: Pki, clients: dict[str, tuple[Path, Path]]
) -> None:
    before = upstream.count("/echo/denied")
    status, body = get(mtls.port, pki.ca_path, "/echo/denied", clients["denied"])
    assert status == 403
    assert b"CN=intruder" in body and b"not allowed" in body
    assert upstream.count("/echo/denied") == before, "a denied client never reaches the app"
    assert mtls.metric("tls_sidecar_client_auth_denied_total", 'reason="not_allowed"') >= 1
    record = wait_for(
        lambda: next((r for r in mtls.access_records() if r["path"] == "/echo/denied"), None)
    )
    assert (record["denied"], record["identity"]) == (
        "not_allowed",
        "spiffe://td.test/ns/dev/sa/api",
    )
    assert record["upstream_status"] is None and record["local"] == "client_not_allowed"


@pytest.mark.parametrize("who", [None, "wrong_ca", "expired"])
def test_no_or_untrusted_certificate_fails_the_handshake(
    mtls: ProxyProcess, pki: Pki, clients: dict[str, tuple[Path, Path]], who: str | None
) -> None:
    assert refused_at_handshake(mtls.port, pki.ca_path, clients[who] if who else None)
    wait_for(
        lambda: (
            mtls.metric("tls_sidecar_tls_handshake_errors_total", 'reason="client_certificate"')
            >= 1
        )
    )


def test_optional_client_auth_answers_403_without_a_certificate(
    start_proxy: ProxyFactory,
    upstream: UpstreamApp,
    pki: Pki,
    clients: dict[str, tuple[Path, Path]],
) -> None:
    server = pki.write("opt-server", certs.issue(pki.ca, ["localhost"]))
    proxy = start_proxy(
        upstream.base,
        "--cert",
        str(server[0]),
        "--key",
        str(server[1]),
        "--client-ca",
        str(pki.ca_path),
        "--client-auth",
        "optional",
        "--allow-all",
        "--client-cert-header-pem",
        with_cert=False,
    )
    status, body = get(proxy.port, pki.ca_path, "/echo/optional")
    assert status == 403 and b"client certificate is required" in body
    status, body = get(proxy.port, pki.ca_path, "/echo/optional", clients["denied"])
    assert status == 200, "--allow-all admits any certificate the CA signed"
    xfcc = next(v for n, v in json.loads(body)["headers"] if n == "x-forwarded-client-cert")
    assert 'Cert="-----BEGIN%20CERTIFICATE-----' in xfcc


# --- rotation ---------------------------------------------------------------------------------


def secret_volume_update(
    folder: Path, generation: str, cert_pem: bytes, key_pem: bytes, mtime: float | None = None
) -> None:
    """Do what the kubelet does: write a hidden timestamped folder, then swap `..data` atomically."""
    target = folder / f"..{generation}"
    target.mkdir()
    (target / "tls.crt").write_bytes(cert_pem)
    (target / "tls.key").write_bytes(key_pem)
    if mtime is not None:  # same mtimes as before: only the content says it changed
        for name in ("tls.crt", "tls.key"):
            os.utime(target / name, (mtime, mtime))
    (folder / "..data_tmp").symlink_to(target.name)
    os.replace(folder / "..data_tmp", folder / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (folder / name).is_symlink():
            (folder / name).symlink_to(f"..data/{name}")


class Load:
    """Keep-alive and new-connection HTTPS requests from threads, bounded in time and count."""

    def __init__(self, port: int, ca: Path, seconds: float, max_requests: int = 20000) -> None:
        self.port, self.ca, self.deadline, self.max = (
            port,
            ca,
            time.monotonic() + seconds,
            max_requests,
        )
        self.sent = 0
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(keep,)) for keep in (True, True, False, False)
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.deadline = 0
        for thread in self.threads:
            thread.join(30)

    def _run(self, keep_alive: bool) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        conn: http.client.HTTPSConnection | None = None
        while time.monotonic() < self.deadline and self.sent < self.max:
            try:
                if conn is None:
                    conn = http.client.HTTPSConnection(
                        "localhost", self.port, context=ctx, timeout=10
                    )
                conn.request("GET", "/echo/rotation")
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException) as e:
                ok = False
                detail = repr(e)
            with self.lock:
                self.sent += 1
                if not ok:
                    self.failed.append(detail if "detail" in locals() else "status")
            if not keep_alive and conn is not None:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_rotation_through_a_secret_volume_swap_under_load(
    tmp_path: Path, upstream: UpstreamApp, pki: Pki
) -> None:
    folder = tmp_path / "secret"
    folder.mkdir()
    first = certs.issue(pki.ca, ["localhost"], common_name="gen-1")
    secret_volume_update(folder, "2026_11_24_1", first.cert_pem + pki.ca.cert_pem, first.key_pem)
    proxy = ProxyProcess(
        [
            *serve_args(upstream.base),
            "--cert",
            str(folder / "tls.crt"),
            "--key",
            str(folder / "tls.key"),
            "--reload-interval",
            "200ms",
            "--no-access-log",
        ]
    ).start()
    try:
        assert common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "gen-1"
        old_mtime = (folder / "tls.crt").stat().st_mtime
        second = certs.issue(pki.ca, ["localhost"], common_name="gen-2")
        with Load(proxy.port, pki.ca_path, seconds=8) as load:
            wait_for(lambda: load.sent > 50, what="load to start")
            swapped = time.monotonic()
            secret_volume_update(
                folder,
                "2026_11_24_2",
                second.cert_pem + pki.ca.cert_pem,
                second.key_pem,
                mtime=old_mtime,
            )
            wait_for(
                lambda: common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "gen-2",
                what="gen-2 served",
            )
            reload_latency = time.monotonic() - swapped
            # A broken update (key of another certificate) must not replace gen-2.
            stranger = certs.issue(pki.ca, ["localhost"])
            secret_volume_update(
                folder,
                "2026_11_24_3",
                certs.issue(pki.ca, ["localhost"]).cert_pem,
                stranger.key_pem,
            )
            wait_for(
                lambda: (
                    proxy.metric("tls_sidecar_certificate_reloads_total", 'result="failure"') >= 1
                ),
                what="the failed reload",
            )
            assert common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "gen-2"
            wait_for(lambda: load.sent > 300, what="more load after the swaps")
        print(
            f"\nrotation: requests sent={load.sent} failed={len(load.failed)} reload_latency_s={reload_latency:.3f}"
        )
        assert load.failed == [], load.failed[:5]
        assert proxy.metric("tls_sidecar_certificate_reloads_total", 'result="success"') == 1
        assert reload_latency < 5, "the swap was seen within a few reload intervals"
    finally:
        proxy.stop()


def reload_helper(pid: int, timeout: float = 20) -> int:
    """The reload's helper process (`python -m proxy.tls.certload`, started from one of `pid`'s
    threads), once it runs: polled every millisecond, as it lives a fraction of a second."""
    deadline = time.monotonic() + timeout
    while True:
        for task in Path(f"/proc/{pid}/task").glob("*/children"):
            for child in task.read_text().split():
                with contextlib.suppress(OSError):
                    if b"proxy.tls.certload" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return int(child)
        assert time.monotonic() < deadline, "no reload helper process was started"
        time.sleep(0.001)


def holds(pid: int, link: str) -> bool:
    """Whether process `pid` has a descriptor open on `link` (e.g. `pipe:[1234]`)."""
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == link:
                return True
    return False


def exited(pid: int) -> bool:
    """An exited child not yet reaped (its parent is stopped) is a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("first", ["cert", "key"])
def test_a_pair_replaced_in_two_steps_is_served_once_complete(
    tmp_path: Path, upstream: UpstreamApp, pki: Pki, first: str
) -> None:
    """Certificate and key replaced a moment apart, the second file landing while the reload
    started by the first is under way: that attempt fails (a mismatched pair), and the next
    poll must still see the complete pair as new and serve it.

    Deterministic, with no timing: the reload's helper process is held (SIGSTOP) until the
    proxy has handed it its settings, then the proxy is held while the helper reads the files
    and exits, and the second file is written before the proxy goes on to the failure."""
    old = certs.issue(pki.ca, ["localhost"], common_name="old")
    cert_path, key_path = pki.write(f"two-step-{first}", old)
    proxy = ProxyProcess(
        [
            *serve_args(upstream.base),
            "--cert",
            str(cert_path),
            "--key",
            str(key_path),
            "--reload-interval",
            "200ms",
        ]
    ).start()
    assert proxy.proc is not None
    pid = proxy.proc.pid
    new = certs.issue(pki.ca, ["localhost"], common_name="new")

    def write(which: str) -> None:
        if which == "cert":
            cert_path.write_bytes(new.cert_pem + pki.ca.cert_pem)
        else:
            certs.write_private(key_path, new.key_pem)

    second = "key" if first == "cert" else "cert"
    try:
        assert common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "old"
        write(first)
        helper = reload_helper(pid)
        os.kill(helper, signal.SIGSTOP)
        stopped = [helper]
        try:
            settings_pipe = os.readlink(f"/proc/{helper}/fd/0")
            wait_for(lambda: not holds(pid, settings_pipe), what="the helper's settings sent")
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            os.kill(helper, signal.SIGCONT)
            wait_for(lambda: exited(helper), what="the helper to read the files and exit")
            write(second)
        finally:
            for process in stopped:
                os.kill(process, signal.SIGCONT)
        wait_for(
            lambda: proxy.metric("tls_sidecar_certificate_reloads_total", 'result="failure"') == 1,
            what="the reload of the half-replaced pair to fail",
        )
        wait_for(
            lambda: common_name(handshake(proxy.port, pki.ca_path, "localhost")) == "new",
            what="the complete new pair to be served",
        )
        assert proxy.metric("tls_sidecar_certificate_reloads_total", 'result="success"') == 1
    finally:
        proxy.stop()
