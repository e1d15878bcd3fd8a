"""SSLContext construction from config and certificate material, SNI selection, and reload."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import CertificateError, Config, ConfigError
from proxy.tls.handshake import AlertingSSLObject, record_server_name
from proxy.tls.material import (
    Material,
    ServedCertificate,
    cert_dir_pairs,
    decode_answer,
    encode_settings,
)
from proxy.tls.tickets import set_groups, share_ticket_keys

if TYPE_CHECKING:
    from proxy.tls.crl import LoadedCrls

log = logging.getLogger("tls_sidecar.tls")

# TLS 1.2: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites are all AEAD and PFS.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
# ALPN: HTTP/2 first when it is on (RFC 9113 §3.2); a client without ALPN speaks HTTP/1.1.
ALPN_H2 = ["h2", "http/1.1"]
ALPN_H1 = ["http/1.1"]


def base_context(
    min_version: str, *, session_resumption: bool = True, http2: bool = True
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    # TLS12_CIPHERS holds none of RFC 9113 Appendix A's prohibited suites, as HTTP/2 needs.
    ctx.set_alpn_protocols(ALPN_H2 if http2 else ALPN_H1)
    ctx.sslobject_class = AlertingSSLObject
    ctx.sni_callback = record_server_name
    if not session_resumption:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0  # TLS 1.3: no tickets at all, so every handshake is a full one
    return ctx


def context_for(
    config: Config, material: Material, client_ca: bytes | None, client_crl: bytes = b""
) -> ssl.SSLContext:
    """OpenSSL loads certificates only from files: the PEM passes through a private temporary
    directory (0700, key 0600) that is removed at once."""
    ctx = base_context(
        config.tls_min_version, session_resumption=config.session_resumption, http2=config.http2
    )
    with tempfile.TemporaryDirectory(prefix="tls-sidecar-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(material.chain_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(material.key_pem)
        try:
            ctx.load_cert_chain(str(cert_path), str(key_path))
        finally:
            key_path.unlink(missing_ok=True)
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise CertificateError(f"--client-ca: OpenSSL refused it ({e.reason})") from None
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if config.client_auth == "require" else ssl.CERT_OPTIONAL
        )
    if client_crl:
        load_crls_into(ctx, client_crl)
    if config.tls_groups is not None and not set_groups(ctx, config.tls_groups):
        # build_config checked the list on a scratch context of this same OpenSSL
        raise ConfigError(f"--tls-groups {config.tls_groups}: OpenSSL refused it")
    shared = config.ticket_keys is not None and config.session_resumption
    if shared and not share_ticket_keys(ctx, config.ticket_keys or b""):
        log.warning(
            "cannot share session ticket keys between workers: a client resumes its TLS "
            "session only when it returns to the same worker"
        )
    return ctx


def load_crls_into(ctx: ssl.SSLContext, client_crl: bytes) -> None:
    """--client-crl: the leaf's CRL is checked in every handshake (a revoked certificate gets
    the certificate_revoked alert). Python's `cadata` takes certificates only; a file given to
    OpenSSL takes CRLs too."""
    with tempfile.TemporaryDirectory(prefix="tls-sidecar-") as tmp:
        crl_path = Path(tmp, "client.crl")
        crl_path.write_bytes(client_crl)
        try:
            ctx.load_verify_locations(cafile=str(crl_path))
        except ssl.SSLError as e:
            raise CertificateError(f"--client-crl: OpenSSL refused it ({e.reason})") from None
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def select_certificate(
    server_name: str | None,
    exact: dict[str, int],
    wildcard: dict[str, int],
) -> int:
    """Index of the certificate for an SNI name: exact match, then `*.suffix`, else 0 (pure)."""
    if not server_name:
        return 0
    name = server_name.lower().rstrip(".")
    index = exact.get(name)
    if index is not None:
        return index
    _, dot, parent = name.partition(".")
    if dot:
        index = wildcard.get(parent)
        if index is not None:
            return index
    return 0


def name_tables(served: Iterable[ServedCertificate]) -> tuple[dict[str, int], dict[str, int]]:
    """Names -> certificate index; the first certificate to claim a name keeps it (pure)."""
    exact: dict[str, int] = {}
    wildcard: dict[str, int] = {}
    for index, cert in enumerate(served):
        for dns_name in cert.dns_names:
            name = dns_name.lower()
            if name.startswith("*."):
                wildcard.setdefault(name[2:], index)
            else:
                exact.setdefault(name, index)
    return exact, wildcard


@dataclass(frozen=True, slots=True)
class TlsBundle:
    """The contexts for one generation of certificate material."""

    contexts: tuple[ssl.SSLContext, ...]
    served: tuple[ServedCertificate, ...]
    crls: LoadedCrls | None = None  # --client-crl, as loaded with these contexts
    client_ca: bytes | None = None  # --client-ca's PEM, as loaded with these contexts

    @property
    def default(self) -> ssl.SSLContext:
        return self.contexts[0]


def inspect_in_helper(config: Config) -> tuple[list[Material], list[str]]:
    """Read and check the certificates in `python -m proxy.tls.certload`, so that this process
    never loads cryptography (see certload)."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy.tls.certload"],
        input=encode_settings(config),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return decode_answer(done.stdout, done.stderr)


