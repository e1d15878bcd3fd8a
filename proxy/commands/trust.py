"""`certs trust` / `certs untrust`: the development CA in the system's and the browsers' trust
stores, as `mkcert -install` and `caddy trust` do.

A plan of steps is made first (what `--dry-run` prints), then run. The system store: Debian and
Ubuntu (`update-ca-certificates`), Fedora and RHEL (`update-ca-trust`), macOS (`security`).
Browsers on Linux (Chromium, Firefox) read NSS databases instead: those are changed with
`certutil` (Debian: libnss3-tools) when it is installed."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from proxy.tls.certs import fingerprint

DEBIAN_DIR = Path("/usr/local/share/ca-certificates")
FEDORA_DIR = Path("/etc/pki/ca-trust/source/anchors")
MAC_KEYCHAIN = "/Library/Keychains/System.keychain"


class TrustError(Exception):
    """A step failed or needs rights the user does not have; the message says what to do."""


@dataclass
class Step:
    describe: str
    run: Callable[[], None]
    needs_root: bool = False


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _fingerprint(ca: Path) -> str:
    return fingerprint(x509.load_pem_x509_certificate(ca.read_bytes()))[:16]


def _as_user(argv: list[str]) -> list[str]:
    """Run as the user who called sudo: their browsers' stores stay theirs."""
    user = os.environ.get("SUDO_USER")
    if user and os.geteuid() == 0 and shutil.which("sudo"):
        return ["sudo", "-u", user, *argv]
    return argv


def _command(argv: list[str]) -> Callable[[], None]:
    def run() -> None:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise TrustError(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")

    return run


def _nss_databases(home: Path) -> list[Path]:
    """Chromium's (~/.pki/nssdb) and every Firefox profile's."""
    found = [home / ".pki" / "nssdb"]
    for profiles in (home / ".mozilla" / "firefox", home / "snap/firefox/common/.mozilla/firefox"):
        if profiles.is_dir():
            found += sorted(p for p in profiles.iterdir() if (p / "cert9.db").exists())
    return found


def plan(ca: Path, *, install: bool, home: Path | None = None) -> Plan:
    """What trusting (install) or untrusting the CA takes on this machine."""
    if not ca.is_file():
        raise TrustError(f"{ca} does not exist; make it with: tls-sidecar certs init")
    if home is None:
        user = os.environ.get("SUDO_USER")
        home = Path(os.path.expanduser(f"~{user}")) if user else Path.home()
    fingerprint = _fingerprint(ca)
    name = f"tls-sidecar development CA {fingerprint}"
    result = Plan()
    system = platform.system()
    if system == "Darwin":
        argv = (
            ["security", "add-trusted-cert", "-d", "-r", "trustRoot", "-k", MAC_KEYCHAIN, str(ca)]
            if install
            else ["security", "remove-trusted-cert", "-d", str(ca)]
        )
        result.steps.append(Step("run " + " ".join(argv), _command(argv), needs_root=True))
    elif shutil.which("update-ca-certificates") or DEBIAN_DIR.is_dir():
        refresh = ["update-ca-certificates", *([] if install else ["--fresh"])]
        result.steps += _anchor_steps(
            ca, DEBIAN_DIR / f"tls-sidecar-{fingerprint}.crt", refresh, install
        )
    elif shutil.which("update-ca-trust") or FEDORA_DIR.is_dir():
        target = FEDORA_DIR / f"tls-sidecar-{fingerprint}.pem"
        result.steps += _anchor_steps(ca, target, ["update-ca-trust", "extract"], install)
    else:
        result.notes.append(
            "no system trust store this command knows (Debian/Ubuntu, Fedora/RHEL, macOS): "
            f"add {ca} by hand"
        )
    if system == "Linux":
        certutil = shutil.which("certutil")
        if certutil is None:
            result.notes.append(
                "browsers (Chromium, Firefox) use their own NSS store: install certutil "
                "(apt-get install libnss3-tools / dnf install nss-tools) and run this again"
            )
        else:
            for db in _nss_databases(home):
                if install:
                    if not db.exists():
                        result.steps.append(Step(f"create {db}", _create_nssdb(certutil, db)))
                    argv = _as_user(
                        [certutil, "-d", f"sql:{db}", "-A", "-t", "C,,", "-n", name, "-i", str(ca)]
                    )
                else:
                    if not db.exists():
                        continue
                    argv = _as_user([certutil, "-d", f"sql:{db}", "-D", "-n", name])
                result.steps.append(Step("run " + " ".join(argv), _command(argv)))
    return result


def _anchor_steps(ca: Path, target: Path, refresh: list[str], install: bool) -> list[Step]:
    """A system store fed from a folder of anchors: the CA file in (or out), then a refresh."""
    if install:
        change = Step(f"copy {ca} to {target}", lambda: _copy(ca, target), needs_root=True)
    else:
        change = Step(f"remove {target}", lambda: target.unlink(missing_ok=True), needs_root=True)
    return [change, Step("run " + " ".join(refresh), _command(refresh), needs_root=True)]


def _copy(ca: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(ca.read_bytes())
    target.chmod(0o644)


def _create_nssdb(certutil: str, db: Path) -> Callable[[], None]:
    def run() -> None:
        db.mkdir(parents=True, exist_ok=True)
        _command(_as_user([certutil, "-d", f"sql:{db}", "-N", "--empty-password"]))()

    return run


def execute(steps: Plan) -> None:
    """Run the plan; without the rights it needs, one line saying what to run with sudo."""
    if any(s.needs_root for s in steps.steps) and os.geteuid() != 0:
        raise TrustError("changing the system trust store needs root: run it with sudo")
    for step in steps.steps:
        step.run()
