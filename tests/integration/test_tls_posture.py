"""The proxy's TLS posture, checked by an independent scanner (sslyze) against a running proxy."""

from __future__ import annotations

from typing import Any

import pytest
from sslyze import (
    ScanCommand,
    ScanCommandAttemptStatusEnum,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
)
from sslyze.plugins.robot.implementation import RobotScanResultEnum
from sslyze.plugins.session_resumption.implementation import TlsResumptionSupportEnum

from tests.support.proxy import ProxyProcess

COMMANDS = {
    ScanCommand.SSL_2_0_CIPHER_SUITES,
    ScanCommand.SSL_3_0_CIPHER_SUITES,
    ScanCommand.TLS_1_0_CIPHER_SUITES,
    ScanCommand.TLS_1_1_CIPHER_SUITES,
    ScanCommand.TLS_1_2_CIPHER_SUITES,
    ScanCommand.TLS_1_3_CIPHER_SUITES,
    ScanCommand.TLS_COMPRESSION,
    ScanCommand.SESSION_RENEGOTIATION,
    ScanCommand.HEARTBLEED,
    ScanCommand.ROBOT,
    ScanCommand.OPENSSL_CCS_INJECTION,
    ScanCommand.SESSION_RESUMPTION,
}


@pytest.fixture(scope="module")
def scan(proxy: ProxyProcess) -> Any:
    location = ServerNetworkLocation(hostname="localhost", port=proxy.port, ip_address="127.0.0.1")
    scanner = Scanner()
    scanner.queue_scans([ServerScanRequest(server_location=location, scan_commands=COMMANDS)])
    (result,) = list(scanner.get_results())
    assert result.scan_result is not None, result.connectivity_error_trace
    return result.scan_result


def outcome(scan: Any, name: str) -> Any:
    attempt = getattr(scan, name)
    assert attempt.status == ScanCommandAttemptStatusEnum.COMPLETED, (name, attempt.error_trace)
    return attempt.result


@pytest.mark.parametrize(
    "protocol",
    [
        "ssl_2_0_cipher_suites",
        "ssl_3_0_cipher_suites",
        "tls_1_0_cipher_suites",
        "tls_1_1_cipher_suites",
    ],
)
def test_old_protocols_are_refused(scan: Any, protocol: str) -> None:
    assert outcome(scan, protocol).accepted_cipher_suites == []


def test_tls_1_2_only_with_forward_secret_aead_suites(scan: Any) -> None:
    names = [
        s.cipher_suite.name for s in outcome(scan, "tls_1_2_cipher_suites").accepted_cipher_suites
    ]
    assert names, "TLS 1.2 is offered"
    for name in names:
        assert "_ECDHE_" in name, f"{name}: no forward secrecy"
        assert "_GCM_" in name or "CHACHA20_POLY1305" in name, f"{name}: not AEAD"


def test_tls_1_3_is_offered(scan: Any) -> None:
    assert outcome(scan, "tls_1_3_cipher_suites").accepted_cipher_suites


def test_no_compression_and_no_insecure_renegotiation(scan: Any) -> None:
    assert outcome(scan, "tls_compression").supports_compression is False
    renegotiation = outcome(scan, "session_renegotiation")
    assert renegotiation.is_vulnerable_to_client_renegotiation_dos is False


def test_not_vulnerable_to_heartbleed_robot_or_ccs_injection(scan: Any) -> None:
    assert outcome(scan, "heartbleed").is_vulnerable_to_heartbleed is False
    assert outcome(scan, "openssl_ccs_injection").is_vulnerable_to_ccs_injection is False
    assert outcome(scan, "robot").robot_result in (
        RobotScanResultEnum.NOT_VULNERABLE_NO_ORACLE,
        RobotScanResultEnum.NOT_VULNERABLE_RSA_NOT_SUPPORTED,
    )


def test_session_resumption_works(scan: Any) -> None:
    resumption = outcome(scan, "session_resumption")
    assert TlsResumptionSupportEnum.FULLY_SUPPORTED in (
        resumption.session_id_resumption_result,
        resumption.tls_ticket_resumption_result,
    )
