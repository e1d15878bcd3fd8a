"""Certificate generation and checks (pure, with cryptography)."""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from proxy.config import CertificateError
from proxy.tls import certs


def test_issued_leaf_has_names_and_chains_to_the_ca() -> None:
    ca = certs.create_ca()
    leaf = certs.issue(ca, ["localhost", "127.0.0.1", "spiffe://example.org/app"])
    assert certs.san_strings(leaf.certificate) == [
        "DNS:localhost",
        "IP:127.0.0.1",
        "URI:spiffe://example.org/app",
    ]
    assert leaf.certificate.issuer == ca.certificate.subject
    assert certs.key_matches(leaf.certificate, leaf.key)
    assert not certs.key_matches(leaf.certificate, ca.key)


def test_rsa_keys() -> None:
    leaf = certs.issue(None, ["localhost"], key_type="rsa")
    assert leaf.key.key_size == 2048


def test_check_pair_refuses_mismatch_disorder_and_expiry(tmp_path: Path) -> None:
    ca = certs.create_ca()
    leaf = certs.issue(ca, ["localhost"])
    path = tmp_path / "tls.crt"
    assert certs.check_pair([leaf.certificate, ca.certificate], leaf.key, path) == []
    with pytest.raises(CertificateError, match="does not match"):
        certs.check_pair([leaf.certificate], ca.key, path)
    with pytest.raises(CertificateError, match="out of order"):
        certs.check_pair([leaf.certificate, leaf.certificate], leaf.key, path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=1000)
    with pytest.raises(CertificateError, match="expired"):
        certs.check_pair([leaf.certificate], leaf.key, path, now=later)
    warnings = certs.check_pair([leaf.certificate], leaf.key, path, now=later, allow_expired=True)
    assert "expired" in warnings[0]


def test_key_files_are_private(tmp_path: Path) -> None:
    key = tmp_path / "k.key"
    certs.write_private(key, b"secret")
    assert key.stat().st_mode & 0o777 == 0o600


