"""Process tuning at start-up: glibc's allocator thresholds and the open-file limit."""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger("tls_sidecar.server")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc() -> bool:
    """Keep the TLS layer's read buffers out of mmap and off a trimmed heap top.

    uvloop reads TLS with `SSLObject.read(256 KiB)`: CPython allocates 256 KiB and shrinks it,
    per read. glibc serves that from mmap (or a heap top it trims back) until its dynamic
    threshold adapts, which can take a whole first load: measured, 2 page faults per request
    and half the throughput. Fixed thresholds above that size end it for the process's life.
    Only on glibc; elsewhere nothing happens. Returns whether the thresholds were set."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(_M_MMAP_THRESHOLD, 1024 * 1024) and mallopt(_M_TRIM_THRESHOLD, 2 * 1024 * 1024)
    )


def raise_open_file_limit(wanted: int) -> int:
    """Lift the soft RLIMIT_NOFILE toward the hard limit, as nginx's worker_rlimit_nofile and
    Go's runtime do: each client connection costs two descriptors (client and app side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft < wanted:
        log.warning(
            "open-file limit is below what --max-connections needs; raise it (ulimit -n)",
            extra={"limit": soft, "needed": wanted},
        )
    return soft
