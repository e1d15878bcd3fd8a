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
        "cannot be read",
    )


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
