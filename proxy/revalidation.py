"""--client-cert-revalidate: open connections whose client certificate has since expired, been
revoked by a newly loaded CRL, or lost its CA from the bundle are closed after the request in
flight (HTTP/2: GOAWAY), counted by reason and logged once each."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, cast

from proxy.downstream import ClientConnection
from proxy.tls.revalidate import Trust, cached_verdicts, trust_from

if TYPE_CHECKING:
    from proxy.core.context import ProxyContext
    from proxy.tls.context import TlsBundle

log = logging.getLogger("tls_sidecar.http")


class Revalidation:
    """Checks every open connection's certificate every `interval`, and when asked (after a
    reload brought new CRLs or CAs)."""

    def __init__(self, ctx: ProxyContext, interval: float) -> None:
        self.ctx = ctx
        self.interval = interval
        self._trust: tuple[TlsBundle, Trust] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self.ctx.loop.create_task(self._every())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check_now()

    def _current_trust(self) -> Trust | None:
        bundle = self.ctx.tls.bundle
        if bundle.client_ca is None:
            return None
        if self._trust is None or self._trust[0] is not bundle:
            self._trust = (bundle, trust_from(bundle.client_ca, bundle.crls))
        return self._trust[1]

    def check_now(self, now: float | None = None) -> int:
        """One round over the open connections; how many were told to close."""
        trust = self._current_trust()
        if trust is None:
            return 0
        check = cached_verdicts(trust, time.time() if now is None else now)
        closed = 0
        for conn in list(self.ctx.connections):
            client = cast(ClientConnection, conn)
            identity = client.session.identity
            if identity is None or client.retiring or client.closed:
                continue
            reason = check(identity.sha256, identity.pem)
            if reason is None:
                continue
            closed += 1
            self.ctx.metrics.client_cert_revalidation_closed.labels(reason).inc()
            log.warning(
                "closing a connection: its client certificate is no longer valid",
                extra={
                    "client": client.session.client.address,
                    "reason": reason,
                    "subject": identity.subject,
                },
            )
            client.retire()
        return closed
