"""--spiffe-endpoint's settings, pure: the socket address as the SPIFFE specification spells it,
where it comes from (the flag, TLS_SIDECAR_SPIFFE_ENDPOINT, else the standard
SPIFFE_ENDPOINT_SOCKET), and how it sits with the other certificate sources."""

from __future__ import annotations

import os
from collections.abc import Mapping

STANDARD_VARIABLE = "SPIFFE_ENDPOINT_SOCKET"
DEFAULT_TIMEOUT_SECONDS = 30.0


def parse_endpoint(text: str) -> str:
    """'unix:///run/spire/agent.sock' (or 'unix:/run/...') -> 'unix:///run/...'; ValueError
    with the message otherwise. Only unix sockets: the Workload API authenticates a workload by
    the peer process of its socket, which TCP cannot tell."""
    text = text.strip()
    if not text.startswith("unix:"):
        raise ValueError(
            f"--spiffe-endpoint: {text!r} is not a unix socket address; give it as "
            "unix:///run/spire/agent.sock (the SPIRE agent's socket)"
        )
    path = "/" + text[len("unix:") :].lstrip("/")
    if path == "/":
        raise ValueError(
            f"--spiffe-endpoint: {text!r} has no path; e.g. unix:///run/spire/agent.sock"
        )
    return "unix://" + path


def endpoint_from(
    given: str | None, other_source: bool, environ: Mapping[str, str] = os.environ
) -> str | None:
    """The endpoint to use: the flag (or its TLS_SIDECAR_ variable), else SPIFFE_ENDPOINT_SOCKET
    when no other certificate source was given (a pod whose app reads that variable keeps the
    sidecar's --cert)."""
    if given:
        return parse_endpoint(given)
    standard = environ.get(STANDARD_VARIABLE, "").strip()
    if standard and not other_source:
        try:
            return parse_endpoint(standard)
        except ValueError as e:
            raise ValueError(STANDARD_VARIABLE + str(e)[len("--spiffe-endpoint") :]) from None
    return None


def problem(
    *,
    endpoint: str | None,
    timeout: float,
    other_source: bool,
    client_ca: bool,
    client_crl: bool,
    no_client_auth_with_rules: bool = False,
) -> str | None:
    """What is wrong in --spiffe-endpoint's relations to the other settings, or None."""
    if endpoint is None:
        return None
    if other_source:
        return (
            "--spiffe-endpoint and --cert/--key (or --cert-dir, --pkcs12) are both given; the "
            "X.509 SVID is the serving certificate: give one source, not both"
        )
    if client_ca:
        return (
            "--spiffe-endpoint and --client-ca are both given; with the Workload API the trust "
            "bundle is the client CA: drop --client-ca and keep the --allow-* rules"
        )
    if client_crl:
        return "--client-crl needs --client-ca; it is not taken with --spiffe-endpoint"
    if no_client_auth_with_rules:
        return (
            "--client-auth none contradicts the --allow-* rules, which turn on mutual TLS with "
            "the trust bundle; use optional or require, or drop the rules"
        )
    if timeout <= 0:
        return "--spiffe-timeout must be greater than zero, e.g. 30s"
    return None
