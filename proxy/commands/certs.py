"""`tls-sidecar certs …`: a development CA and certificates, like mkcert, and `inspect`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.commands.devcerts import (
    dev_files,
    init_dev_certificates,
    issue_checked,
    load_ca,
    vouchable,
    write_pair,
)
from proxy.config import ConfigError
from proxy.options import CONTEXT
from proxy.tls import certcheck, certs

FC = TypeVar("FC", bound=Callable[..., Any])


class AliasedOption(click.Option):
    """An option whose first name is the one shown; the others are older spellings that still
    work but stay out of --help."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        shown, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def certs_dir_option(help_text: str) -> Callable[[FC], FC]:
    """The folder of the development CA and certificates: `--certs-dir` everywhere (`demo`
    too); `--dir` and `--out`, the names it had, still work."""
    return click.option(
        "--certs-dir",
        "--dir",
        "--out",
        "certs_dir",
        cls=AliasedOption,
        default="certs",
        show_default=True,
        type=click.Path(path_type=Path),
        help=help_text,
    )


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
@certs_dir_option("Folder to write to.")
@click.option(
    "--key-type",
    default="ecdsa",
    show_default=True,
    type=click.Choice(["ecdsa", "rsa"]),
    help="ECDSA P-256 or RSA 2048.",
)
def init_command(hosts: tuple[str, ...], certs_dir: Path, key_type: certs.KeyType) -> None:
    """Make a development CA (kept if it exists) and server and client certificates."""
    files, ca_made = init_dev_certificates(certs_dir, hosts or certs.DEFAULT_HOSTS, key_type)
    click.echo(f"{'created' if ca_made else 'reused'} CA      {files.ca_cert}")
    click.echo(f"server certificate  {files.server_cert}  (key {files.server_key})")
    click.echo(f"client certificate  {files.client_cert}  (key {files.client_key})")
    click.echo(f"trust it with:      curl --cacert {files.ca_cert} https://localhost:8443/")
    click.echo(f"or everywhere:      sudo tls-sidecar certs trust --certs-dir {certs_dir}")
    ca = certs.load_chain(files.ca_cert, "--ca")[0]
    if certcheck.limits_ip_addresses(ca):
        click.echo(
            f"note: {files.ca_cert} limits IP addresses (an older certs init made it so), which "
            "grpcio cannot check: it refuses these certificates; for a CA every client accepts, "
            f"move {files.ca_cert} and {files.ca_key} away and run certs init again "
            "(and certs trust, if you trusted the old one)",
            err=True,
        )


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
            f"; run: sudo tls-sidecar certs {verb} --certs-dir {directory}"
            if "needs root" in str(e)
            else ""
        )
        raise click.ClickException(f"{e}{fix}") from None
    if not dry_run:
        click.echo(
            f"{'trusted' if install else 'no longer trusted'}: {ca} "
            "(browsers pick it up when they restart)"
        )


_DIR = certs_dir_option("The folder of certs init (its ca.crt).")
_DRY = click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")


@certs_group.command("trust", context_settings=CONTEXT)
@_DIR
@_DRY
def trust_command(certs_dir: Path, dry_run: bool) -> None:
    """Trust the development CA in the system store and the browsers' (NSS) stores, as
    mkcert -install does: curl and browsers then accept the demo without --cacert."""
    _trust(certs_dir, dry_run, install=True)


@certs_group.command("untrust", context_settings=CONTEXT)
@_DIR
@_DRY
def untrust_command(certs_dir: Path, dry_run: bool) -> None:
    """Remove the development CA from the stores `certs trust` added it to."""
    _trust(certs_dir, dry_run, install=False)


@certs_group.command("issue", context_settings=CONTEXT)
@click.option(
    "--ca",
    "ca_path",
    default=None,
    type=click.Path(path_type=Path),
    help="CA certificate. [default: ca.crt in --certs-dir]",
)
@click.option(
    "--ca-key",
    default=None,
    type=click.Path(path_type=Path),
    help="CA private key. [default: the --ca file with .key]",
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
@certs_dir_option("Folder of the development CA, and of the new files.")
@click.option(
    "--file-name", default=None, help="Base name of the files. [default: from the first --name]"
)
def issue_command(
    ca_path: Path | None,
    ca_key: Path | None,
    names: tuple[str, ...],
    cn: str | None,
    ou: str | None,
    client: bool,
    days: int,
    key_type: certs.KeyType,
    certs_dir: Path,
    file_name: str | None,
) -> None:
    """Issue one more certificate from the development CA."""
    ca_path = ca_path or certs_dir / "ca.crt"
    ca = load_ca(ca_path, ca_key or ca_path.with_suffix(".key"))
    vouchable(ca, ca_path, names, "--name")
    issued = issue_checked(
        ca,
        ca_path,
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
    certs_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = certs_dir / f"{base}.crt", certs_dir / f"{base}.key"
    write_pair(cert_path, key_path, issued, chain=b"" if client else ca.cert_pem)
    click.echo(f"certificate {cert_path}\nkey         {key_path}")


@certs_group.command("revoke", context_settings=CONTEXT)
@_DIR
@click.option(
    "--name",
    "names",
    multiple=True,
    help="A certificate to revoke: NAME.crt in --certs-dir (e.g. client), or a path (repeatable).",
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
    certs_dir: Path, names: tuple[str, ...], serials: tuple[str, ...], days: int
) -> None:
    """Revoke certificates of the development CA: writes ca.crl (PEM) in --certs-dir with these and the
    earlier revocations, for serve --client-crl."""
    from proxy.tls import crl  # noqa: PLC0415

    if not names and not serials:
        raise click.UsageError("give --name or --serial: which certificate to revoke")
    files = dev_files(certs_dir)
    ca = load_ca(files.ca_cert, files.ca_key)
    crl_path = certs_dir / "ca.crl"
    revoked = (
        {entry.serial_number for old in crl.load_crls(crl_path, "--certs-dir") for entry in old}
        if crl_path.exists()
        else set()
    )
    new: list[int] = []
    for name in names:
        path = Path(name) if "/" in name or name.endswith(".crt") else certs_dir / f"{name}.crt"
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
            verdict = certcheck.verify_chain(chain, certs.load_chain(ca_path, "--ca"))
            if certcheck.is_client_certificate(leaf):
                role = "verifies as a client certificate"
            elif certcheck.server_name(leaf) is None:
                role = "verifies, but it names no DNS name or IP address a client could check"
            else:
                role = "verifies as a server certificate"
            shown = f"does not verify ({verdict})" if verdict else role
            click.echo(f"  chain against {ca_path}: {shown}")
            if verdict:
                problems.append(f"{path}: does not verify against {ca_path} ({verdict})")
    for problem in problems:
        click.echo(f"problem: {problem}", err=True)
    if problems:
        raise SystemExit(1)


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
