"""h2's connection, kept open by a GOAWAY: for both HTTP/2 sides of the proxy.

RFC 9113 §6.8: a GOAWAY stops new streams, while the streams at or below its last stream id
may still complete. A client may say GOAWAY right after a response's head and still read its
body (the AWS SDK's HTTP/2 handler does), and an app stopping with a grace period (a rollout)
says GOAWAY and answers the calls it took. h2 instead closes its state machine on any GOAWAY
it receives, refusing every frame after it (even in the same read), and drops the frames it
had queued (python-hyper/h2#1181, open since 2019). Here the connection stays open: whoever
gets the ConnectionTerminated event opens no new stream, refuses the peer's, and closes the
connection when its streams are done (at once for an error code). It also remembers fewer
closed streams than h2 does (`MAX_CLOSED_STREAMS`), so a long-lived connection's memory stays
flat, and keeps its settings in lists rather than deques (`CompactSettings`), which an idle
connection notices.
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.settings
import h2.stream
from h2.connection import ConnectionInputs, ConnectionState

_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)


class _StaysOpen(h2.connection.H2ConnectionStateMachine):
    def process_input(self, input_: ConnectionInputs) -> list[Any]:
        if input_ is ConnectionInputs.RECV_GOAWAY and self.state in _OPEN:
            return []
        return super().process_input(input_)


class _Values(list[Any]):
    """One setting's values: the current one first, then those awaiting acknowledgement."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class CompactSettings(h2.settings.Settings):
    """h2's settings, each setting's values in a list: h2 gives every setting a deque, 760
    bytes for what is nearly always one value, twelve or more per connection (~9 KiB, an
    eighth of an idle connection). Only h2's `append`, `popleft` and `[0]` are used on them."""

    def __init__(self, client: bool = True, initial_values: dict[Any, int] | None = None) -> None:
        super().__init__(client, initial_values)
        compact = {key: _Values(values) for key, values in self._settings.items()}
        self._settings = compact  # type: ignore[assignment]  # the deque's API, as h2 uses it

    def __setitem__(self, key: Any, value: int) -> None:
        if key not in self._settings:  # a setting first heard of: h2 would make a deque
            self._settings[key] = _Values([None])  # type: ignore[assignment]
        super().__setitem__(key, value)


class H2Connection(h2.connection.H2Connection):
    # h2 remembers how each closed stream ended, for frames still in flight after a reset (a
    # stream error then, not a connection error): 65,536 records by default, 8-12 MiB that a
    # long-lived connection fills in its first 65k streams and never gives back. Frames in
    # flight arrive within a round trip; 2,048 is twenty rounds of 100 streams, ~400 KiB.
    MAX_CLOSED_STREAMS = 2048

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state_machine = _StaysOpen()
        local, client_side = self.local_settings, self.config.client_side
        self.local_settings = CompactSettings(client_side, {key: local[key] for key in local})
        self.remote_settings = CompactSettings(not client_side)  # h2's defaults, as before

    def clear_outbound_data_buffer(self) -> None:
        """Frames queued before the peer's GOAWAY still go out: they answer streams it keeps."""


class _LengthCheckedByUs(h2.stream.H2Stream):
    """h2 checks a request's Content-Length against its DATA as a connection error, ending
    every stream for one client's mistake; RFC 9113 §8.1.1 makes it a stream error. The
    connection checks it instead (`http2.server.Http2Connection._body_length_wrong`), so h2 does not."""

    def _initialize_content_length(self, headers: Any) -> None:
        return None

    def _track_content_length(self, length: int, end_stream: bool) -> None:
        return None


class ServerH2Connection(H2Connection):
    """The client-facing side: request bodies' lengths are the proxy's to check."""

    def _begin_new_stream(
        self, stream_id: int, allowed_ids: h2.connection.AllowedStreamIDs
    ) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _LengthCheckedByUs
        return stream