def build_bundle(config: Config) -> tuple[TlsBundle, list[str]]:
    configured = config.has_certificates
    client_ca = None
    if config.client_ca is None and configured:
        materials, warnings = inspect_in_helper(config)
    else:
        # Mutual TLS decodes client certificates with cryptography in this process anyway, and
        # a generated certificate is made with it.
        from proxy.tls.certload import check_client_ca, inspect  # noqa: PLC0415

        materials, warnings = inspect(config)
        if config.client_ca is not None:
            client_ca = check_client_ca(config.client_ca)
    crls = None
    if config.client_crl_files and config.client_ca is not None:
        from proxy.tls.crl import check_client_crls  # noqa: PLC0415

        crls = check_client_crls(config.client_crl_files, config.client_ca)
        warnings = [*warnings, *crls.warnings]
    crl_pem = crls.pem if crls is not None else b""
    contexts = tuple(context_for(config, item, client_ca, crl_pem) for item in materials)
    served = tuple(item.served for item in materials)
    if len(contexts) > 1:
        exact, wildcard = name_tables(served)
        _install_sni(contexts, exact, wildcard)
    return TlsBundle(contexts, served, crls, client_ca), warnings


def _install_sni(
    contexts: tuple[ssl.SSLContext, ...], exact: dict[str, int], wildcard: dict[str, int]
) -> None:
    def choose(ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        record_server_name(ssl_object, server_name, _ctx)
        index = select_certificate(server_name, exact, wildcard)
        if index:
            ssl_object.context = contexts[index]

    callback: Callable[..., None] = choose
    contexts[0].sni_callback = callback


def input_files(config: Config) -> list[Path]:
    files = [*config.cert_files, *config.key_files, *config.client_crl_files]
    for extra in (
        config.pkcs12_file,
        config.client_ca,
        config.key_password_file,
        config.pkcs12_password_file,
    ):
        if extra is not None:
            files.append(extra)
    if config.cert_dir is not None:
        for _, cert_path, key_path in cert_dir_pairs(config.cert_dir):
            files += [cert_path, key_path]
    return files


def content_digest(paths: Iterable[Path]) -> str:
    """A hash of what the files hold now, links resolved: a Kubernetes `..data` swap changes it
    even when every visible path and mtime stays the same."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(path))
        try:
            digest.update(path.resolve().read_bytes())
        except OSError as e:
            if e.errno in OUT_OF_DESCRIPTORS:
                raise  # says nothing about the file: a missing one would look like a change
            digest.update(b"\0missing")
    return digest.hexdigest()


OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})


def out_of_descriptors(error: BaseException | None) -> bool:
    """True when an error (or one it was raised from, `from None` included) is the process or
    the system running out of file descriptors: a reason to try again, not a bad file."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in OUT_OF_DESCRIPTORS:
            return True
        error = error.__cause__ or error.__context__
        seen += 1
    return False


class TlsState:
    """The context new handshakes use; swapped whole on reload, never mutated in place."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.bundle, warnings = build_bundle(config)
        self.digest = content_digest(input_files(config))
        self._failed_digest: str | None = None
        for warning in warnings:
            log.warning(warning)

    # The hooks a certificate source that pushes (the SPIFFE Workload API, tls/spiffe.py) fills
    # in; files are read at once and polled, so they need none of them.
    pushes = False  # True: the source says when to reload, so nothing polls it
    on_change: Callable[[], None] | None = None

    def subscribe(self, on_change: Callable[[], None]) -> None:
        """Call `on_change` on the loop whenever new material waits to be loaded (a source
        that pushes; files are polled instead)."""

    async def ready(self, stop: asyncio.Event) -> bool:
        """Wait for the first certificate (False: stopped first); files have it already."""
        return True

    @property
    def problem(self) -> str | None:
        """Why new handshakes cannot be served now, for readiness; None when they can."""
        return None

    def close(self) -> None:
        """Stop whatever feeds this state (nothing, for files)."""

    @property
    def context(self) -> ssl.SSLContext:
        return self.bundle.default

    @property
    def served(self) -> tuple[ServedCertificate, ...]:
        return self.bundle.served

    @property
    def self_signed(self) -> bool:
        return not self._config.has_certificates

    @property
    def server_uri(self) -> str | None:
        """The default certificate's first URI SAN: the `By` of X-Forwarded-Client-Cert."""
        uris = self.bundle.served[0].uri_names
        return uris[0] if uris else None

    def reload(self) -> tuple[ServedCertificate, ...]:
        """Build new contexts from the files; on any error keep the old ones and raise. A failed
        attempt's files are not tried again until they change (out of descriptors: they are)."""
        if self.self_signed and self._config.client_ca is None:
            return self.served
        # The digest of what this attempt reads, taken before it: a file replaced while the
        # attempt runs (a key that lands just after its certificate) makes the next poll see a
        # change and try again, instead of the new pair being recorded as the broken one.
        digest = content_digest(input_files(self._config))
        try:
            bundle, warnings = build_bundle(self._config)
        except (ConfigError, OSError) as e:
            if not out_of_descriptors(e):
                self._failed_digest = digest
            raise
        for warning in warnings:
            log.warning(warning)
        self.bundle, self.digest, self._failed_digest = bundle, digest, None
        return bundle.served

    def changed(self) -> bool:
        """True when the files differ from what is served and from the last failed attempt.

        Polled on the event loop: hashing a few KiB of certificate files costs microseconds,
        and content is what counts (a rewrite in the same clock tick keeps size and mtime)."""
        digest = content_digest(input_files(self._config))
        return digest not in (self.digest, self._failed_digest)
