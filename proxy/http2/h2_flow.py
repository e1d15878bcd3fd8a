"""Body bytes within the peer's flow-control windows, for both codecs on `h2` (the server's
responses, the h2c client's requests): what the windows let through goes to h2 at once (in
frames of the peer's size), the rest waits here in order, with the end or the trailers
behind it, and goes as the windows open. h2 itself would refuse bytes past a window."""

from __future__ import annotations

import contextlib

import h2.connection
import h2.exceptions

from proxy.core.headers import Headers


class _Waiting:
    """A stream's bytes that wait for the peer's window, and what follows them."""

    __slots__ = ("chunks", "end", "size", "trailers")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.end = False
        self.trailers: Headers | None = None


class Outbound:
    """The bodies one h2 connection sends, held for the peer's windows."""

    __slots__ = ("conn", "streams", "total")

    def __init__(self, conn: h2.connection.H2Connection) -> None:
        self.conn = conn
        self.streams: dict[int, _Waiting] = {}
        self.total = 0  # bytes waiting, all streams

    def send_data(self, stream_id: int, data: bytes, end_stream: bool) -> int:
        """Send as the windows allow; returns the bytes that wait on the stream, -1 when it
        is ended already or h2 no longer has it."""
        waiting = self.streams.get(stream_id)
        if waiting is not None:
            if waiting.end:
                return -1
            if data:
                waiting.chunks.append(data)
                waiting.size += len(data)
                self.total += len(data)
            waiting.end = end_stream
            return waiting.size
        try:
            rest = self._send(stream_id, data, end_stream)
        except h2.exceptions.ProtocolError:
            return -1
        if rest:
            waiting = self.streams[stream_id] = _Waiting()
            waiting.chunks.append(rest)
            waiting.size = len(rest)
            waiting.end = end_stream
            self.total += len(rest)
        return len(rest)

    def _send(self, stream_id: int, data: bytes, end_stream: bool) -> bytes:
        """As much as the windows let through (with the end, if all of it); the rest is
        returned."""
        conn = self.conn
        window = conn.local_flow_control_window(stream_id)
        frame = conn.max_outbound_frame_size
        if len(data) <= window and len(data) <= frame:
            conn.send_data(stream_id, data, end_stream=end_stream)
            return b""
        view = memoryview(data)
        sent = 0
        end = min(window, len(data))
        while sent < end:
            step = min(frame, end - sent)
            last = end_stream and sent + step == len(data)
            conn.send_data(stream_id, view[sent : sent + step].tobytes(), end_stream=last)
            sent += step
        return data[sent:]

    def send_trailers(self, stream_id: int, headers: Headers) -> bool | None:
        """Trailers behind the bytes that wait: True when held, False when the stream ended
        already, None when nothing waits (the caller sends them at once)."""
        waiting = self.streams.get(stream_id)
        if waiting is None:
            return None
        if waiting.end:
            return False
        waiting.end = True
        waiting.trailers = headers
        return True

    def window_opened(self, stream_id: int) -> None:
        """A window opened (0: the connection's, or every stream's): send what waited."""
        sids = list(self.streams) if stream_id == 0 else [stream_id]
        for sid in sids:
            waiting = self.streams.get(sid)
            if waiting is None:
                continue
            data = b"".join(waiting.chunks)
            try:
                rest = self._send(sid, data, waiting.end and waiting.trailers is None)
            except h2.exceptions.ProtocolError:
                self.drop(sid)
                continue
            self.total -= len(data) - len(rest)
            waiting.chunks = [rest] if rest else []
            waiting.size = len(rest)
            if not rest:
                del self.streams[sid]
                if waiting.trailers is not None:
                    with contextlib.suppress(h2.exceptions.ProtocolError):
                        self.conn.send_headers(sid, waiting.trailers, end_stream=True)

    def drop(self, stream_id: int) -> None:
        waiting = self.streams.pop(stream_id, None)
        if waiting is not None:
            self.total -= waiting.size

    def waiting(self, stream_id: int) -> int:
        """Bytes waiting on the stream (0: on all)."""
        if stream_id == 0:
            return self.total
        waiting = self.streams.get(stream_id)
        return 0 if waiting is None else waiting.size

    def clear(self) -> None:
        self.streams.clear()
        self.total = 0
