"""--spiffe-endpoint: the serving certificate is the X.509 SVID the SPIFFE Workload API pushes,
and (with an --allow-* rule) the client CA is its trust bundle, federated bundles included.

Each update goes through the path a file reload takes (TlsState.reload, run by the server off the
event loop, counted and logged there): the key must match, the chain verify against the trust
bundle, the certificate be valid now; a bad update is refused and the previous SVID kept. The
watcher thread (tls/workload_api.py) only hands responses to the event loop, which asks the
server to reload; a lost agent is reconnected with backoff while the last good SVID serves."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import CertificateError, Config
from proxy.identity import dns_and_uri_sans
from proxy.tls import certcheck, certs
from proxy.tls.certload import LoadedCertificate, as_material
from proxy.tls.context import TlsBundle, TlsState, context_for
from proxy.tls.material import ServedCertificate
from proxy.tls.workload_api import X509Watcher

log = logging.getLogger("tls_sidecar.spiffe")


def split_der(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates (the Workload API's encoding of chains and bundles)."""
    out = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise ValueError("not a DER SEQUENCE")
        first = data[offset + 1]
        if first < 0x80:
            header, length = 2, first
        else:
            count = first & 0x7F
            header = 2 + count
            length = int.from_bytes(data[offset + 2 : offset + header], "big")
        end = offset + header + length
        if end > len(data):
            raise ValueError("a certificate is cut short")
        out.append(x509.load_der_x509_certificate(data[offset:end]))
        offset = end
    return out


def _refused(endpoint: str, what: str, fix: str) -> CertificateError:
    return CertificateError(f"--spiffe-endpoint {endpoint}: {what}; {fix}")


def _certificates(endpoint: str, data: bytes, what: str) -> list[x509.Certificate]:
    try:
        found = split_der(data)
    except ValueError as e:
        raise _refused(
            endpoint, f"the {what} is not DER certificates ({e})", "check the agent"
        ) from None
    if not found:
        raise _refused(endpoint, f"the {what} is empty", "check the agent's registration entry")
    return found


def _key(endpoint: str, data: bytes) -> certs.PrivateKey:
    try:
        key = serialization.load_der_private_key(data, password=None)
    except ValueError:
        raise _refused(endpoint, "the SVID's key is not PKCS#8 DER", "check the agent") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise _refused(endpoint, f"the SVID's key is a {type(key).__name__}", "use EC or RSA")
    return key


def bundle_from(config: Config, response: Any) -> tuple[TlsBundle, list[str]]:
    """The contexts for one X509SVIDResponse, validated as certificate files are; raises
    CertificateError, naming the endpoint and the SPIFFE ID, when it must not be served."""
    endpoint = config.spiffe_endpoint or ""
    if not response.svids:
        raise _refused(endpoint, "the agent sent no SVID", "check the registration entry")
    svid = response.svids[0]  # the default SVID, as the specification orders them
    chain = _certificates(endpoint, svid.x509_svid, "X.509 SVID")
    key = _key(endpoint, svid.x509_svid_key)
    roots = _certificates(endpoint, svid.bundle, "trust bundle")
    name = f"{endpoint} ({svid.spiffe_id})"
    if not certs.key_matches(chain[0], key):
        raise _refused(
            endpoint,
            f"the key sent with the X.509 SVID for {svid.spiffe_id} does not match it",
            "it is refused; check the agent, which must send the key the SVID was issued for",
        )
    if svid.spiffe_id not in dns_and_uri_sans(chain[0])[1]:
        raise _refused(
            endpoint,
            f"the X.509 SVID does not name {svid.spiffe_id} in its URI SAN",
            "it is refused; check the agent's upstream CA",
        )
    warnings = certs.check_pair(
        chain, key, name, allow_expired=config.allow_expired, option="--spiffe-endpoint"
    )
    why = certcheck.verify_chain(chain, roots)
    if why is not None:
        raise _refused(
            endpoint,
            f"the X.509 SVID for {svid.spiffe_id} does not verify against its trust bundle ({why})",
            "it is refused; check the agent's CA and bundle",
        )
    material = as_material(LoadedCertificate(svid.spiffe_id, chain, key))
    client_ca = None
    if config.mutual_tls:
        federated = [
            cert
            for domain, data in sorted(response.federated_bundles.items())
            for cert in _certificates(endpoint, data, f"federated bundle of {domain}")
        ]
        client_ca = b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in [*roots, *federated]
        )
    context = context_for(config, material, client_ca)
    return TlsBundle((context,), (material.served,), None, client_ca), warnings


