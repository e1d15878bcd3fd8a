"""`tls-sidecar certs …`: a development CA and certificates, like mkcert, and `inspect`."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from proxy.config import ConfigError
from proxy.tls import certs

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


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


def _load_ca(cert_path: Path, key_path: Path) -> certs.Issued:
    chain = certs.load_chain(cert_path, "--ca")
    key = certs.load_key(key_path, "--ca-key")
    if not certs.key_matches(chain[0], key):
        raise ConfigError(f"--ca-key {key_path} does not match {cert_path}")
    return certs.Issued(chain[0], key)


def _write_pair(cert_path: Path, key_path: Path, issued: certs.Issued, chain: bytes = b"") -> None:
    cert_path.write_bytes(issued.cert_pem + chain)
    certs.write_private(key_path, issued.key_pem)


def init_dev_certificates(
    out: Path,
    hosts: tuple[str, ...] = certs.DEFAULT_HOSTS,
    key_type: certs.KeyType = "ecdsa",
    *,
    renew_leaves: bool = True,
) -> tuple[DevFiles, bool]:
    """Create (or reuse) the CA; issue server and client certificates. Returns (files, ca_made)."""
    out.mkdir(parents=True, exist_ok=True)
    files = dev_files(out)
    ca_made = not (files.ca_cert.exists() and files.ca_key.exists())
    if ca_made:
        # Limited to development names (and those asked for): safer than an unlimited local CA.
        permitted = (*certs.DEV_PERMITTED, *(h for h in hosts if not _dev_name(h)))
        ca = certs.create_ca(key_type=key_type, permitted=permitted)
        _write_pair(files.ca_cert, files.ca_key, ca)
    else:
        ca = _load_ca(files.ca_cert, files.ca_key)
    if renew_leaves or not files.server_cert.exists():
        server = certs.issue(ca, list(hosts), key_type=key_type)
        _write_pair(files.server_cert, files.server_key, server, chain=ca.cert_pem)
        client = certs.issue(
            ca, [], common_name="tls-sidecar-dev-client", client=True, key_type=key_type
        )
        _write_pair(files.client_cert, files.client_key, client)
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


@click.group("certs", context_settings=CONTEXT)
def certs_group() -> None:
    """Development certificates: a local CA, server and client certificates, inspection."""


@certs_group.command("init", context_settings=CONTEXT)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Name or IP for the server certificate (repeatable). [default: localhost, 127.0.0.1, ::1]",
)
@click.option(
    "--out",
    default="certs",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder to write to.",
)
@click.option(
    "--key-type",
    default="ecdsa",
    show_default=True,
    type=click.Choice(["ecdsa", "rsa"]),
    help="ECDSA P-256 or RSA 2048.",
)
def init_command(hosts: tuple[str, ...], out: Path, key_type: certs.KeyType) -> None:
    """Make a development CA (kept if it exists) and server and client certificates."""
    files, ca_made = init_dev_certificates(out, hosts or certs.DEFAULT_HOSTS, key_type)
    click.echo(f"{'created' if ca_made else 'reused'} CA      {files.ca_cert}")
    click.echo(f"server certificate  {files.server_cert}  (key {files.server_key})")
    click.echo(f"client certificate  {files.client_cert}  (key {files.client_key})")
    click.echo(f"trust it with:      curl --cacert {files.ca_cert} https://localhost:8443/")
    click.echo(f"or everywhere:      sudo tls-sidecar certs trust --dir {out}")


def _trust(directory: Path, dry_run: bool, install: bool) -> None:
    from proxy.commands.trust import TrustError, execute, plan  # noqa: PLC0415

    ca = dev_files(directory).ca_cert
    try:
        steps = plan(ca, install=install)
        for step in steps.steps:
            click.echo(("would " if dry_run else "") + step.describe)
        for note in steps.notes:
            click.echo(f"note: {note}", err=True)
        if not dry_run:
            execute(steps)
    except TrustError as e:
        verb = "trust" if install else "untrust"
        fix = (
            f"; run: sudo tls-sidecar certs {verb} --dir {directory}"
            if "needs root" in str(e)
            else ""
        )
        raise click.ClickException(f"{e}{fix}") from None
    if not dry_run:
        click.echo(
            f"{'trusted' if install else 'no longer trusted'}: {ca} "
            "(browsers pick it up when they restart)"
        )


_DIR = click.option(
    "--dir",
    "directory",
    default="certs",
    show_default=True,
    type=click.Path(path_type=Path),
    help="The folder of certs init (its ca.crt).",
)
_DRY = click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")


@certs_group.command("trust", context_settings=CONTEXT)
@_DIR
@_DRY
def trust_command(directory: Path, dry_run: bool) -> None:
    """Trust the development CA in the system store and the browsers' (NSS) stores, as
    mkcert -install does: curl and browsers then accept the demo without --cacert."""
    _trust(directory, dry_run, install=True)


@certs_group.command("untrust", context_settings=CONTEXT)
@_DIR
@_DRY
def untrust_command(directory: Path, dry_run: bool) -> None:
    """Remove the development CA from the stores `certs trust` added it to."""
    _trust(directory, dry_run, install=False)


@certs_group.command("issue", context_settings=CONTEXT)
@click.option(
    "--ca",
    "ca_path",
    default="certs/ca.crt",
    show_default=True,
    type=click.Path(path_type=Path),
    help="CA certificate.",
)
@click.option(
    "--ca-key",
    default="certs/ca.key",
    show_default=True,
    type=click.Path(path_type=Path),
    help="CA private key.",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    help="DNS name, IP or URI SAN (e.g. spiffe://example.org/app); repeatable.",
)
@click.option("--cn", default=None, help="Subject common name. [default: the first --name]")
@click.option("--ou", default=None, help="Subject organizational unit.")
@click.option(
    "--client", is_flag=True, help="A client certificate (clientAuth) instead of a server one."
)
@click.option(
    "--days", default=825, show_default=True, type=click.IntRange(1, 3650), help="Validity in days."
)
@click.option("--key-type", default="ecdsa", show_default=True, type=click.Choice(["ecdsa", "rsa"]))
@click.option(
    "--out",
    default="certs",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Folder to write to.",
)
@click.option(
    "--file-name", default=None, help="Base name of the files. [default: from the first --name]"
)
def issue_command(
    ca_path: Path,
    ca_key: Path,
    names: tuple[str, ...],
    cn: str | None,
    ou: str | None,
    client: bool,
    days: int,
    key_type: certs.KeyType,
    out: Path,
    file_name: str | None,
) -> None:
    """Issue one more certificate from the development CA."""
    ca = _load_ca(ca_path, ca_key)
    issued = certs.issue(
        ca,
        list(names),
        common_name=cn,
        organizational_unit=ou,
        client=client,
        key_type=key_type,
        days=days,
    )
    base = file_name or "".join(
        c if c.isalnum() or c in "-." else "_" for c in names[0].split("://")[-1]
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{base}.crt", out / f"{base}.key"
    _write_pair(cert_path, key_path, issued, chain=b"" if client else ca.cert_pem)
    click.echo(f"certificate {cert_path}\nkey         {key_path}")


@certs_group.command("revoke", context_settings=CONTEXT)
@_DIR
@click.option(
    "--name",
    "names",
    multiple=True,
    help="A certificate to revoke: NAME.crt in --dir (e.g. client), or a path (repeatable).",
)
@click.option(
    "--serial",
    "serials",
    multiple=True,
    help="A serial number to revoke, in hex as certs inspect prints it (repeatable).",
)
@click.option(
    "--days",
    default=7,
    show_default=True,
    type=click.IntRange(1, 365),
    help="Days until the CRL's next update (serve warns and refuses clients after it).",
)
def revoke_command(
    directory: Path, names: tuple[str, ...], serials: tuple[str, ...], days: int
) -> None:
    """Revoke certificates of the development CA: writes --dir/ca.crl (PEM) with these and the
    earlier revocations, for serve --client-crl."""
    from proxy.tls import crl  # noqa: PLC0415

    if not names and not serials:
        raise click.UsageError("give --name or --serial: which certificate to revoke")
    files = dev_files(directory)
    ca = _load_ca(files.ca_cert, files.ca_key)
    crl_path = directory / "ca.crl"
    revoked = (
        {entry.serial_number for old in crl.load_crls(crl_path, "--dir") for entry in old}
        if crl_path.exists()
        else set()
    )
    new: list[int] = []
    for name in names:
        path = Path(name) if "/" in name or name.endswith(".crt") else directory / f"{name}.crt"
        new.append(certs.load_chain(path, "--name")[0].serial_number)
    for text in serials:
        try:
            new.append(int(text.replace(":", ""), 16))
        except ValueError:
            raise ConfigError(f"--serial {text!r} is not a hex serial number") from None
    made = crl.make_crl(ca, revoked | set(new), days=days)
    crl_path.write_bytes(made.public_bytes(Encoding.PEM))
    for serial in new:
        click.echo(f"revoked     serial {serial:x}")
    click.echo(
        f"crl         {crl_path} ({len(revoked | set(new))} revoked, next update "
        f"{made.next_update_utc:%Y-%m-%d %H:%M} UTC)"
    )


@certs_group.command("inspect", context_settings=CONTEXT)
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--key",
    "key_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Check that this private key matches the leaf.",
)
@click.option(
    "--ca",
    "ca_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Verify the chain against this CA.",
)
def inspect_command(files: tuple[Path, ...], key_path: Path | None, ca_path: Path | None) -> None:
    """Show certificates; exit 1 on an expired leaf, a key mismatch or a chain that fails."""
    problems: list[str] = []
    now = dt.datetime.now(dt.UTC)
    for path in files:
        chain = certs.load_chain(path, "inspect")
        for index, cert in enumerate(chain):
            click.echo(_describe(path, index, cert))
        leaf = chain[0]
        if leaf.not_valid_after_utc < now:
            problems.append(f"{path}: expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
        if leaf.not_valid_before_utc > now:
            problems.append(f"{path}: not valid before {leaf.not_valid_before_utc:%Y-%m-%d}")
        if key_path is not None:
            matches = certs.key_matches(leaf, certs.load_key(key_path))
            click.echo(f"  key {key_path}: {'matches' if matches else 'DOES NOT MATCH'}")
            if not matches:
                problems.append(f"{key_path} does not match {path}")
        if ca_path is not None:
            verdict = _verify(chain, certs.load_chain(ca_path, "--ca"))
            click.echo(f"  chain against {ca_path}: {verdict or 'verifies'}")
            if verdict:
                problems.append(f"{path}: {verdict}")
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise SystemExit(1)


def _verify(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> str | None:
    leaf, intermediates = chain[0], [c for c in chain[1:] if c not in roots]
    store = Store(roots)
    builder: Any = PolicyBuilder().store(store)
    try:
        is_client = _is_client(leaf)
        if is_client:
            builder.build_client_verifier().verify(leaf, intermediates)
        else:
            name = _first_dns(leaf)
            if name is None:
                builder.build_client_verifier().verify(leaf, intermediates)
            else:
                builder.build_server_verifier(x509.DNSName(name)).verify(leaf, intermediates)
    except VerificationError as e:
        return f"does not verify ({e})"
    return None


def _is_client(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return (
        x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH in usage
        and x509.oid.ExtendedKeyUsageOID.SERVER_AUTH not in usage
    )


def _first_dns(cert: x509.Certificate) -> str | None:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


def _describe(path: Path, index: int, cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        key_text = f"ECDSA {key.curve.name}"
    elif isinstance(key, rsa.RSAPublicKey):
        key_text = f"RSA {key.key_size}"
    else:
        key_text = type(key).__name__
    role = "leaf" if index == 0 else f"chain[{index}]"
    sans = ", ".join(certs.san_strings(cert)) or "-"
    return (
        f"{path} ({role})\n"
        f"  subject      {cert.subject.rfc4514_string()}\n"
        f"  issuer       {cert.issuer.rfc4514_string()}\n"
        f"  SANs         {sans}\n"
        f"  valid        {cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC\n"
        f"  key          {key_text}\n"
        f"  serial       {cert.serial_number:x}\n"
        f"  sha256       {certs.fingerprint(cert)}"
    )
