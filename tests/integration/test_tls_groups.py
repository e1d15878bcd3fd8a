"""--tls-groups: the key exchange groups the proxy offers (SSL_CTX_set1_groups_list), checked
with openssl s_client on this machine's OpenSSL; the start-up log about post-quantum key
exchange. (Debian 13's OpenSSL 3.5 and X25519MLKEM768: tests/e2e/test_image_root.py.)"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import Iterator

import pytest

from proxy.tls.tickets import group_names, has_cve_2026_2673
from tests.support.proxy import DevCerts, ProxyProcess, serve_args
from tests.support.upstream import UpstreamApp


def s_client(port: int, dev: DevCerts, groups: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            "-CAfile",
            str(dev.ca),
            "-groups",
            groups,
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def temp_key(result: subprocess.CompletedProcess[str]) -> str:
    """The group the handshake used, as s_client prints it (3.0: Server Temp Key)."""
    for line in result.stdout.splitlines():
        if line.startswith(("Server Temp Key:", "Negotiated TLS1.3 group:")):
            return line
    return ""


@pytest.fixture(scope="module")
def started(dev_certs: DevCerts) -> Iterator[list[ProxyProcess]]:
    procs: list[ProxyProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


def start(started: list[ProxyProcess], dev: DevCerts, upstream: str, *extra: str) -> ProxyProcess:
    proc = ProxyProcess(serve_args(upstream, dev, *extra)).start()
    started.append(proc)
    return proc


def test_tls_groups_x25519_serves_x25519_and_refuses_a_p256_only_client(
    started: list[ProxyProcess], dev_certs: DevCerts, upstream: UpstreamApp
) -> None:
    default = start(started, dev_certs, upstream.base)
    assert "prime256v1" in temp_key(s_client(default.port, dev_certs, "P-256")), (
        "OpenSSL's own groups include P-256 (s_client calls it prime256v1)"
    )
    proxy = start(started, dev_certs, upstream.base, "--tls-groups", "X25519")
    accepted = s_client(proxy.port, dev_certs, "X25519")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "X25519" in temp_key(accepted), accepted.stdout
    refused = s_client(proxy.port, dev_certs, "P-256")
    assert refused.returncode != 0 and temp_key(refused) == ""
    assert "handshake failure" in refused.stderr, refused.stderr


def test_the_env_variable_sets_the_groups_too(
    started: list[ProxyProcess], dev_certs: DevCerts, upstream: UpstreamApp
) -> None:
    proxy = ProxyProcess(
        serve_args(upstream.base, dev_certs), env={"TLS_SIDECAR_TLS_GROUPS": "P-384"}
    ).start()
    started.append(proxy)
    assert "secp384r1" in temp_key(s_client(proxy.port, dev_certs, "X25519:P-384"))
    assert s_client(proxy.port, dev_certs, "X25519").returncode != 0


@pytest.mark.parametrize(
    ("value", "named"),
    [("X25519:NoSuchGroup", "NoSuchGroup"), ("X25519::P-256", "'X25519::P-256'")],
)
def test_an_unknown_group_stops_start_up_with_one_line_listing_the_groups_on_offer(
    value: str, named: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--tls-groups", value],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ),
        check=False,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("tls-sidecar: error: --tls-groups") and named in line, line
    if "NoSuchGroup" in value:
        offered = line.rsplit("it offers ", 1)[1].split(":")
        assert {"X25519", "P-256", "P-384"} <= set(offered), line
        assert ("X25519MLKEM768" in offered) == (ssl.OPENSSL_VERSION_INFO[:2] >= (3, 5)), line
    assert "Traceback" not in result.stderr


def test_the_start_log_says_whether_hybrid_post_quantum_key_exchange_is_available(
    started: list[ProxyProcess], dev_certs: DevCerts, upstream: UpstreamApp
) -> None:
    proxy = start(started, dev_certs, upstream.base)
    (line,) = [x for x in proxy.stderr_lines if "post-quantum key exchange" in x]
    if ssl.OPENSSL_VERSION_INFO[:2] >= (3, 5):
        assert "X25519MLKEM768) available, in OpenSSL's default groups" in line, line
    else:
        assert "X25519MLKEM768) not available" in line and ssl.OPENSSL_VERSION in line, line
    build_info = proxy.metric("tls_sidecar_build_info", f'openssl="{ssl.OPENSSL_VERSION}"')
    assert build_info == 1


def test_group_names_read_openssl_35s_list_syntax() -> None:
    assert group_names("?*X25519MLKEM768 / ?*X25519:?secp256r1 / -X448") == [
        "X25519MLKEM768",
        "X25519",
        "secp256r1",
        "X448",
    ]


def test_openssl_350_to_355_are_the_releases_warned_about() -> None:
    warned = [
        v
        for v in (
            (3, 0, 0, 22, 0),
            (3, 5, 0, 0, 0),
            (3, 5, 0, 5, 0),
            (3, 5, 0, 6, 0),
            (3, 6, 0, 0, 0),
            (3, 4, 0, 9, 0),
        )
        if has_cve_2026_2673(v)
    ]
    assert warned == [(3, 5, 0, 0, 0), (3, 5, 0, 5, 0)]