class SpiffeTls(TlsState):
    """TlsState fed by the Workload API: the latest response waits in `_pending` until the
    server's reload (off the loop) takes it; files are never read."""

    pushes = True

    def __init__(self, config: Config) -> None:  # no super(): there are no files to read
        assert config.spiffe_endpoint is not None
        self._config = config
        self.endpoint = config.spiffe_endpoint
        self.bundle = TlsBundle((), ())
        self.digest, self._failed_digest = "", None
        self._lock = threading.Lock()
        self._applying = threading.Lock()
        self._pending: Any = None
        self._arrived: asyncio.Event | None = None
        self._lost: str | None = "no answer yet"
        self._watcher: X509Watcher | None = None

    @property
    def self_signed(self) -> bool:
        return False

    @property
    def served(self) -> tuple[ServedCertificate, ...]:
        return self.bundle.served

    @property
    def problem(self) -> str | None:
        if not self.bundle.served:
            return f"waiting for an X.509 SVID from {self.endpoint}"
        expires = self.bundle.served[0].not_after
        if expires < time.time():
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(expires))
            return f"the X.509 SVID expired at {when} and {self.endpoint} sent no new one"
        return None

    # --- on the event loop ------------------------------------------------------------------
    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._arrived = asyncio.Event()
        self._watcher = X509Watcher(
            self.endpoint,
            on_response=lambda r: loop.call_soon_threadsafe(self._received, r),
            on_lost=lambda why: loop.call_soon_threadsafe(self._lost_agent, why),
        )
        self._watcher.start()

    def _received(self, response: Any) -> None:
        with self._lock:
            self._pending = response
        if self._lost is not None and self.bundle.served:
            log.info("connected to the Workload API again", extra={"endpoint": self.endpoint})
        self._lost = None
        assert self._arrived is not None
        self._arrived.set()
        if self.on_change is not None:
            self.on_change()

    def subscribe(self, on_change: Callable[[], None]) -> None:
        """As TlsState's; a response that came while the first one loaded is reloaded now."""
        self.on_change = on_change
        if self.changed():
            on_change()

    def _lost_agent(self, why: str) -> None:
        if why != self._lost:  # once per outage, not once per retry
            log.warning(
                "lost the Workload API; reconnecting with backoff, the last SVID serves on",
                extra={"endpoint": self.endpoint, "reason": why},
            )
        self._lost = why

    async def ready(self, stop: asyncio.Event) -> bool:
        """Wait up to --spiffe-timeout for a first SVID that passes the checks; a refused one
        is logged and the wait goes on. Raise CertificateError (one line: the socket, why and
        the fix) when none came."""
        loop = asyncio.get_running_loop()
        self._start(loop)
        assert self._arrived is not None
        deadline = loop.time() + self._config.spiffe_timeout
        refused: str | None = None
        stopping = loop.create_task(stop.wait())
        try:
            while True:
                arrived = loop.create_task(self._arrived.wait())
                done, _ = await asyncio.wait(
                    {arrived, stopping},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                arrived.cancel()
                if stopping in done:
                    self.close()
                    return False
                if arrived not in done:
                    self.close()
                    why = refused or self._lost or "no SVID"
                    raise CertificateError(
                        f"--spiffe-endpoint {self.endpoint}: no X.509 SVID within "
                        f"{self._config.spiffe_timeout:g}s ({why}); check that the SPIRE agent "
                        "runs, that its socket is mounted at that path, and that a "
                        "registration entry matches this workload"
                    )
                self._arrived.clear()
                try:
                    await loop.run_in_executor(None, self.reload)
                    return True
                except CertificateError as e:
                    refused = str(e)
                    log.error("X.509 SVID refused", extra={"reason": refused})
        finally:
            stopping.cancel()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()

    # --- off the event loop (the server's reload) ------------------------------------------------
    def reload(self) -> tuple[ServedCertificate, ...]:
        """Apply the newest response; on a CertificateError the previous SVID stays."""
        with self._applying:  # one at a time: an older response never lands after a newer one
            with self._lock:
                response, self._pending = self._pending, None
            if response is None:
                return self.served
            bundle, warnings = bundle_from(self._config, response)
            for warning in warnings:
                log.warning(warning)
            self.bundle = bundle
            return bundle.served

    def changed(self) -> bool:
        return self._pending is not None
