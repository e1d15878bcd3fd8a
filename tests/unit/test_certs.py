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
