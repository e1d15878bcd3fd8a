"""HTTP/1.1 on llhttp through httptools: the client side, one connection to the app.

llhttp parses the app's responses; a Content-Length body that spans reads skips the parser
(counted and handed on as it arrived), and a fresh parser takes over after it.

A response's end is handed on only once llhttp has seen the rest of the read: any byte after a
complete response (a second answer nobody asked for, bytes after a 204, 304 or HEAD answer)
makes the connection unusable, so it is closed, never pooled, and the bytes reach no client.
"""

from __future__ import annotations

from typing import Any

from httptools import HttpResponseParser
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from proxy.core.headers import LOWER, Headers
from proxy.core.links import ClientCodec, ResponseSink
from proxy.http1._wire import CHUNKED, Stop, chunk, head_bytes


class HttptoolsClient(ClientCodec):
    """The client side of one connection to the app (see codec.ClientCodec)."""

    __slots__ = (
        "_body_left",
        "_bypass",
        "_chunked",
        "_done",
        "_ending",
        "_head_request",
        "_headers",
        "_in_body",
        "_informational",
        "_keep_alive",
        "_leftover",
        "_length",
        "_parser",
        "_reason",
        "_request_done",
        "_sink",
        "_stale",
        "_switching",
        "_te",
        "_until_close",
    )

    def __init__(self) -> None:
        self._parser = HttpResponseParser(self)
        self._sink: Any = None
        self._head_request = False
        self._chunked = False
        self._request_done = False
        self._leftover = b""
        self._stale = False
        self._reset()

    def _reset(self) -> None:
        self._done = False
        self._ending = False
        self._keep_alive = True
        self._until_close = False
        self._in_body = False
        self._body_left = 0
        self._bypass = False
        self._informational = False
        self._switching: tuple[int, bytes, Headers] | None = None
        self._headers: Headers = []
        self._reason = b""
        self._length: bytes | None = None
        self._te = False

    # --- the request ----------------------------------------------------------------------------
    def request_head(
        self, method: bytes, target: bytes, headers: Headers, *, chunked: bool
    ) -> bytes:
        self._head_request = method == b"HEAD"
        self._chunked = chunked
        self._request_done = False
        if chunked:  # the framing is HTTP/1.1's, so it is decided here, not in the core
            headers = [*headers, CHUNKED]
        return head_bytes(method + b" " + target + b" HTTP/1.1\r\n", headers)

    def request_data(self, data: bytes) -> list[bytes]:
        if self._chunked:
            return chunk(data) if data else []
        return [data]

    def request_end(self, trailers: Headers | None = None) -> bytes:
        """The end of the body; request trailers are not sent to an HTTP/1.1 app."""
        self._request_done = True
        return b"0\r\n\r\n" if self._chunked else b""

    # --- the response ---------------------------------------------------------------------------
    def feed(self, data: bytes, sink: ResponseSink) -> None:
        self._sink = sink
        if self._done:
            # The response is over and the app goes on talking (before our next request):
            # whatever it is, it answers nobody, and the connection is not used again.
            self._keep_alive = False
            return
        if self._bypass:
            left = self._body_left
            if len(data) < left:
                self._body_left = left - len(data)
                sink.response_data(data)
                return
            self._bypass = False
            self._stale = True
            self._body_left = 0
            if len(data) > left:
                self._keep_alive = False  # the app sent more than it declared
            sink.response_data(data[:left] if len(data) > left else data)
            self._complete()
            return
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._stale = True
            self._leftover = data[upgrade.args[0] :]
            if self._switching is not None:
                sink.response_informational(*self._switching)
            return
        except HttpParserCallbackError as raised:
            context = raised.__context__
            if not isinstance(context, Stop):
                if context is not None:
                    raise context from None
                sink.response_malformed(str(raised))
                return
            if self._head_request and self._ending and not _ends_read(data):
                self._keep_alive = False
        except HttpParserError as e:
            self._stale = True
            if self._ending:
                self._keep_alive = False  # not HTTP after a complete response
            else:
                sink.response_malformed(str(e) or "not HTTP")
                return
        if self._ending:
            # Handed on after the parser saw the whole read: `_keep_alive` now knows whether
            # anything followed the response (on_message_begin).
            self._ending = False
            sink.response_end()
        elif self._in_body and self._body_left > 0:
            self._bypass = True

    def feed_eof(self, sink: ResponseSink) -> None:
        if self._until_close and self._in_body and not self._done:
            self._keep_alive = False
            self._complete()

    # llhttp callbacks
    def on_message_begin(self) -> None:
        if self._done:  # a byte after a whole response: the app is not speaking HTTP with us
            self._keep_alive = False
            raise Stop

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.translate(LOWER)
        if name == b"content-length":
            self._length = value
        elif name == b"transfer-encoding":
            self._te = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                self._switching = (status, self._reason, self._headers)
            else:
                self._informational = True
                self._sink.response_informational(status, self._reason, self._headers)
                self._headers = []
                self._reason = b""
            return
        length = int(self._length) if self._length is not None and not self._te else None
        no_body = self._head_request or status in (204, 304)
        self._keep_alive = parser.should_keep_alive()
        self._in_body = not no_body
        self._body_left = 0 if no_body or length is None else length
        self._until_close = not no_body and length is None and not self._te
        self._sink.response_head(status, self._reason, self._headers, length)
        if self._head_request:  # llhttp cannot be told that a HEAD answer has no body
            self._stale = True
            self._done = self._ending = True
            self._in_body = False
            raise Stop

    def on_body(self, data: bytes) -> None:
        self._body_left -= len(data)
        self._sink.response_data(data)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        if self._switching is not None:
            return
        # Ended, but not handed on yet: feed does once llhttp has seen the rest of this read.
        self._done = self._ending = True
        self._in_body = False

    def _complete(self) -> None:
        self._done = True
        self._in_body = False
        self._sink.response_end()

    def recycle(self) -> bool:
        if not (self._done and self._request_done and self._keep_alive) or self._until_close:
            return False
        if self._stale:
            self._parser = HttpResponseParser(self)
            self._stale = False
        self._reset()
        self._sink = None  # idle in the pool: the exchange it served may go
        return True

    def take_leftover(self) -> bytes:
        leftover, self._leftover = self._leftover, b""
        return leftover


def _ends_read(data: bytes) -> bool:
    """Did a HEAD answer's head end exactly where this read ends? llhttp cannot be told that
    such an answer has no body, so it is stopped at the head without saying where; the head
    ended the read when its blank line is the only one in it, at its end. A read starting with
    a line end may have finished a blank line begun in the read before (then what follows it is
    more): such a connection is closed, to be safe, as is one with a 1xx in the same read."""
    return not data.startswith((b"\n", b"\r\n")) and data.find(b"\r\n\r\n") == len(data) - 4
