"""Process tuning: glibc's allocator thresholds, clean pages for each TLS connection's read
buffer, and the open-file limit."""

from __future__ import annotations

import ctypes
import logging
import mmap
import resource
from pathlib import Path

log = logging.getLogger("tls_sidecar.server")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# uvloop's SSL_READ_MAX_SIZE: the read buffer each TLS connection holds for its whole life
_TLS_READ_BUFFER = 256 * 1024
_PAGE = mmap.PAGESIZE


class _Glibc:
    """glibc's allocator calls, bound once."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        # glibc's own call: on another C library (musl answers for libc.so.6 too, and keeps
        # metadata inside a block, which the madvise below would wipe) the probe fails
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        self.version = libc.gnu_get_libc_version()
        self.mallopt = libc.mallopt
        self.malloc = libc.malloc
        self.malloc.restype = ctypes.c_void_p
        self.malloc.argtypes = [ctypes.c_size_t]
        self.free = libc.free
        self.free.restype = None
        self.free.argtypes = [ctypes.c_void_p]
        self.madvise = libc.madvise
        self.madvise.restype = ctypes.c_int
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.tuned = False


def _glibc() -> _Glibc | None:
    try:
        return _Glibc(ctypes.CDLL("libc.so.6", use_errno=True))
    except (OSError, AttributeError):
        return None  # another C library: its allocator is left as it is


_GLIBC = _glibc()


def tune_malloc() -> bool:
    """Keep the TLS layer's read buffers out of mmap and off a trimmed heap top.

    uvloop reads TLS with `SSLObject.read(256 KiB)`: CPython allocates 256 KiB and shrinks it,
    per read. glibc serves that from mmap (or a heap top it trims back) until its dynamic
    threshold adapts, which can take a whole first load: measured, 2 page faults per request
    and half the throughput. Fixed thresholds above that size end it for the process's life.
    Only on glibc; elsewhere nothing happens. Returns whether the thresholds were set."""
    glibc = _GLIBC
    if glibc is None:
        return False
    glibc.tuned = bool(
        glibc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024)
        and glibc.mallopt(_M_TRIM_THRESHOLD, 2 * 1024 * 1024)
    )
    return glibc.tuned


def clean_tls_read_buffer() -> None:
    """Make the heap block the next TLS connection's read buffer will take clean pages.

    uvloop gives each TLS connection a 256 KiB read buffer (`PyMem_RawMalloc`) that reads
    write only as far as they go: one page for an idle connection. Under tune_malloc's
    thresholds it comes from the heap, from memory the last handshakes wrote and freed, and
    every page they wrote stays resident in it for the connection's life (8-21 KiB of an idle
    connection's 34-64). Called just before the TLS layer is made: the block glibc would give
    it is taken here, its pages given back (MADV_DONTNEED: zero-filled on the next touch), and
    freed, so that the buffer's allocation gets the same block back clean. Trimming the whole
    heap at rest (`malloc_trim`) cannot reach those pages: they are in use. Costs ~5 us per
    connection; does nothing where tune_malloc did not tune."""
    glibc = _GLIBC
    if glibc is None or not glibc.tuned:
        return
    block = glibc.malloc(_TLS_READ_BUFFER)
    if not block:
        return
    first = -(-block // _PAGE) * _PAGE
    length = (block + _TLS_READ_BUFFER - first) // _PAGE * _PAGE
    glibc.madvise(first, length, mmap.MADV_DONTNEED)
    glibc.free(block)


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


def listening_marker(directory: str, pid: int) -> Path:
    """The file a worker of --workers writes once its TLS port listens: the supervisor's
    /readyz waits for every live worker's (a worker still waiting for its first certificate,
    e.g. an SVID, does not listen yet, and a connection to the port would be refused)."""
    return Path(directory) / f"listening-{pid}"
