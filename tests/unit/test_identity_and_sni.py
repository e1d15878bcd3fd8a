"""Client-certificate rules and SNI selection (pure), with properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.identity import AccessPolicy, ClientIdentity, uri_matches
from proxy.tls.context import name_tables, select_certificate
from proxy.tls.material import ServedCertificate

segment = st.text(alphabet="abcdefghij-", min_size=1, max_size=6)


def identity(**kw: object) -> ClientIdentity:
    base: dict[str, object] = {
        "subject": "CN=x",
        "common_names": ("x",),
        "organizational_units": (),
        "dns_sans": (),
        "uri_sans": (),
        "sha256": "00",
        "pem": "",
    }
    base.update(kw)
    return ClientIdentity(**base)  # type: ignore[arg-type]


def test_uri_rules() -> None:
    assert uri_matches("spiffe://td/ns/prod/*", "spiffe://td/ns/prod/sa/api")
    assert not uri_matches("spiffe://td/ns/prod/*", "spiffe://td/ns/prod")
    assert not uri_matches("spiffe://td/ns/prod/*", "spiffe://td/ns/production/sa")
    assert uri_matches("spiffe://td/a", "spiffe://td/a")
    assert not uri_matches("spiffe://td/a", "spiffe://td/ab")


@given(st.lists(segment, min_size=1, max_size=4), st.lists(segment, min_size=1, max_size=4))
def test_prefix_rule_admits_exactly_what_lies_under_it(prefix: list[str], rest: list[str]) -> None:
    pattern = "spiffe://td/" + "/".join(prefix) + "/*"
    assert uri_matches(pattern, "spiffe://td/" + "/".join(prefix + rest))
    assert not uri_matches(pattern, "spiffe://td/" + "/".join(prefix))
    sibling = "spiffe://td/" + "/".join([*prefix[:-1], prefix[-1] + "x", *rest])
    assert not uri_matches(pattern, sibling)


def test_policy_decisions() -> None:
    policy = AccessPolicy(
        allow_cn=("a",),
        allow_ou=("ops",),
        allow_dns_san=("w.internal",),
        allow_uri_san=("spiffe://td/*",),
    )
    assert policy.decide(None) == "no_certificate"
    assert policy.decide(identity(common_names=("a",))) is None
    assert policy.decide(identity(organizational_units=("ops",))) is None
    assert policy.decide(identity(dns_sans=("w.internal",))) is None
    assert policy.decide(identity(uri_sans=("spiffe://td/x",))) is None
    assert policy.decide(identity(common_names=("b",), dns_sans=("other",))) == "not_allowed"
    assert AccessPolicy(allow_all=True).decide(identity()) is None
    assert AccessPolicy(allow_all=True).decide(None) == "no_certificate"


def served(*names: str) -> ServedCertificate:
    return ServedCertificate("n", "CN=n", 0.0, 1, tuple(names), ())


def test_sni_selection() -> None:
    exact, wildcard = name_tables(
        [served("default.test"), served("a.test"), served("*.b.test"), served("a.test")]
    )
    assert select_certificate("a.test", exact, wildcard) == 1, (
        "the first certificate claiming a name keeps it"
    )
    assert select_certificate("A.TEST.", exact, wildcard) == 1
    assert select_certificate("x.b.test", exact, wildcard) == 2
    assert select_certificate("y.x.b.test", exact, wildcard) == 0, (
        "a wildcard covers one label only"
    )
    assert select_certificate("b.test", exact, wildcard) == 0
    assert select_certificate(None, exact, wildcard) == 0


@given(
    st.lists(
        st.lists(st.sampled_from(["a.t", "b.t", "*.t", "*.a.t", "x.a.t"]), max_size=3),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from(["a.t", "b.t", "c.t", "x.a.t", "q.a.t", "", "t"]),
)
def test_sni_selection_is_a_certificate_that_covers_the_name_or_the_default(
    names: list[list[str]], server_name: str
) -> None:
    certificates = [served(*n) for n in names]
    index = select_certificate(server_name or None, *name_tables(certificates))
    assert 0 <= index < len(certificates)
    if index:
        covered = certificates[index].dns_names
        assert server_name in covered or f"*.{server_name.split('.', 1)[1]}" in covered
