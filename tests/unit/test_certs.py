"""Certificate generation and checks (pure, with cryptography)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from proxy import certs
from proxy.config import CertificateError


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
    from proxy.certload import key_exposed  # noqa: PLC0415

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
