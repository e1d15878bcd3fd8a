"""Certificate material read and checked with cryptography: for the serving process, or in a
short-lived helper process (`python -m proxy.tls.certload`) so that `serve` without mutual TLS never
loads cryptography (8 MiB of resident memory) for the rest of its life.

The helper reads the settings as JSON on stdin and writes the validated material (PEM chain,
unencrypted PEM key, what is served) and the warnings as JSON on stdout; the key passes only
through that pipe, as it passes through a private temporary file to OpenSSL afterwards.
"""

from __future__ import annotations

import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.config import CertificateError, Config
from proxy.identity import dns_and_uri_sans
from proxy.tls import certcheck, certs
from proxy.tls.material import (
    Material,
    ServedCertificate,
    cert_dir_pairs,
    decode_settings,
    encode_answer,
    encode_error,
)


@dataclass(frozen=True, slots=True)
class LoadedCertificate:
    name: str
    chain: list[x509.Certificate]
    key: certs.PrivateKey


def key_exposed(key_path: Path) -> list[str]:
    """Private keys should not be readable by group or others. A Kubernetes Secret volume (the
    kubelet's `..data` layout) is exempt: only containers that mount it see it, and
    `tls-sidecar inject` gives it mode 0444 rather than change the pod's fsGroup."""
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return []
    if mode & stat.S_IROTH and not (key_path.parent / "..data").is_dir():
        return [f"key file {key_path} is readable by every user; restrict it with chmod 600"]
    return []


def _read_password(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as e:
        raise CertificateError(f"{option}: {path} cannot be read ({e.strerror})") from None


def load_certificates(config: Config) -> tuple[list[LoadedCertificate], list[str]]:
    """Every configured certificate, validated; (certificates, warnings). Empty: self-signed."""
    password = _read_password(config.key_password_file, "--key-password-file")
    loaded: list[LoadedCertificate] = []
    warnings: list[str] = []

    def add(name: str, cert_path: Path, key_path: Path, option: str = "--cert") -> None:
        chain = certs.load_chain(cert_path, option)
        key = certs.load_key(key_path, password=password)
        warnings.extend(
            certs.check_pair(
                chain, key, cert_path, allow_expired=config.allow_expired, option=option
            )
        )
        warnings.extend(key_exposed(key_path))
        loaded.append(LoadedCertificate(name, chain, key))

    for cert_path, key_path in zip(config.cert_files, config.key_files, strict=True):
        add(cert_path.stem if len(config.cert_files) > 1 else "default", cert_path, key_path)
    if config.cert_dir is not None:
        for name, cert_path, key_path in cert_dir_pairs(config.cert_dir):
            if cert_path.exists() and key_path.exists():
                add(name, cert_path, key_path, "--cert-dir")
        if not loaded:
            raise CertificateError(
                f"--cert-dir: {config.cert_dir} has no NAME/tls.crt + NAME/tls.key pairs"
            )
    if config.pkcs12_file is not None:
        loaded.append(_load_pkcs12(config))
        leaf = loaded[-1]
        warnings.extend(
            certs.check_pair(
                leaf.chain,
                leaf.key,
                config.pkcs12_file,
                allow_expired=config.allow_expired,
                option="--pkcs12",
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
        raise CertificateError(f"--pkcs12: {path} cannot be read ({e.strerror})") from None
    except ValueError:
        raise CertificateError(
            f"--pkcs12: {path} is not a PKCS#12 bundle or the password is wrong; "
            "give it with --pkcs12-password-file"
        ) from None
    if cert is None or key is None:
        raise CertificateError(f"--pkcs12: {path} must hold a certificate and its key")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CertificateError(f"--pkcs12: {path} holds a {type(key).__name__}; use EC or RSA")
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


def as_material(loaded: LoadedCertificate) -> Material:
    key_pem = loaded.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in loaded.chain)
    return Material(chain_pem, key_pem, _served(loaded))


def inspect(config: Config) -> tuple[list[Material], list[str]]:
    """The configured certificates, checked, as PEM; a generated one when none is configured."""
    loaded, warnings = load_certificates(config)
    if not loaded:
        issued = certs.self_signed()
        loaded = [LoadedCertificate("self-signed", [issued.certificate], issued.key)]
    return [as_material(item) for item in loaded], warnings


def check_client_ca(path: Path) -> bytes:
    """The bundle, when it holds only CAs: a leaf there (the client certificate given by
    mistake) makes every client certificate fail to verify, with no hint why."""
    for cert in certs.load_chain(path, "--client-ca"):
        if not certcheck.is_ca(cert):
            raise CertificateError(
                f"--client-ca: {path} holds a certificate that is not a CA "
                f"({cert.subject.rfc4514_string()}), so no client certificate would verify; "
                "give the CA that signs the client certificates (its ca.crt)"
            )
    return path.read_bytes()


# --- the helper process ---------------------------------------------------------------------
def main() -> None:
    try:
        materials, warnings = inspect(decode_settings(sys.stdin.read()))
    except CertificateError as e:
        sys.stdout.write(encode_error(str(e)))
        return
    sys.stdout.write(encode_answer(materials, warnings))


if __name__ == "__main__":
    main()
