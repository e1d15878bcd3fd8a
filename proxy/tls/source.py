"""Which TlsState serves: certificate files, or the SPIFFE Workload API, whose module (and grpc
with it) is imported only when --spiffe-endpoint is given."""

from __future__ import annotations

from proxy.config import Config
from proxy.tls.context import TlsState


def tls_state(config: Config) -> TlsState:
    if config.spiffe_endpoint is None:
        return TlsState(config)
    from proxy.tls.spiffe import SpiffeTls  # noqa: PLC0415

    return SpiffeTls(config)
