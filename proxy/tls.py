"""SSLContext construction from config and certificate material, SNI selection, and reload."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import stat
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from . import certs
from .config import Config
from .identity import dns_and_uri_sans

log = logging.getLogger("tls_sidecar.tls")

# TLS 1.2: forward secrecy (ECDHE) and AEAD only. TLS 1.3 suites are all AEAD and PFS.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
ALPN = ["http/1.1"]


@dataclass(frozen=True, slots=True)
class ServedCertificate:
    """What a context serves, for logs and metrics (never key material)."""

    name: str
    subject: str
    not_after: float
    serial: int
    dns_names: tuple[str, ...]
    uri_names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    name: str
    chain: list[x509.Certificate]
    key: certs.PrivateKey


def base_context(min_version: str, *, session_resumption: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_CIPHER_SERVER_PREFERENCE
        | ssl.OP_SINGLE_ECDH_USE
    )
    ctx.set_alpn_protocols(ALPN)
    if not session_resumption:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0  # TLS 1.3: no tickets at all, so every handshake is a full one
    return ctx


def warn_if_key_exposed(key_path: Path) -> None:
    """Private keys should not be readable by group or others (Secret volumes use 0400/0440)."""
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IROTH:
        log.warning(
            "key file is readable by every user; restrict it with chmod 600",
            extra={"path": str(key_path)},
        )


def _read_password(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise certs.CertificateError(f"{option}: {path} cannot be read ({e.strerror})") from None


def load_certificates(config: Config) -> tuple[list[LoadedCertificate], list[str]]:
    """Every configured certificate, validated; (certificates, warnings). Empty: self-signed."""
    password = _read_password(config.key_password_file, "--key-password-file")
    loaded: list[LoadedCertificate] = []
    warnings: list[str] = []

    def add(name: str, cert_path: Path, key_path: Path) -> None:
        chain = certs.load_chain(cert_path)
        key = certs.load_key(key_path, password=password)
        warnings.extend(certs.check_pair(chain, key, cert_path, allow_expired=config.allow_expired))
        warn_if_key_exposed(key_path)
        loaded.append(LoadedCertificate(name, chain, key))

    for cert_path, key_path in zip(config.cert_files, config.key_files, strict=True):
        add(cert_path.stem if len(config.cert_files) > 1 else "default", cert_path, key_path)
    if config.cert_dir is not None:
        for folder in sorted(config.cert_dir.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue  # Kubernetes keeps its ..data and timestamped folders hidden
            cert_path, key_path = folder / "tls.crt", folder / "tls.key"
            if cert_path.exists() and key_path.exists():
                add(folder.name, cert_path, key_path)
        if not loaded:
            raise certs.CertificateError(
                f"--cert-dir: {config.cert_dir} has no NAME/tls.crt + NAME/tls.key pairs"
            )
    if config.pkcs12_file is not None:
        loaded.append(_load_pkcs12(config))
        leaf = loaded[-1]
        warnings.extend(
            certs.check_pair(
                leaf.chain, leaf.key, config.pkcs12_file, allow_expired=config.allow_expired
            )
        )
    return loaded, warnings


def _load_pkcs12(config: Config) -> LoadedCertificate:
    assert config.pkcs12_file is not None
    path = config.pkcs12_file
    password = _read_password(config.pkcs12_password_file, "--pkcs12-password-file")
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(path.read_bytes(), password)
    except OSError as e:
        raise certs.CertificateError(f"--pkcs12: {path} cannot be read ({e.strerror})") from None
    except ValueError:
        raise certs.CertificateError(
            f"--pkcs12: {path} is not a PKCS#12 bundle or the password is wrong; "
            "give it with --pkcs12-password-file"
        ) from None
    if cert is None or key is None:
        raise certs.CertificateError(f"--pkcs12: {path} must hold a certificate and its key")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise certs.CertificateError(
            f"--pkcs12: {path} holds a {type(key).__name__}; use EC or RSA"
        )
    return LoadedCertificate("default", [cert, *extra], key)


def _served(loaded: LoadedCertificate) -> ServedCertificate:
    leaf = loaded.chain[0]
    dns, uris = dns_and_uri_sans(leaf)
    if not dns:
        dns = tuple(
            str(a.value) for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        )
    return ServedCertificate(
        name=loaded.name,
        subject=leaf.subject.rfc4514_string(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial=leaf.serial_number,
        dns_names=dns,
        uri_names=uris,
    )


def context_for(
    config: Config, loaded: LoadedCertificate, client_ca: bytes | None
) -> ssl.SSLContext:
    """OpenSSL loads certificates only from files: the PEM passes through a private temporary
    directory (0700, key 0600) that is removed at once."""
    ctx = base_context(config.tls_min_version, session_resumption=config.session_resumption)
    key_pem = loaded.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in loaded.chain)
    with tempfile.TemporaryDirectory(prefix="tls-sidecar-") as tmp:
        cert_path, key_path = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_path.write_bytes(chain_pem)
        certs.write_private(key_path, key_pem)
        try:
            ctx.load_cert_chain(str(cert_path), str(key_path))
        finally:
            key_path.unlink(missing_ok=True)
    if client_ca is not None:
        try:
            ctx.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
        except ssl.SSLError as e:
            raise certs.CertificateError(f"--client-ca: OpenSSL refused it ({e.reason})") from None
        ctx.verify_mode = (
            ssl.CERT_REQUIRED if config.client_auth == "require" else ssl.CERT_OPTIONAL
        )
    return ctx


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

    @property
    def default(self) -> ssl.SSLContext:
        return self.contexts[0]


def build_bundle(config: Config) -> tuple[TlsBundle, list[str]]:
    loaded, warnings = load_certificates(config)
    self_signed = not loaded
    if self_signed:
        issued = certs.self_signed()
        loaded = [LoadedCertificate("self-signed", [issued.certificate], issued.key)]
    client_ca = None
    if config.client_ca is not None:
        certs.load_chain(config.client_ca, "--client-ca")  # a clear error for a bad file
        client_ca = config.client_ca.read_bytes()
    contexts = tuple(context_for(config, item, client_ca) for item in loaded)
    served = tuple(_served(item) for item in loaded)
    if len(contexts) > 1:
        exact, wildcard = name_tables(served)
        _install_sni(contexts, exact, wildcard)
    return TlsBundle(contexts, served), warnings


def _install_sni(
    contexts: tuple[ssl.SSLContext, ...], exact: dict[str, int], wildcard: dict[str, int]
) -> None:
    def choose(ssl_object: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        index = select_certificate(server_name, exact, wildcard)
        if index:
            ssl_object.context = contexts[index]

    callback: Callable[..., None] = choose
    contexts[0].sni_callback = callback


def input_files(config: Config) -> list[Path]:
    files = [*config.cert_files, *config.key_files]
    for extra in (
        config.pkcs12_file,
        config.client_ca,
        config.key_password_file,
        config.pkcs12_password_file,
    ):
        if extra is not None:
            files.append(extra)
    if config.cert_dir is not None and config.cert_dir.is_dir():
        for folder in sorted(config.cert_dir.iterdir()):
            if not folder.name.startswith(".") and folder.is_dir():
                files += [folder / "tls.crt", folder / "tls.key"]
    return files


def content_digest(paths: Iterable[Path]) -> str:
    """A hash of what the files hold now, links resolved: a Kubernetes `..data` swap changes it
    even when every visible path and mtime stays the same."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fsencode(path))
        try:
            digest.update(path.resolve().read_bytes())
        except OSError:
            digest.update(b"\0missing")
    return digest.hexdigest()


class TlsState:
    """The context new handshakes use; swapped whole on reload, never mutated in place."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self.bundle, warnings = build_bundle(config)
        self.digest = content_digest(input_files(config))
        self._failed_digest: str | None = None
        for warning in warnings:
            log.warning(warning)

    @property
    def context(self) -> ssl.SSLContext:
        return self.bundle.default

    @property
    def served(self) -> tuple[ServedCertificate, ...]:
        return self.bundle.served

    @property
    def self_signed(self) -> bool:
        return not (self._config.cert_files or self._config.cert_dir or self._config.pkcs12_file)

    @property
    def server_uri(self) -> str | None:
        """The default certificate's first URI SAN: the `By` of X-Forwarded-Client-Cert."""
        uris = self.bundle.served[0].uri_names
        return uris[0] if uris else None

    def reload(self) -> tuple[ServedCertificate, ...]:
        """Build new contexts from the files; on any error keep the old ones and raise."""
        if self.self_signed and self._config.client_ca is None:
            return self.served
        digest = content_digest(input_files(self._config))
        bundle, warnings = build_bundle(self._config)
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

    def mark_failed(self) -> None:
        self._failed_digest = content_digest(input_files(self._config))
