"""Running out of file descriptors: what counts as that, and the reserve's arithmetic."""

from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

from proxy.config import CertificateError
from proxy.descriptors import DescriptorReserve, open_descriptors, reserve_for
from proxy.tls.context import out_of_descriptors


def test_an_error_raised_from_emfile_is_out_of_descriptors() -> None:
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as e:
            raise CertificateError(f"--key: cannot be read ({e.strerror})") from None
    except CertificateError as wrapped:
        assert out_of_descriptors(wrapped)
    assert out_of_descriptors(OSError(errno.ENFILE, "Too many open files in system"))
    assert not out_of_descriptors(OSError(errno.ENOENT, "No such file or directory"))
    assert not out_of_descriptors(CertificateError("--cert: the key does not match"))


def test_reading_certificates_without_descriptors_is_not_a_change(tmp_path: Path) -> None:
    """Out of descriptors, the files' digest raises instead of hashing them as missing (which
    looked like a change and started a reload that failed and blamed the certificates)."""
    (tmp_path / "tls.crt").write_text("certificate")
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from proxy.tls.context import content_digest, out_of_descriptors\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "hog = []\n"
        "try:\n"
        "    while True:\n"
        "        hog.append(open('/dev/null'))\n"
        "except OSError:\n"
        "    pass\n"
        "try:\n"
        f"    content_digest([Path({str(tmp_path / 'tls.crt')!r})])\n"
        "except OSError as e:\n"
        "    sys.exit(0 if out_of_descriptors(e) else 2)\n"
        "sys.exit(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert done.returncode == 0


def test_the_reserve_admits_far_from_the_limit_without_counting() -> None:
    reserve = DescriptorReserve(100_000, idle_upstreams=128)
    assert reserve.admits(0) and reserve.admits(40_000)
    assert reserve_for(256) == 32 and reserve_for(100) == 16 and reserve_for(1 << 20) == 64


def test_the_reserve_refuses_what_would_eat_into_the_spare_descriptors() -> None:
    used = open_descriptors()
    assert used is not None
    # The smallest limit that leaves room for one more app connection and the reserve.
    limit = next(n for n in range(used, used + 200) if n - reserve_for(n) - 1 >= used)
    assert DescriptorReserve(limit, idle_upstreams=0).admits(10_000)
    tight = DescriptorReserve(limit - 1, idle_upstreams=0)
    assert not tight.admits(10_000)
    assert not tight.admits(10_000), "refused again without a count"
