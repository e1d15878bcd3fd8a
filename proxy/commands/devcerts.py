"""The development CA and certificates on disk (`certs init`, `certs issue`, `demo`): made once,
kept between runs, names checked against the CA's constraints before anything is written."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import ConfigError
from proxy.tls import certcheck, certs


@dataclass(frozen=True, slots=True)
class DevFiles:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def dev_files(out: Path) -> DevFiles:
    return DevFiles(
        out / "ca.crt",
        out / "ca.key",
        out / "server.crt",
        out / "server.key",
        out / "client.crt",
        out / "client.key",
    )


def load_ca(cert_path: Path, key_path: Path) -> certs.Issued:
    if not cert_path.exists() and not key_path.exists():
        raise ConfigError(
            f"--ca: {cert_path} does not exist; run tls-sidecar certs init --certs-dir "
            f"{cert_path.parent} first to make the development CA"
        )
    chain = certs.load_chain(cert_path, "--ca")
    key = certs.load_key(key_path, "--ca-key")
    if not certs.key_matches(chain[0], key):
        raise ConfigError(f"--ca-key {key_path} does not match {cert_path}")
    return certs.Issued(chain[0], key)


def write_pair(cert_path: Path, key_path: Path, issued: certs.Issued, chain: bytes = b"") -> None:
    # The new pair replaces the old one file by file, each atomically: a reader (the proxy
    # reloading) never sees half a file.
    tmp = cert_path.with_name(f".{cert_path.name}.tmp")
    tmp.write_bytes(issued.cert_pem + chain)
    certs.write_private(key_path, issued.key_pem)
    tmp.replace(cert_path)


def vouchable(ca: certs.Issued, ca_path: Path, names: tuple[str, ...], option: str) -> None:
    """Refuse names the CA's name constraints forbid: clients would refuse the certificate
    ("permitted subtree violation"), so it is never written."""
    outside = certcheck.outside_constraints(ca.certificate, certs.subject_alt_names(names))
    if not outside:
        return
    name = outside[0]
    stem = name.rpartition(".")[0] or name
    such = "such a name" if certs.is_address(name) else f"such a name (e.g. {stem}.test)"
    raise ConfigError(
        f"{option} {name}: the development CA {ca_path} can only vouch for "
        f"{certcheck.constraints_text(ca.certificate)} (its name constraints); use {such}, "
        f"or make a new CA that includes it, in another folder: tls-sidecar certs init "
        f"--certs-dir DIR --host {name}"
    )


def issue_checked(ca: certs.Issued, ca_path: Path, names: list[str], **kwargs: Any) -> certs.Issued:
    """Issue, then verify as a TLS client would before anything is written: a certificate that
    does not verify never replaces one that does."""
    issued = certs.issue(ca, names, **kwargs)
    problem = certcheck.verify_chain([issued.certificate], [ca.certificate])
    if problem:
        raise ConfigError(
            f"the certificate for {', '.join(names) or kwargs.get('common_name')} would not "
            f"verify against {ca_path} ({problem}); nothing was written"
        )
    return issued


def init_dev_certificates(
    out: Path,
    hosts: tuple[str, ...] = certs.DEFAULT_HOSTS,
    key_type: certs.KeyType = "ecdsa",
    *,
    renew_leaves: bool = True,
) -> tuple[DevFiles, bool]:
    """Create (or reuse) the CA; issue server and client certificates. Returns (files, ca_made).
    A reused CA that cannot vouch for a host stops it (ConfigError) before anything is written."""
    files = dev_files(out)
    ca_made = not (files.ca_cert.exists() and files.ca_key.exists())
    if ca_made:
        # Limited to development names (and the DNS names asked for): safer than an unlimited
        # local CA. IP addresses stay unconstrained: see certs.DEV_PERMITTED.
        permitted = (
            *certs.DEV_PERMITTED,
            *(h for h in hosts if not _dev_name(h) and not certs.is_address(h)),
        )
        ca = certs.create_ca(key_type=key_type, permitted=permitted)
    else:
        ca = load_ca(files.ca_cert, files.ca_key)
        vouchable(ca, files.ca_cert, hosts, "--host")
    if not ca_made and not renew_leaves and files.server_cert.exists():
        return files, ca_made
    server = issue_checked(ca, files.ca_cert, list(hosts), key_type=key_type)
    client = issue_checked(
        ca, files.ca_cert, [], common_name="tls-sidecar-dev-client", client=True, key_type=key_type
    )
    out.mkdir(parents=True, exist_ok=True)
    if ca_made:
        write_pair(files.ca_cert, files.ca_key, ca)
    write_pair(files.server_cert, files.server_key, server, chain=ca.cert_pem)
    write_pair(files.client_cert, files.client_key, client)
    return files, ca_made


def _dev_name(host: str) -> bool:
    """Whether the development CA's default constraints already cover this host."""
    host = host.lower().removeprefix("*.")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return any(host == d or host.endswith("." + d) for d in ("localhost", "test", "internal"))
    return address.is_loopback


def ensure_dev_certificates(out: Path) -> DevFiles:
    """For the demo: reuse what exists and is still valid, otherwise make it."""
    files = dev_files(out)
    renew = True
    if files.server_cert.exists() and files.server_key.exists() and files.ca_cert.exists():
        try:
            leaf = certs.load_chain(files.server_cert)[0]
            renew = leaf.not_valid_after_utc < dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        except ConfigError:
            renew = True
    files, _ = init_dev_certificates(out, renew_leaves=renew)
    return files
