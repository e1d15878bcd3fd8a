"""The HTTP/2 attack budgets, as plain objects: header blocks bounded in total (CONTINUATION
flood, CVE-2024-27316), stream ids never used twice, and token buckets for resets and for frames
that make the server work without a request (rapid reset CVE-2023-44487, CVE-2025-8671;
SETTINGS, PING and empty DATA floods)."""

from __future__ import annotations

import h2.connection
import h2.exceptions
from h2.frame_buffer import FrameBuffer
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame

# Frames that cost work but carry no request (SETTINGS, PING, empty DATA, unknown types): a
# burst, then a steady rate per second; past it, GOAWAY ENHANCE_YOUR_CALM.
CONTROL_BURST = 1000.0
CONTROL_RATE = 100.0


def header_list_bound(max_header_bytes: int) -> int:
    """What one header block may be, encoded or decoded (HPACK counts 32 bytes more per
    field than a head's size): twice --max-header-bytes."""
    return 2 * max_header_bytes


class CalmDown(h2.exceptions.DenialOfServiceError):
    """The client spent a budget: the connection ends with GOAWAY ENHANCE_YOUR_CALM."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class HeaderBlockBudget(FrameBuffer):
    """h2 joins up to 64 CONTINUATION frames of any size into one header block; here a block is
    bounded in total by --max-header-bytes as it arrives (CVE-2024-27316). A HEADERS frame on a
    stream id already used and closed is a connection error PROTOCOL_ERROR (RFC 9113 §5.1.1),
    where h2 would say STREAM_CLOSED, or only reset the stream if it had been reset."""

    def __init__(self, conn: h2.connection.H2Connection, limit: int) -> None:
        super().__init__(server=True)
        self.conn = conn
        self.limit = limit
        self._block = 0

    def _update_header_buffer(self, f: Frame | None) -> Frame | None:
        if isinstance(f, HeadersFrame):
            sid = f.stream_id
            if sid <= self.conn.highest_inbound_stream_id:
                stream = self.conn.streams.get(sid)
                if stream is None or stream.closed:
                    raise h2.exceptions.ProtocolError(f"stream id {sid} used again")
            self._block = len(f.data)
        elif isinstance(f, ContinuationFrame):
            self._block += len(f.data)
        if self._block > self.limit:
            raise CalmDown("header_block", f"header block over {self.limit} bytes")
        return super()._update_header_buffer(f)


class Budget:
    """A token bucket: `burst` at once, refilled at `rate` per second."""

    __slots__ = ("_at", "_level", "burst", "rate")

    def __init__(self, burst: float, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self._level = burst
        self._at = now

    def spend(self, now: float) -> bool:
        """Take one token; False when none is left."""
        level = min(self.burst, self._level + (now - self._at) * self.rate) - 1.0
        self._at = now
        self._level = level
        return level >= 0.0