def test_loading_errors_are_clear(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    with pytest.raises(CertificateError, match="no PEM certificate"):
        certs.load_chain(junk)
    with pytest.raises(CertificateError, match="no usable PEM private key"):
        certs.load_key(junk)
    with pytest.raises(CertificateError, match="cannot be read"):
        certs.load_key(tmp_path / "missing.key")


def test_a_world_readable_key_is_flagged_unless_it_is_a_secret_volume(tmp_path: Path) -> None:
    from proxy.tls.certload import key_exposed  # noqa: PLC0415

    plain = tmp_path / "plain.key"
    plain.write_bytes(b"k")
    plain.chmod(0o644)
    assert key_exposed(plain) == [
        f"key file {plain} is readable by every user; restrict it with chmod 600"
    ]
    plain.chmod(0o600)
    assert key_exposed(plain) == []
    # The kubelet's layout: files behind a `..data` symlink to a timestamped folder.
    volume = tmp_path / "etc-tls"
    (volume / "..2026_11_25").mkdir(parents=True)
    (volume / "..2026_11_25" / "tls.key").write_bytes(b"k")
    (volume / "..2026_11_25" / "tls.key").chmod(0o444)
    (volume / "..data").symlink_to("..2026_11_25")
    (volume / "tls.key").symlink_to("..data/tls.key")
    assert key_exposed(volume / "tls.key") == []


def _handshake(ca: Path, chain: bytes, key: bytes, tmp_path: Path) -> None:
    """A TLS handshake in memory: a server with `chain`, a client trusting only `ca` (no host
    name check, so only the chain and its name constraints are judged)."""

    (tmp_path / "chain.pem").write_bytes(chain)
    (tmp_path / "key.pem").write_bytes(key)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.load_verify_locations(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() is not None and server.version() is not None:
            return


def test_the_development_ca_cannot_vouch_for_a_real_site(tmp_path: Path) -> None:
    """`certs init` makes a CA limited by name constraints to localhost, *.localhost, *.test and
    *.internal (plus DNS names asked for): a certificate it signs for example.com is refused by
    OpenSSL and by Python's ssl. IP addresses are not constrained (grpcio's BoringSSL cannot
    check IP constraints and refuses every IP SAN under them)."""
    from proxy.commands.devcerts import dev_files, init_dev_certificates  # noqa: PLC0415

    init_dev_certificates(tmp_path / "dev", ("localhost", "127.0.0.1", "::1", "myapp.lan"))
    files = dev_files(tmp_path / "dev")
    ca = certs.Issued(certs.load_chain(files.ca_cert)[0], certs.load_key(files.ca_key, "--key"))
    constraints = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    assert constraints.permitted_subtrees is not None
    assert {str(n.value) for n in constraints.permitted_subtrees} == {
        "localhost",
        "test",
        "internal",
        "myapp.lan",
    }
    assert all(isinstance(n, x509.DNSName) for n in constraints.permitted_subtrees)
    assert constraints.excluded_subtrees is None
    rogue = certs.issue(ca, ["example.com"])
    good = certs.issue(ca, ["shop.test", "localhost", "127.0.0.1"])
    (tmp_path / "rogue.pem").write_bytes(rogue.cert_pem)
    (tmp_path / "good.pem").write_bytes(good.cert_pem)
    if shutil.which("openssl"):
        refused = subprocess.run(
            ["openssl", "verify", "-CAfile", str(files.ca_cert), str(tmp_path / "rogue.pem")],
            capture_output=True,
            text=True,
        )
        assert refused.returncode != 0 and "subtree violation" in refused.stdout + refused.stderr
        accepted = subprocess.run(
            ["openssl", "verify", "-CAfile", str(files.ca_cert), str(tmp_path / "good.pem")],
            capture_output=True,
            text=True,
        )
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    with pytest.raises(ssl.SSLCertVerificationError, match="subtree violation"):
        _handshake(files.ca_cert, rogue.cert_pem, rogue.key_pem, tmp_path)
    _handshake(files.ca_cert, good.cert_pem, good.key_pem, tmp_path)  # within: accepted
    # The development client certificate (a CN, no SAN) still verifies for mutual TLS.
    client = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(files.ca_cert),
            "-purpose",
            "sslclient",
            str(files.client_cert),
        ],
        capture_output=True,
        text=True,
    )
    assert client.returncode == 0, client.stdout + client.stderr


def test_what_a_ca_may_vouch_for_is_read_as_verifiers_read_it() -> None:
    """A DNS constraint covers the name and the names under it; a constraint limits only names
    of its kind (IPv4 and IPv6 addresses are one kind, as OpenSSL has it); a CN that looks like
    a host name counts when there is no DNS SAN (OpenSSL checks it)."""
    from proxy.tls import certcheck  # noqa: PLC0415

    ca = certs.create_ca(permitted=("test", "10.0.0.0/8")).certificate
    outside = certcheck.outside_constraints(
        ca,
        certs.subject_alt_names(
            ["a.test", "test", "atest", "b.example", "10.1.2.3", "192.0.2.1", "::1", "spiffe://x/y"]
        ),
    )
    assert outside == ["atest", "b.example", "192.0.2.1", "::1"]
    assert certcheck.limits_ip_addresses(ca)
    assert certcheck.constraints_text(ca) == (
        "test and the names under them; IP addresses in 10.0.0.0/8"
    )
    dev = certs.create_ca(permitted=certs.DEV_PERMITTED).certificate
    assert not certcheck.limits_ip_addresses(dev)
    by_ip = certs.issue(certs.Issued(dev, certs.new_key()), ["10.0.0.5"]).certificate
    assert by_ip.subject.rfc4514_string() == "CN=ip-10-0-0-5"
    named = certs.issue(
        certs.Issued(dev, certs.new_key()), ["10.0.0.5"], common_name="api.example.com"
    ).certificate
    assert certcheck.cn_outside_constraints(dev, named) == ["api.example.com"]
    assert certcheck.cn_outside_constraints(dev, by_ip) == []
