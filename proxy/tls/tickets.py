"""The checked reach into OpenSSL's SSL_CTX for what Python's ssl has no API for: session
ticket keys shared by every worker, and key exchange groups (`--tls-groups`), with the notes
the start-up log gives on post-quantum key exchange."""

from __future__ import annotations

import ctypes
import logging
import re
import ssl
import sys
from pathlib import Path
from typing import Any

from proxy.config import ConfigError

_SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEYS_SIZE = 80  # OpenSSL's: a 16-byte key name, a 32-byte HMAC key, a 32-byte AES key


def _libssl() -> ctypes.CDLL | None:
    """The libssl this process's `ssl` module uses (found in /proc/self/maps)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if "/libssl.so" in path:
            try:
                return ctypes.CDLL(path)
            except OSError:
                return None
    return None


def _ssl_ctx_ctrl(ctx: ssl.SSLContext, command: int, larg: int, parg: Any) -> int | None:
    """OpenSSL's SSL_CTX_ctrl on a context, for what Python's ssl has no API for. The SSL_CTX
    pointer is the first field of CPython's SSLContext object; it is checked against the
    options Python reports before anything is written. None (and nothing done) where that
    fails; the OpenSSL errors a refused command leaves are cleared, so that no later call of
    Python's ssl reports them as its own."""
    if sys.implementation.name != "cpython":
        return None
    libssl = _libssl()
    if libssl is None:
        return None
    try:
        get_options = libssl.SSL_CTX_get_options
        ctrl = libssl.SSL_CTX_ctrl
        clear_errors = libssl.ERR_clear_error  # libcrypto's, found through libssl's dependencies
    except AttributeError:
        return None
    get_options.restype = ctypes.c_uint64
    get_options.argtypes = [ctypes.c_void_p]
    ctrl.restype = ctypes.c_long
    ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    clear_errors.restype = None
    clear_errors.argtypes = []
    # PyObject_HEAD is a reference count and a type pointer; SSL_CTX* follows.
    pointer = ctypes.c_void_p.from_address(id(ctx) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    if not pointer or get_options(pointer) != int(ctx.options):
        return None
    result = int(ctrl(pointer, command, larg, parg))
    if result != 1:
        clear_errors()
    return result


def share_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give a context the session ticket keys every worker shares, so a session resumes on any
    worker (Python's ssl has no API for it). False (and nothing done) where that fails."""
    if len(keys) != TICKET_KEYS_SIZE:
        return False
    buffer = ctypes.create_string_buffer(keys, len(keys))
    return _ssl_ctx_ctrl(ctx, _SSL_CTRL_SET_TLSEXT_TICKET_KEYS, len(keys), buffer) == 1


_SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list is a macro over SSL_CTX_ctrl
# Key exchange groups OpenSSL 3.0 to 3.5 know by these names, for the list an unknown name
# prints (OpenSSL has no call that lists them; `openssl list -tls-groups` is 3.5's CLI only).
KNOWN_GROUPS = (
    "X25519MLKEM768",
    "SecP256r1MLKEM768",
    "SecP384r1MLKEM1024",
    "X25519",
    "X448",
    "P-256",
    "P-384",
    "P-521",
    "MLKEM512",
    "MLKEM768",
    "MLKEM1024",
    "brainpoolP256r1tls13",
    "brainpoolP384r1tls13",
    "brainpoolP512r1tls13",
    "ffdhe2048",
    "ffdhe3072",
    "ffdhe4096",
    "ffdhe6144",
    "ffdhe8192",
)
HYBRID_PQ_GROUP = "X25519MLKEM768"


def group_names(groups: str) -> list[str]:
    """The names in a group list, without OpenSSL 3.5's syntax: `/` between groups of equal
    preference, `?` (skip if unknown), `*` (send a key share), `-` (remove from DEFAULT)."""
    names = (name.strip().lstrip("?*-") for name in re.split(r"[:/]", groups))
    return [name for name in names if name]


def set_groups(ctx: ssl.SSLContext, groups: str) -> bool | None:
    """SSL_CTX_set1_groups_list (Python < 3.15 has no API for it): True when OpenSSL took the
    colon-separated list, False when it refused it, None when the SSL_CTX cannot be reached."""
    result = _ssl_ctx_ctrl(ctx, _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii"))
    return None if result is None else result == 1


def _scratch_takes(groups: str) -> bool | None:
    return set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), groups)


def offered_groups() -> list[str]:
    """The known groups this OpenSSL takes, each tried on a scratch context."""
    return [name for name in KNOWN_GROUPS if _scratch_takes(name)]


def hybrid_pq_available() -> bool:
    return _scratch_takes(HYBRID_PQ_GROUP) is True


def check_groups(text: str, option: str = "--tls-groups") -> str:
    """A --tls-groups value OpenSSL takes, or ConfigError naming the unknown group and the
    groups this OpenSSL offers."""
    names = text.strip().split(":")
    if not text.strip() or any(not name.strip() for name in names):
        raise ConfigError(
            f"{option}: {text!r} is not a list of groups; use e.g. X25519MLKEM768:X25519"
        )
    if not text.isascii():
        raise ConfigError(f"{option}: {text!r} is not ASCII; use OpenSSL's group names")
    value = ":".join(name.strip() for name in names)
    taken = _scratch_takes(value)
    if taken is None:
        raise ConfigError(
            f"{option}: this Python cannot reach OpenSSL to set key exchange groups; "
            "leave it unset for OpenSSL's defaults"
        )
    if not taken:
        unknown = [name for name in group_names(value) if not _scratch_takes(name)]
        raise ConfigError(
            f"{option}: {', '.join(unknown) or value} not offered by {ssl.OPENSSL_VERSION}; "
            f"it offers {':'.join(offered_groups())}"
        )
    return value


def has_cve_2026_2673(version: tuple[int, int, int, int, int]) -> bool:
    """OpenSSL 3.5.0 to 3.5.5, by ssl.OPENSSL_VERSION_INFO (OpenSSL 3 puts the patch fourth:
    3.5.4 is (3, 5, 0, 4, 0))."""
    return version[:3] == (3, 5, 0) and version[3] <= 5


def key_exchange_notes(groups: str | None) -> list[tuple[int, str]]:
    """What the start-up log says about post-quantum key exchange: (level, message)."""
    version = ssl.OPENSSL_VERSION_INFO
    notes: list[tuple[int, str]] = []
    if not hybrid_pq_available():
        notes.append(
            (
                logging.INFO,
                f"hybrid post-quantum key exchange ({HYBRID_PQ_GROUP}) not available: "
                f"{ssl.OPENSSL_VERSION} has no ML-KEM (OpenSSL 3.5 or later has it)",
            )
        )
    elif groups is not None and HYBRID_PQ_GROUP not in group_names(groups):
        notes.append(
            (
                logging.INFO,
                f"hybrid post-quantum key exchange ({HYBRID_PQ_GROUP}) available but not in "
                f"--tls-groups {groups}",
            )
        )
    else:
        where = f"--tls-groups {groups}" if groups is not None else "OpenSSL's default groups"
        notes.append(
            (
                logging.INFO,
                f"hybrid post-quantum key exchange ({HYBRID_PQ_GROUP}) available, in {where}",
            )
        )
    if has_cve_2026_2673(version):
        notes.append(
            (
                logging.WARNING,
                f"{ssl.OPENSSL_VERSION} has CVE-2026-2673 (key exchange group negotiation, "
                "fixed in 3.5.6): update OpenSSL, unless your distribution has backported the fix",
            )
        )
    return notes
