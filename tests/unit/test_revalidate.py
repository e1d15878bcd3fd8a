"""The verdict on a client certificate that passed its handshake: still good, expired since,
revoked by a CRL loaded since, or signed by a CA no longer in the bundle."""

from __future__ import annotations

import time

import pytest

from proxy.tls import certs
from proxy.tls.revalidate import Trust, cached_verdicts, verdict


@pytest.fixture(scope="module")
def ca() -> certs.Issued:
    return certs.create_ca("revalidate tests CA")


@pytest.fixture(scope="module")
def leaf(ca: certs.Issued) -> certs.Issued:
    return certs.issue(ca, [], common_name="client", client=True, days=2)


def pem(issued: certs.Issued) -> str:
    return issued.cert_pem.decode("ascii")


def test_still_good(ca: certs.Issued, leaf: certs.Issued) -> None:
    assert verdict(pem(leaf), Trust((ca.certificate,), frozenset()), time.time()) is None


def test_expired_since(ca: certs.Issued, leaf: certs.Issued) -> None:
    in_three_days = time.time() + 3 * 86400
    assert verdict(pem(leaf), Trust((ca.certificate,), frozenset()), in_three_days) == "expired"


def test_revoked_since(ca: certs.Issued, leaf: certs.Issued) -> None:
    revoked = frozenset({(ca.certificate.subject.rfc4514_string(), leaf.certificate.serial_number)})
    assert verdict(pem(leaf), Trust((ca.certificate,), revoked), time.time()) == "revoked"


def test_the_ca_left_the_bundle(leaf: certs.Issued) -> None:
    other = certs.create_ca("another CA")
    assert verdict(pem(leaf), Trust((other.certificate,), frozenset()), time.time()) == (
        "ca_removed"
    )


def test_a_new_ca_with_the_old_name_is_not_the_old_ca(leaf: certs.Issued) -> None:
    rekeyed = certs.create_ca("revalidate tests CA")  # same subject, another key
    assert verdict(pem(leaf), Trust((rekeyed.certificate,), frozenset()), time.time()) == (
        "ca_removed"
    )


def test_one_verdict_per_certificate_in_a_round(ca: certs.Issued, leaf: certs.Issued) -> None:
    check = cached_verdicts(Trust((ca.certificate,), frozenset()), time.time())
    assert check("a", pem(leaf)) is None
    assert check("a", "not even PEM: the cached verdict is used") is None
