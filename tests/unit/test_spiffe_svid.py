"""An X509SVIDResponse turned into what is served, with the checks a reloaded file gets: each
bad update refused with one line naming the endpoint, the SPIFFE ID and why."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives import serialization

from proxy.config import CertificateError, Config
from proxy.identity import AccessPolicy
from proxy.tls import certs
from proxy.tls.spiffe import bundle_from, split_der
from tests.support.spiffe_agent import SERVER_ID, Identity, new_svid

AGENT = "unix:///run/spire/agent.sock"
CA = certs.create_ca("example.org SPIFFE CA")
OTHER_CA = certs.create_ca("other.org SPIFFE CA")


def config(**extra: object) -> Config:
    return Config(spiffe_endpoint=AGENT, **extra).validate()  # type: ignore[arg-type]


def test_the_svid_is_served_under_its_spiffe_id() -> None:
    svid = new_svid(CA)
    bundle, warnings = bundle_from(config(), Identity(svid, [CA]).response())
    assert warnings == []
    (served,) = bundle.served
    assert served.name == SERVER_ID and SERVER_ID in served.uri_names
    assert served.serial == svid.certificate.serial_number
    assert bundle.client_ca is None, "no rule: no client certificates asked for"


def test_with_a_rule_the_client_ca_is_the_bundle_and_the_federated_bundles() -> None:
    rule = AccessPolicy(allow_uri_san=("spiffe://other.org/*",))
    identity = Identity(new_svid(CA), [CA], {"spiffe://other.org": [OTHER_CA]})
    bundle, _ = bundle_from(config(policy=rule), identity.response())
    assert bundle.client_ca is not None
    pems = [c.certificate.public_bytes(serialization.Encoding.PEM) for c in (CA, OTHER_CA)]
    assert bundle.client_ca == b"".join(pems)


@pytest.mark.parametrize(
    ("identity", "fragment"),
    [
        (Identity(new_svid(CA), [CA], key=certs.new_key()), "does not match it"),
        (Identity(new_svid(OTHER_CA), [CA]), "does not verify against its trust bundle"),
        (
            Identity(new_svid(CA), [CA], spiffe_id="spiffe://example.org/ns/other"),
            "does not name spiffe://example.org/ns/other in its URI SAN",
        ),
        (
            Identity(
                certs.issue(
                    CA,
                    [SERVER_ID],
                    days=1,
                    not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
                ),
                [CA],
            ),
            "expired on",
        ),
    ],
    ids=["key-mismatch", "other-ca", "other-id", "expired"],
)
def test_a_bad_update_is_refused_with_one_line(identity: Identity, fragment: str) -> None:
    with pytest.raises(CertificateError, match=fragment) as refused:
        bundle_from(config(), identity.response())
    message = str(refused.value)
    assert message.startswith("--spiffe-endpoint") and AGENT in message and "\n" not in message


def test_a_response_without_an_svid_or_with_garbage_is_refused() -> None:
    response = Identity(new_svid(CA), [CA]).response()
    del response.svids[:]
    with pytest.raises(CertificateError, match="the agent sent no SVID"):
        bundle_from(config(), response)
    response = Identity(new_svid(CA), [CA]).response()
    response.svids[0].x509_svid = b"\x30\x82\xff\xff garbage"
    with pytest.raises(CertificateError, match="is not DER certificates"):
        bundle_from(config(), response)


def test_split_der_reads_concatenated_certificates() -> None:
    ders = [c.certificate.public_bytes(serialization.Encoding.DER) for c in (CA, OTHER_CA)]
    assert split_der(b"".join(ders)) == [CA.certificate, OTHER_CA.certificate]
    with pytest.raises(ValueError, match="cut short"):
        split_der(ders[0][:-1])
