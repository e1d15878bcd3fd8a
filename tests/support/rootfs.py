"""The image's root filesystem without a container engine: a Debian 13 root made by debootstrap
(standing in for python:3.13-slim-trixie: Debian's Python 3.13 for the official image's), the
Dockerfile's own build script run in it, and processes started in it as the image starts them.

Every process that touches the root runs in a mount namespace of its own (`unshare --mount`):
its mounts (the read-only root, /tmp, /proc, /dev) vanish with it, on every exit path, so the
machine never holds a mount to clean up. debootstrap runs that way too."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "rootfs-trixie"  # git-ignored; the debootstrap result is kept
SUITE = "trixie"
# What python:3.13-slim-trixie holds besides its own Python: Debian's Python stands in for it.
PACKAGES = ("python3", "python3-venv", "ca-certificates", "netbase", "tzdata")
SCRIPT = REPO / "deploy" / "image" / "build-root.sh"
SCRIPT_IN_ROOT = "/usr/local/sbin/build-root.sh"  # where the Dockerfile mounts it
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEVICES = ("null", "zero", "full", "random", "urandom")


def missing_tools() -> list[str]:
    return [
        tool for tool in ("debootstrap", "unshare", "chroot", "mount") if not shutil.which(tool)
    ]


def _apt_entries() -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` source in this machine's apt configuration, in order."""
    sources = Path("/etc/apt/sources.list")
    folder = Path("/etc/apt/sources.list.d")
    files = [sources] if sources.exists() else []
    files += sorted(folder.glob("*")) if folder.is_dir() else []
    for path in files:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (key.strip().lower(), value.strip())
                    for key, _, value in (
                        line.partition(":") for line in stanza.splitlines() if ":" in line
                    )
                    if not key.startswith("#")
                )
                if "deb" in fields.get("types", "").split() and fields.get("enabled") != "no":
                    for uri in fields.get("uris", "").split():
                        yield uri, fields.get("suites", "").split()
        elif path.suffix == ".list" or path == sources:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]


def debian_mirror() -> str | None:
    """The Debian archive this machine's apt uses (not its security archive), read at run time:
    the project names no outside host."""
    for uri, suites in _apt_entries():
        if uri.rstrip("/").endswith("/debian") and not any("security" in s for s in suites):
            return uri.rstrip("/")
    return None


class Steps:
    """Each step's duration, printed as it ends (make test-slow runs pytest with -s)."""

    def __init__(self) -> None:
        self.done: list[tuple[str, float]] = []

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - started
            self.done.append((name, seconds))
            print(f"\nimage root: {name}: {seconds:.1f}s", file=sys.stderr, flush=True)

    def summary(self) -> str:
        return "\n".join(f"  {seconds:7.1f}s  {name}" for name, seconds in self.done)


def _mount_script(read_only: bool, binds: Sequence[tuple[Path, str]], resolv_conf: bool) -> str:
    """The host's shell sets up the namespace's mounts, then execs chroot: the root itself has
    no shell once it is hardened. $1 is the root, $2 the user (or -), the rest the command."""
    lines = [
        "set -eu",
        "r=$1 user=$2; shift 2",
        'mount --bind "$r" "$r"',
    ]
    if read_only:
        lines.append('mount -o remount,bind,ro "$r"')
    lines += [
        'mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$r/tmp"',
        'mount -t proc -o nosuid,nodev,noexec proc "$r/proc"',
        'mount -t tmpfs -o mode=755,nosuid tmpfs "$r/dev"',
        f'for d in {" ".join(DEVICES)}; do : > "$r/dev/$d"; mount --bind "/dev/$d" "$r/dev/$d"; done',
    ]
    if resolv_conf:
        lines.append('mount --bind /etc/resolv.conf "$r/etc/resolv.conf"')
    for source, target in binds:
        # targets are under /tmp, the namespace's own tmpfs
        kind = "mkdir -p" if source.is_dir() else ": >"
        lines.append(f'{kind} "$r"{shlex.quote(target)}')
        lines.append(f'mount --bind -o ro {shlex.quote(str(source))} "$r"{shlex.quote(target)}')
    lines.append(
        'if [ "$user" = - ]; then exec chroot "$r" "$@"; fi; '
        'exec chroot --userspec="$user" "$r" "$@"'
    )
    return "\n".join(lines)


def in_root(
    root: Path,
    argv: Sequence[str],
    *,
    env: dict[str, str],
    user: str | None = None,
    read_only: bool = True,
    binds: Sequence[tuple[Path, str]] = (),
    resolv_conf: bool = False,
    pid_namespace: bool = False,
) -> list[str]:
    """The command line that runs argv in root: a mount namespace of its own (and a PID
    namespace where argv is PID 1, as in a container), /tmp the only writable place when
    read_only, /proc and a few devices."""
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if pid_namespace:
        unshare += ["--pid", "--fork", "--kill-child"]
    script = _mount_script(read_only, binds, resolv_conf)
    return [
        *unshare,
        "env",
        "-i",
        *(f"{k}={v}" for k, v in env.items()),
        "/bin/sh",
        "-c",
        script,
        "mount-and-chroot",
        str(root),
        user or "-",
        *argv,
    ]


