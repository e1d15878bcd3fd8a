"""Parsing and validation of settings (pure)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import (
    Address,
    Config,
    ConfigError,
    Upstream,
    parse_address,
    parse_duration,
    parse_size,
    parse_upstream,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("7", 7.0),
        ("0s", 0.0),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "10x", "-1s", "1e3s", "ten seconds"])
def test_bad_durations_name_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--idle-timeout"):
        parse_duration(text, option="--idle-timeout")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("16384", 16384),
        ("16KiB", 16384),
        ("16k", 16384),
        ("1MB", 1_000_000),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1 << 30),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_unlimited_size_only_where_allowed() -> None:
    assert parse_size("unlimited", allow_unlimited=True) is None
    with pytest.raises(ConfigError, match="not a size"):
        parse_size("unlimited")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("0.0.0.0:8443", Address("0.0.0.0", 8443)),
        ("[::]:8443", Address("::", 8443)),
        ("[::1]:0", Address("::1", 0)),
        (":9901", Address("0.0.0.0", 9901)),
        ("localhost:80", Address("localhost", 80)),
    ],
)
def test_addresses(text: str, address: Address) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text", ["8443", "::1:8443", "[::1]8443", "host:port", "h:70000", "[nope]:1", "a b:1"]
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


@pytest.mark.parametrize(
    ("parse", "message"),
    [
        (
            lambda: parse_address("8443", option="--listen"),
            "--listen: '8443' has no host; use HOST:PORT, e.g. 0.0.0.0:8443",
        ),
        (
            lambda: parse_address("0.0.0.0", option="--listen"),
            "--listen: '0.0.0.0' has no port; use HOST:PORT, e.g. 0.0.0.0:8443",
        ),
        (
            lambda: parse_upstream("127.0.0.1"),
            "--upstream: '127.0.0.1' has no port; use HOST:PORT, e.g. http://127.0.0.1:8080",
        ),
        (
            lambda: parse_upstream("h2c://8080"),
            "--upstream: '8080' has no host; use HOST:PORT, e.g. h2c://127.0.0.1:8080",
        ),
        (
            lambda: parse_upstream("http://127.0.0.1:0"),
            "--upstream: port 0 in '127.0.0.1:0' is no port an app listens on; give the app's "
            "port, e.g. http://127.0.0.1:8080",
        ),
    ],
)
def test_address_messages_say_what_is_missing_with_an_example_of_its_kind(
    parse: Callable[[], object], message: str
) -> None:
    """An upstream's example is an app's address, not a listen address; a bare port lacks its
    host (not its port); port 0 (a free port, for listeners) is no app's port."""
    with pytest.raises(ConfigError) as caught:
        parse()
    assert str(caught.value) == message


@pytest.mark.parametrize("text", ["[0.0.0.0:17443,[::]]:17443", "0.0.0.0:8443,[::]:8443"])
def test_a_list_of_addresses_is_refused_pointing_to_the_dual_stack_wildcard(text: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_address(text, option="--listen")
    assert str(refused.value) == (
        f"--listen: {text!r} is a list; give one address: [::]:PORT listens on IPv4 and IPv6 alike"
    )


def test_ipv6_address_prints_with_brackets() -> None:
    assert str(Address("::1", 8443)) == "[::1]:8443"


def test_upstreams() -> None:
    assert parse_upstream("http://127.0.0.1:8080") == Upstream(address=Address("127.0.0.1", 8080))
    assert parse_upstream("127.0.0.1:8080/") == Upstream(address=Address("127.0.0.1", 8080))
    assert str(parse_upstream("127.0.0.1:8080")) == "http://127.0.0.1:8080", "bare: http://"
    assert parse_upstream("unix:/run/app.sock") == Upstream(unix_path="/run/app.sock")
    for bad in ("https://x:1", "unix:relative.sock", "http://x:1/path"):
        with pytest.raises(ConfigError, match="--upstream"):
            parse_upstream(bad)


def test_validation_catches_relations() -> None:
    with pytest.raises(ConfigError, match="--admin-listen"):
        Config(listen=Address("0.0.0.0", 9000), admin_listen=Address("127.0.0.1", 9000)).validate()
    with pytest.raises(ConfigError, match="greater than zero"):
        Config(idle_timeout=0).validate()
    assert Config(listen=Address("127.0.0.1", 0), admin_listen=Address("127.0.0.1", 0)).validate()


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", ""]))
def test_duration_round_trip(value: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}[unit]
    assert parse_duration(f"{value}{unit}") == pytest.approx(value * factor)


@given(st.text(max_size=30))
def test_parsers_never_raise_anything_but_config_error(text: str) -> None:
    for parse in (parse_duration, parse_size, parse_address, parse_upstream):
        with contextlib.suppress(ConfigError):
            parse(text)
