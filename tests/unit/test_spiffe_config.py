"""--spiffe-endpoint's settings: the socket address, where it comes from, and the relations
with the other certificate sources, each refused with one line naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import Config, ConfigError
from proxy.identity import AccessPolicy
from proxy.spiffe_config import endpoint_from, parse_endpoint

AGENT = "unix:///run/spire/agent.sock"


@pytest.mark.parametrize(
    "given",
    [
        "unix:///run/spire/agent.sock",
        "unix:/run/spire/agent.sock",
        " unix:///run/spire/agent.sock ",
    ],
)
def test_the_spiffe_spellings_of_a_unix_socket(given: str) -> None:
    assert parse_endpoint(given) == AGENT


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ("tcp://127.0.0.1:8081", "is not a unix socket address"),
        ("/run/spire/agent.sock", "give it as unix:///run/spire/agent.sock"),
        ("unix://", "has no path"),
    ],
)
def test_other_addresses_are_refused_with_the_spelling_to_use(given: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as refused:
        parse_endpoint(given)
    assert str(refused.value).startswith("--spiffe-endpoint: ")


def test_the_flag_wins_and_the_standard_variable_counts_only_without_other_certificates() -> None:
    environ = {"SPIFFE_ENDPOINT_SOCKET": "unix:///var/run/agent.sock"}
    assert endpoint_from(AGENT, False, environ) == AGENT
    assert endpoint_from(None, False, environ) == "unix:///var/run/agent.sock"
    assert endpoint_from(None, True, environ) is None, "--cert given: the app's variable"
    assert endpoint_from(None, False, {}) is None


def test_a_bad_standard_variable_is_named_as_such() -> None:
    with pytest.raises(ValueError, match=r"^SPIFFE_ENDPOINT_SOCKET: 'tcp://x:1' is not a unix"):
        endpoint_from(None, False, {"SPIFFE_ENDPOINT_SOCKET": "tcp://x:1"})


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"cert_files": (Path("a.crt"),), "key_files": (Path("a.key"),)}, "give one source"),
        ({"cert_dir": Path("certs")}, "give one source"),
        (
            {"client_ca": Path("ca.crt"), "policy": AccessPolicy(allow_all=True)},
            "the trust bundle is the client CA",
        ),
        ({"spiffe_timeout": 0.0}, "--spiffe-timeout must be greater than zero"),
        (
            {"client_auth": "none", "policy": AccessPolicy(allow_all=True)},
            "--client-auth none contradicts the --allow-\\* rules",
        ),
    ],
)
def test_relations_with_other_settings(extra: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Config(spiffe_endpoint=AGENT, **extra).validate()  # type: ignore[arg-type]


def test_an_allow_rule_turns_on_mutual_tls_with_the_bundle() -> None:
    rule = AccessPolicy(allow_uri_san=("spiffe://example.org/ns/web",))
    assert Config(spiffe_endpoint=AGENT, policy=rule).validate().mutual_tls
    assert not Config(spiffe_endpoint=AGENT).validate().mutual_tls
    with pytest.raises(ConfigError, match="--allow-\\* rules need --client-ca"):
        Config(policy=rule).validate()