def run_in_root(root: Path, argv: Sequence[str], timeout: float, **kwargs: object) -> str:
    env = {"PATH": BASE_PATH, "HOME": "/root", "LC_ALL": "C.UTF-8"}
    extra = kwargs.pop("env", None)
    if isinstance(extra, dict):
        env.update(extra)
    command = in_root(root, argv, env=env, **kwargs)  # type: ignore[arg-type]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} in {root.name} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        )
    return done.stdout


def base_root(steps: Steps) -> Path:
    """The debootstrapped Debian 13 root, made once and kept in CACHE (re-made when the package
    list or the mirror changes)."""
    mirror = debian_mirror()
    if mirror is None:
        raise AssertionError(
            "no Debian archive in /etc/apt/sources.list*: debootstrap needs a mirror "
            "(a `deb` entry whose URI ends in /debian)"
        )
    base, stamp = CACHE / "base", CACHE / "base.json"
    wanted = {"suite": SUITE, "mirror": mirror, "packages": list(PACKAGES), "variant": "minbase"}
    if stamp.exists() and base.is_dir() and json.loads(stamp.read_text()) == wanted:
        with steps.step(f"debootstrap {SUITE} (cached in {CACHE.relative_to(REPO)})"):
            return base
    with steps.step(f"debootstrap --variant=minbase {SUITE} from {mirror}"):
        partial = CACHE / "base.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        stamp.unlink(missing_ok=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(PACKAGES)}",
                SUITE,
                str(partial),
                mirror,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        if done.returncode != 0:
            log = partial / "debootstrap" / "debootstrap.log"
            detail = log.read_text()[-3000:] if log.exists() else done.stdout[-3000:]
            raise AssertionError(f"debootstrap failed ({done.returncode}):\n{detail}{done.stderr}")
        partial.rename(base)
        stamp.write_text(json.dumps(wanted))
    return base


def build_image_root(steps: Steps) -> Path:
    """The image's root: the base, then deploy/image/build-root.sh's steps in the Dockerfile's
    order, from a build context of the files the Dockerfile copies. Made afresh each run."""
    base = base_root(steps)
    image = CACHE / "image"
    with steps.step("copy the base root"):
        shutil.rmtree(image, ignore_errors=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(image)], check=True)
        src = image / "src"  # the build stage's WORKDIR
        src.mkdir()
        for name in (
            "requirements.lock",
            "pyproject.toml",
            "setup.py",
            "README.md",
            "build-requirements.lock",
        ):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "proxy", src / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(SCRIPT, image / SCRIPT_IN_ROOT.lstrip("/"))
    # pip reaches PyPI with this machine's trust store (a proxy may re-sign its TLS)
    cafile = ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    build = {
        "read_only": False,
        "resolv_conf": True,
        "binds": [(Path(cafile), "/tmp/host-ca.pem")],
        "env": {
            "PIP_CERT": "/tmp/host-ca.pem",
            **{k: v for k, v in os.environ.items() if k in ("PIP_INDEX_URL", "HTTPS_PROXY")},
        },
    }
    with steps.step("build-root.sh build-tools (gcc, libnghttp2-dev)"):
        run_in_root(image, ["/bin/sh", SCRIPT_IN_ROOT, "build-tools"], 900, **build)
    with steps.step("build-root.sh deps /src/requirements.lock (--require-hashes)"):
        run_in_root(
            image, ["/bin/sh", SCRIPT_IN_ROOT, "deps", "/src/requirements.lock"], 900, **build
        )
    with steps.step("build-root.sh build-deps /src/build-requirements.lock (--require-hashes)"):
        run_in_root(
            image,
            ["/bin/sh", SCRIPT_IN_ROOT, "build-deps", "/src/build-requirements.lock"],
            900,
            **build,
        )
    with steps.step("build-root.sh package /src"):
        run_in_root(image, ["/bin/sh", SCRIPT_IN_ROOT, "package", "/src"], 600, **build)
    # One root plays both stages here, so the build tools stay in it; the final stage's own
    # step still runs, in the Dockerfile's order.
    with steps.step("build-root.sh runtime (libnghttp2-14)"):
        run_in_root(image, ["/bin/sh", SCRIPT_IN_ROOT, "runtime"], 600, **build)
    with steps.step("build-root.sh harden"):
        shutil.rmtree(src)  # the final stage copies /opt/tls-sidecar only
        run_in_root(image, ["/bin/sh", SCRIPT_IN_ROOT, "harden"], 120, **build)
        (image / SCRIPT_IN_ROOT.lstrip("/")).unlink()  # mounted for the step, not copied
    return image


def dockerfile_final_stage() -> tuple[dict[str, str], str, list[str]]:
    """The final stage's ENV, USER and ENTRYPOINT + CMD, as the image runs the sidecar."""
    final = (REPO / "Dockerfile").read_text().split("\nFROM ")[-1]
    joined = re.sub(r"\\\n\s*", " ", final)
    env: dict[str, str] = {"PATH": BASE_PATH, "HOME": "/"}  # docker's for a user without a home
    user = ""
    argv: list[str] = []
    for line in joined.splitlines():
        word, _, rest = line.partition(" ")
        if word == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value.replace("$PATH", env["PATH"])
        elif word == "USER":
            user = rest.strip()
        elif word in ("ENTRYPOINT", "CMD"):
            argv += json.loads(rest)
    return env, user, argv
