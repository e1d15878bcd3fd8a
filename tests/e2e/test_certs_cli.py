"""`tls-sidecar certs init / issue / inspect` as a user runs them, including their error paths."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from proxy.tls import certs
from tests.e2e.test_cli import assert_one_line_error, run_cli
from tests.support.proxy import ProxyProcess, serve_args
from tests.support.upstream import UpstreamApp


def test_one_folder_option_for_every_certs_command() -> None:
    """`--certs-dir` is the folder's name everywhere (as for `demo`); `--out` and `--dir`, the
    names it had, still work (the tests below use them) but are no longer shown."""
    for command in ("init", "issue", "trust", "untrust"):
        shown = run_cli("certs", command, "--help").stdout
        assert "--certs-dir" in shown, command
        assert "--out" not in shown and "--dir " not in shown, shown
    assert "--certs-dir" in run_cli("demo", "--help").stdout


def test_init_makes_a_ca_and_leaves_and_reuses_the_ca(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = run_cli("certs", "init", "--out", str(out), "--host", "app.local", "--host", "10.0.0.1")
    assert first.returncode == 0, first.stderr
    assert "created CA" in first.stdout
    for name in ("ca", "server", "client"):
        assert (out / f"{name}.crt").exists()
        assert (out / f"{name}.key").stat().st_mode & 0o777 == 0o600
    server = x509.load_pem_x509_certificates((out / "server.crt").read_bytes())[0]
    assert certs.san_strings(server) == ["DNS:app.local", "IP:10.0.0.1"]
    ca_before = (out / "ca.crt").read_bytes()
    second = run_cli("certs", "init", "--out", str(out))
    assert second.returncode == 0 and "reused CA" in second.stdout
    assert (out / "ca.crt").read_bytes() == ca_before, "an existing CA is kept"
    rsa = run_cli("certs", "init", "--out", str(tmp_path / "rsa"), "--key-type", "rsa")
    assert rsa.returncode == 0
    assert "RSA 2048" in run_cli("certs", "inspect", str(tmp_path / "rsa" / "server.crt")).stdout


def test_issue_a_spiffe_client_certificate_and_inspect_it(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert run_cli("certs", "init", "--out", str(out)).returncode == 0
    issued = run_cli(
        "certs",
        "issue",
        "--ca",
        str(out / "ca.crt"),
        "--ca-key",
        str(out / "ca.key"),
        "--out",
        str(out),
        "--name",
        "spiffe://example.org/ns/prod/sa/api",
        "--client",
        "--days",
        "30",
        "--file-name",
        "api",
    )
    assert issued.returncode == 0, issued.stderr
    shown = run_cli(
        "certs",
        "inspect",
        str(out / "api.crt"),
        "--key",
        str(out / "api.key"),
        "--ca",
        str(out / "ca.crt"),
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "URI:spiffe://example.org/ns/prod/sa/api" in shown.stdout
    assert "matches" in shown.stdout and "verifies" in shown.stdout
    assert "sha256" in shown.stdout and "ECDSA secp256r1" in shown.stdout


def test_inspect_fails_on_mismatch_broken_chain_and_expiry(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    assert run_cli("certs", "init", "--out", str(out)).returncode == 0
    mismatch = run_cli(
        "certs", "inspect", str(out / "server.crt"), "--key", str(out / "client.key")
    )
    assert mismatch.returncode == 1 and "DOES NOT MATCH" in mismatch.stdout
    other = certs.create_ca("other")
    (tmp_path / "other-ca.crt").write_bytes(other.cert_pem)
    broken = run_cli(
        "certs", "inspect", str(out / "server.crt"), "--ca", str(tmp_path / "other-ca.crt")
    )
    assert broken.returncode == 1 and "does not verify" in broken.stdout
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    old = certs.issue(None, ["localhost"], days=1, not_before=past)
    (tmp_path / "old.crt").write_bytes(old.cert_pem)
    expired = run_cli("certs", "inspect", str(tmp_path / "old.crt"))
    assert expired.returncode == 1 and "expired" in expired.stderr


def test_certs_errors_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(
        run_cli("certs", "inspect", str(tmp_path / "missing.crt")), "cannot be read"
    )
    assert_one_line_error(
        run_cli(
            "certs",
            "issue",
            "--ca",
            str(tmp_path / "nope.crt"),
            "--ca-key",
            str(tmp_path / "nope.key"),
            "--name",
            "x",
        ),
        "--ca",
        "does not exist",
        "tls-sidecar certs init",
    )
    (tmp_path / "only.crt").write_bytes(certs.create_ca().cert_pem)
    assert_one_line_error(
        run_cli("certs", "issue", "--ca", str(tmp_path / "only.crt"), "--name", "x.test"),
        "--ca-key",
        "only.key",
        "cannot be read",
    )


def test_issue_without_a_ca_says_to_run_certs_init(tmp_path: Path) -> None:
    result = run_cli("certs", "issue", "--certs-dir", str(tmp_path / "none"), "--name", "a.test")
    assert_one_line_error(result, "run", "tls-sidecar certs init --certs-dir")


def _verifies(ca: Path, cert: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), *args, str(cert)],
        capture_output=True,
        text=True,
    )


@pytest.mark.needs("openssl", install="apt-get install openssl")
def test_the_development_ca_refuses_names_it_cannot_vouch_for(tmp_path: Path) -> None:
    """A certificate the CA's name constraints forbid would be refused by every client
    ("permitted subtree violation"): `certs issue` and `certs init` refuse it with the fix, and
    never replace a working certificate with one."""
    out = tmp_path / "certs"
    assert run_cli("certs", "init", "--certs-dir", str(out)).returncode == 0
    refused = run_cli("certs", "issue", "--certs-dir", str(out), "--name", "www.example.com")
    assert_one_line_error(
        refused,
        "--name www.example.com",
        "name constraints",
        "www.example.test",
        "certs init --certs-dir DIR --host www.example.com",
    )
    assert not list(out.glob("www*"))
    working = (out / "server.crt").read_bytes()
    again = run_cli("certs", "init", "--certs-dir", str(out), "--host", "shop.example")
    assert_one_line_error(again, "--host shop.example", "name constraints", "shop.test")
    assert (out / "server.crt").read_bytes() == working, "a working certificate is kept"
    assert (
        _verifies(out / "ca.crt", out / "server.crt", "-verify_hostname", "localhost").returncode
        == 0
    )
    # An IP address is not constrained: issued, and it verifies.
    by_ip = run_cli("certs", "issue", "--certs-dir", str(out), "--name", "10.0.0.5")
    assert by_ip.returncode == 0, by_ip.stderr
    accepted = _verifies(out / "ca.crt", out / "10.0.0.5.crt", "-verify_ip", "10.0.0.5")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    # A new CA in another folder takes the name into its constraints.
    shop = tmp_path / "shop"
    made = run_cli("certs", "init", "--certs-dir", str(shop), "--host", "shop.example")
    assert made.returncode == 0, made.stderr
    fine = _verifies(shop / "ca.crt", shop / "server.crt", "-verify_hostname", "shop.example")
    assert fine.returncode == 0, fine.stdout + fine.stderr


def test_a_ca_that_limits_ip_addresses_is_refused_for_others_and_flagged(tmp_path: Path) -> None:
    """CAs from before limited IP addresses too (127.0.0.0/8, ::1), which grpcio cannot check:
    `certs init` still reuses one, with a note saying how to replace it."""
    out = tmp_path / "certs"
    out.mkdir()
    old = certs.create_ca(permitted=("localhost", "test", "internal", "127.0.0.0/8", "::1/128"))
    (out / "ca.crt").write_bytes(old.cert_pem)
    certs.write_private(out / "ca.key", old.key_pem)
    refused = run_cli("certs", "issue", "--certs-dir", str(out), "--name", "10.0.0.5")
    assert_one_line_error(refused, "--name 10.0.0.5", "IP addresses in 127.0.0.0/8, ::1/128")
    reused = run_cli("certs", "init", "--certs-dir", str(out))
    assert reused.returncode == 0, reused.stderr
    assert "reused CA" in reused.stdout
    assert "grpcio" in reused.stderr and "certs init again" in reused.stderr


def test_inspect_checks_a_chain_as_tls_clients_do(tmp_path: Path) -> None:
    """The client certificate of `certs init` (a CN, no SAN) verifies for mutual TLS, as OpenSSL
    has it; an IP-only server certificate verifies as a server certificate for its address."""
    out = tmp_path / "certs"
    assert run_cli("certs", "init", "--certs-dir", str(out)).returncode == 0
    assert run_cli("certs", "issue", "--certs-dir", str(out), "--name", "127.0.0.2").returncode == 0
    ca = str(out / "ca.crt")
    client = run_cli("certs", "inspect", str(out / "client.crt"), "--ca", ca)
    assert client.returncode == 0, client.stdout + client.stderr
    assert "verifies as a client certificate" in client.stdout
    by_ip = run_cli("certs", "inspect", str(out / "127.0.0.2.crt"), "--ca", ca)
    assert by_ip.returncode == 0, by_ip.stdout + by_ip.stderr
    assert "verifies as a server certificate" in by_ip.stdout
    other = certs.create_ca("other")
    (tmp_path / "other.crt").write_bytes(other.cert_pem)
    wrong = run_cli(
        "certs", "inspect", str(out / "client.crt"), "--ca", str(tmp_path / "other.crt")
    )
    assert wrong.returncode == 1 and "does not verify" in wrong.stdout


def test_mtls_flags_are_checked_at_start(dev_certs: object) -> None:
    serve = ["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"]
    ca = str(dev_certs.ca)  # type: ignore[attr-defined]
    assert_one_line_error(run_cli(*serve, "--client-ca", ca), "--allow-all")
    assert_one_line_error(run_cli(*serve, "--allow-cn", "x"), "--client-ca")
    assert_one_line_error(run_cli(*serve, "--pkcs12-password-file", ca), "--pkcs12")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.needs("update-ca-certificates", install="apt-get install ca-certificates")
@pytest.mark.needs("certutil", install="apt-get install libnss3-tools")
@pytest.mark.needs("chromium", install="apt-get install chromium")
@pytest.mark.needs("curl", install="apt-get install curl")
def test_certs_trust_makes_curl_and_chromium_accept_and_untrust_undoes_it(
    tmp_path: Path,
) -> None:
    """After `certs trust`, plain curl (no --cacert) and headless Chromium (no certificate
    flags) load a page from a proxy with the development certificate; after `certs untrust`,
    both refuse it again."""
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    cli = [sys.executable, "-m", "proxy", "certs"]
    subprocess.run([*cli, "init", "--out", str(tmp_path / "certs")], check=True, env=env)
    app = UpstreamApp().start()
    certs_dir = tmp_path / "certs"
    proxy = ProxyProcess(
        serve_args(
            app.base,
            None,
            "--cert",
            str(certs_dir / "server.crt"),
            "--key",
            str(certs_dir / "server.key"),
        )
    ).start()

    def curl() -> int:
        return subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", f"https://localhost:{proxy.port}/echo/trusted"],
            capture_output=True,
            timeout=30,
            env=env,
        ).returncode

    def chromium() -> str:
        return subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--host-resolver-rules=MAP localhost 127.0.0.1",
                "--dump-dom",
                f"https://localhost:{proxy.port}/echo/in-the-browser",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        ).stdout

    try:
        assert curl() == 60, "before: the development CA is not trusted"
        trusted = subprocess.run(
            [*cli, "trust", "--dir", str(tmp_path / "certs")],
            capture_output=True,
            text=True,
            env=env,
        )
        assert trusted.returncode == 0, trusted.stderr
        try:
            assert curl() == 0
            assert "/echo/in-the-browser" in chromium()
        finally:
            untrusted = subprocess.run(
                [*cli, "untrust", "--dir", str(tmp_path / "certs")],
                capture_output=True,
                text=True,
                env=env,
            )
        assert untrusted.returncode == 0, untrusted.stderr
        assert curl() == 60, "after untrust: refused again"
        assert "/echo/in-the-browser" not in chromium()
    finally:
        proxy.stop()
        app.stop()
