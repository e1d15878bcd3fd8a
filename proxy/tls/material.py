"""Certificate material as OpenSSL takes it, and the certificate helper's protocol, both halves.

Without mutual TLS, `serve` reads and checks its certificates in a short-lived helper process
(`python -m proxy.tls.certload`) so that it never loads cryptography: the settings go in as
JSON, the PEM and what is served come out as JSON. Both ends encode and decode here, so a new
certificate setting is added in one place."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from proxy.config import CertificateError, Config


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
class Material:
    """One certificate as OpenSSL takes it: PEM chain (leaf first), unencrypted PEM key."""

    chain_pem: bytes
    key_pem: bytes
    served: ServedCertificate


def cert_dir_pairs(cert_dir: Path) -> list[tuple[str, Path, Path]]:
    """--cert-dir's NAME/tls.crt + NAME/tls.key folders, as (NAME, crt, key), sorted. Hidden
    folders are skipped: Kubernetes keeps its ..data and timestamped folders there."""
    if not cert_dir.is_dir():
        return []
    return [
        (folder.name, folder / "tls.crt", folder / "tls.key")
        for folder in sorted(cert_dir.iterdir())
        if not folder.name.startswith(".") and folder.is_dir()
    ]


# The settings the helper needs, and how each travels as JSON.
_PATHS = ("cert_files", "key_files")
_PATH_OR_NONE = ("cert_dir", "key_password_file", "pkcs12_file", "pkcs12_password_file")
_FLAGS = ("allow_expired",)


def encode_settings(config: Config) -> str:
    raw: dict[str, Any] = {name: [str(p) for p in getattr(config, name)] for name in _PATHS}
    for name in _PATH_OR_NONE:
        value = getattr(config, name)
        raw[name] = None if value is None else str(value)
    raw.update({name: bool(getattr(config, name)) for name in _FLAGS})
    return json.dumps(raw)


def decode_settings(text: str) -> Config:
    raw = json.loads(text)
    values: dict[str, Any] = {name: tuple(Path(p) for p in raw[name]) for name in _PATHS}
    values.update({name: Path(raw[name]) if raw[name] else None for name in _PATH_OR_NONE})
    values.update({name: bool(raw[name]) for name in _FLAGS})
    return Config(**values)


def encode_answer(materials: list[Material], warnings: list[str]) -> str:
    return json.dumps(
        {
            "certificates": [
                {
                    "chain_pem": m.chain_pem.decode("ascii"),
                    "key_pem": m.key_pem.decode("ascii"),
                    "served": asdict(m.served),
                }
                for m in materials
            ],
            "warnings": warnings,
        }
    )


def encode_error(message: str) -> str:
    return json.dumps({"error": message})


def _served_fields(raw: dict[str, Any], tuples: set[str]) -> dict[str, Any]:
    return {k: tuple(v) if k in tuples else v for k, v in raw.items()}


def decode_answer(stdout: str, stderr: str) -> tuple[list[Material], list[str]]:
    """The helper's answer; a CertificateError with its message, or its last stderr line."""
    try:
        answer = json.loads(stdout)
    except json.JSONDecodeError:
        detail = stderr.strip().splitlines()[-1:] or ["no answer"]
        raise CertificateError(f"checking the certificates failed: {detail[0]}") from None
    if "error" in answer:
        raise CertificateError(answer["error"])
    tuples = {f.name for f in fields(ServedCertificate) if f.name.endswith("_names")}
    materials = [
        Material(
            item["chain_pem"].encode("ascii"),
            item["key_pem"].encode("ascii"),
            ServedCertificate(**_served_fields(item["served"], tuples)),
        )
        for item in answer["certificates"]
    ]
    return materials, list(answer["warnings"])
