"""CRLs as `--client-crl` reads them: PEM (several to a file) or DER, signed by the client CA,
and a stale one kept with a warning."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.config import CertificateError
from proxy.tls import certs, crl


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.create_ca("crl tests CA")


def test_pem_files_may_hold_several_and_der_one(ca: certs.Issued, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    first, second = crl.make_crl(ca, [1, 2]), crl.make_crl(ca, [3])
    pem = tmp_path / "two.crl"
    pem.write_bytes(first.public_bytes(Encoding.PEM) + second.public_bytes(Encoding.PEM))
    der = tmp_path / "one.der"
    der.write_bytes(crl.make_crl(ca, [4]).public_bytes(Encoding.DER))
    loaded = crl.check_client_crls([pem, der], tmp_path / "ca.crt")
    issuer = ca.certificate.subject.rfc4514_string()
    assert loaded.revoked == {(issuer, n) for n in (1, 2, 3, 4)}
    assert [name for name, _ in loaded.next_updates] == ["two.crl", "two.crl#1", "one.der"]
    assert loaded.pem.count(crl.PEM_BEGIN) == 3
    assert loaded.warnings == ()


def test_a_stale_crl_is_kept_and_warned_of(ca: certs.Issued, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    path = tmp_path / "stale.crl"
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=2)
    path.write_bytes(crl.make_crl(ca, [9], days=1, last_update=old).public_bytes(Encoding.PEM))
    loaded = crl.check_client_crls([path], tmp_path / "ca.crt")
    assert loaded.pem
    assert len(loaded.warnings) == 1
    assert "stale.crl: past its next update" in loaded.warnings[0]


def test_a_crl_of_another_ca_is_refused(ca: certs.Issued, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    path = tmp_path / "other.crl"
    path.write_bytes(crl.make_crl(certs.create_ca("other"), [1]).public_bytes(Encoding.PEM))
    with pytest.raises(CertificateError, match="not signed by a CA of --client-ca"):
        crl.check_client_crls([path], tmp_path / "ca.crt")


def test_a_forged_crl_with_the_ca_s_name_is_refused(ca: certs.Issued, tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    impostor = certs.create_ca("crl tests CA")  # same subject, another key
    path = tmp_path / "forged.crl"
    path.write_bytes(crl.make_crl(impostor, []).public_bytes(Encoding.PEM))
    with pytest.raises(CertificateError, match="not signed"):
        crl.check_client_crls([path], tmp_path / "ca.crt")


def test_not_a_crl(tmp_path: Path) -> None:
    path = tmp_path / "x.crl"
    path.write_bytes(b"garbage")
    with pytest.raises(CertificateError, match="holds no CRL"):
        crl.load_crls(path)
