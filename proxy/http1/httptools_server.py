"""HTTP/1.1 on llhttp through httptools (the parser of Node.js and uvicorn): the default codec.
This module is the server side (and what both sides share); codec_httptools_client the other.

llhttp parses (with none of its leniencies on); we write. Content-Length bodies skip the parser:
they are counted and handed on as they arrived.
"""

from __future__ import annotations

import re
from typing import Final

from httptools import HttpRequestParser
from httptools.parser.errors import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from proxy.core.headers import LOWER, Headers, reason_phrase
from proxy.core.request import BadRequest, read_head
from proxy.http1._wire import BARE_LF, Stop, chunk, head_bytes
from proxy.http1.codec import DETACHED, RequestSink, ServerCodec

# The methods llhttp parses itself; for any other token (RFC 9110 §9.1 allows extensions) the
# httptools codec gives llhttp a stand-in and hands on the real one.
LLHTTP_METHODS: Final = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY PRI".split()
)


_STATUS_LINES: Final = {code: b"HTTP/1.1 %d " % code for code in range(100, 600)}
_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")

# Response framing towards the client.
_NONE: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CLOSE: Final = 3
_MAX_CHUNK_DIGITS: Final = 20
_CARRY: Final = 4096
# What the server codec expects next from the client.
_HEAD: Final = 0
_LENGTH_BODY: Final = 1
_CHUNKED_BODY: Final = 2


def _parse_error(error: HttpParserError) -> BadRequest:
    message = str(error) or "malformed request"
    if message == "Invalid HTTP version":
        return BadRequest("version_not_supported", f"{message}: only HTTP/1.0 and HTTP/1.1")
    return BadRequest("bad_request", message)


class HttptoolsServer(ServerCodec):
    """The server side of one client connection (see codec.ServerCodec).

    The codec finds each message's bounds itself and gives llhttp one message at a time: the
    head whole (located by its blank line, so its raw bytes can be checked and its size is
    exact), a chunked body in slices that end at line ends (a message can only end at one),
    and never a Content-Length body, which is counted and handed on as it arrived. Whatever
    follows a message waits in `_pending` until the connection asks for the next one: that is
    pipelining, data after `Connection: close` (dropped), and the bytes after an upgrade.
    """

    __slots__ = (
        "_carry",
        "_closed_input",
        "_head_method",
        "_headers",
        "_keep_alive",
        "_left",
        "_line",
        "_max_head",
        "_method",
        "_mode",
        "_parser",
        "_pending",
        "_responding",
        "_scanned",
        "_size",
        "_state",
        "_stopped",
        "_trailers",
        "_url",
        "_version",
        "sink",
    )

    def __init__(self, sink: RequestSink, max_header_bytes: int) -> None:
        self.sink = sink
        self.paused = False
        self._max_head = max_header_bytes
        self._parser = HttpRequestParser(self)
        self._pending = b""  # bytes not taken yet: a partial head, or what waits behind a request
        self._scanned = 0  # how much of a partial head in `_pending` was searched already
        self._state = _HEAD
        self._left = 0  # Content-Length body bytes still to come
        self._line: tuple[bytes, int, int] = (b"", 0, 0)  # the chunked-body slice being parsed
        self._carry = b""  # the start of a chunked-body line that goes on in the next read
        self._stopped = False
        self._closed_input = False
        self._url = b""
        self._headers: Headers = []
        self._size = 0
        self._head_method = b""
        self._keep_alive = True
        self._method = b""
        self._version = b"1.1"
        self._mode = _LENGTH
        self._responding = False
        self._trailers: Headers | None = None

    # --- input ----------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self._closed_input or self._stopped:
            return
        if self.paused:
            self._pending += data  # behind the current request; the connection stops reading
            return
        if self._pending:
            data, self._pending = self._pending + data, b""
        self._take(data)

    def take_leftover(self) -> bytes:
        self._closed_input = True  # from now on the bytes belong to the tunnel
        leftover, self._pending = self._pending, b""
        return leftover

    def stop(self) -> None:
        self._stopped = True

    def detach(self) -> None:
        self._stopped = True
        self.sink = DETACHED
        self._pending = b""

    def _take(self, data: bytes) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            if self._stopped or self._closed_input:
                return
            if self.paused:
                self._pending = data[pos:]
                return
            state = self._state
            if state == _HEAD:
                pos = self._take_head(data, pos)
            elif state == _LENGTH_BODY:
                take = min(self._left, end - pos)
                piece = data if take == end else data[pos : pos + take]
                pos += take
                self._left -= take
                if not self._left:
                    self._parser = HttpRequestParser(self)  # it saw the head, not the body
                    self._state = _HEAD
                self.sink.on_request_data(piece)
                if not self._left and not self._stopped:
                    self._message_complete()
            else:
                pos = self._take_chunked(data, pos)

    def _take_head(self, data: bytes, pos: int) -> int:
        # A head arriving in pieces is searched only where it is new (its first `_scanned`
        # bytes were searched before): a client trickling bytes costs linear work, not square.
        scanned = self._scanned
        self._scanned = 0
        blank = data.find(b"\r\n\r\n", max(pos, pos + scanned - 3))
        if blank < 0:
            if len(data) - pos > self._max_head:
                raise BadRequest("header_too_large", f"request head over {self._max_head} bytes")
            if BARE_LF.search(data, pos + scanned):
                raise BadRequest("bad_request", "line ending without CR in the head")
            self._pending = data[pos:]  # the rest of the head is still to come
            self._scanned = len(data) - pos
            return len(data)
        end = blank + 4
        head = data if pos == 0 and end == len(data) else data[pos:end]  # whole: no copy
        if len(head) > self._max_head:
            raise BadRequest("header_too_large", f"request head over {self._max_head} bytes")
        if head.count(b"\n") != head.count(b"\r\n"):
            raise BadRequest("bad_request", "line ending without CR in the head")
        line = head[: head.find(b"\r\n")]
        if line.count(b" ") != 2:
            raise BadRequest("bad_request", "malformed request line")
        method = line[: line.find(b" ")]
        if method not in LLHTTP_METHODS:
            # llhttp knows a fixed list of methods; RFC 9110 §9.1 allows any token (h11, nginx
            # and Envoy take them): llhttp parses a stand-in, and the real one is handed on.
            if not _TOKEN.fullmatch(method):
                raise BadRequest("bad_request", "malformed method")
            head = b"GET" + head[len(method) :]
        self._head_method = method  # what llhttp parsed, or the method it parsed a stand-in for
        self._size = len(head)
        self._url = b""
        self._headers = []
        self._execute(head)
        return end

    def _take_chunked(self, data: bytes, pos: int) -> int:
        view = memoryview(data)
        end = len(data)
        while pos < end and self._state == _CHUNKED_BODY and not self._stopped:
            newline = data.find(b"\n", pos)
            stop = end if newline < 0 else newline + 1
            self._line = (data, pos, stop)
            self._execute(view[pos:stop])
            if newline < 0 and self._state == _CHUNKED_BODY:
                # a line goes on in the next read: keep its start (a chunk-size line is short)
                self._carry = (self._carry + data[pos:stop])[-_CARRY:]
            else:
                self._carry = b""
            pos = stop
        return pos

    def on_chunk_header(self) -> None:
        # llhttp takes any number of leading zeros in a chunk size, h11 at most 20 digits: the
        # proxy keeps to the stricter (the line ends the slice being parsed, see _take_chunked).
        data, start, stop = self._line
        size = (self._carry + data[start:stop]).split(b";", 1)[0].strip()
        if len(size) > _MAX_CHUNK_DIGITS:
            raise BadRequest("bad_request", "chunk size longer than 20 hex digits")

    def _execute(self, data: bytes | memoryview) -> None:
        try:
            self._parser.feed_data(data)
        except HttpParserUpgrade:
            # llhttp stops after an upgrade request's head, and skips a body it declares;
            # the body (Content-Length) is taken as any other, and what follows waits.
            self._parser = HttpRequestParser(self)
        except HttpParserCallbackError as raised:
            context = raised.__context__
            if isinstance(context, Stop):
                return
            if context is not None:
                raise context from None
            raise _parse_error(raised) from None
        except HttpParserError as e:
            raise _parse_error(e) from None

    # llhttp callbacks (found by name by httptools; a missing one costs nothing per message)
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops the OWS before a value but keeps the OWS after it; h11 (and RFC 9110
        # §5.5) drop both, so both codecs hand on the same value
        if value and value[-1] in (32, 9):  # a space or a tab
            value = value.rstrip(b" \t")
        self._headers.append((name.translate(LOWER), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise BadRequest("version_not_supported", "only HTTP/1.0 and HTTP/1.1")
        method = self._head_method
        # the size as read_head measures it (method, target, names and values + 4 each)
        head = read_head(method, self._url, version, self._headers, self._size - 15)
        self._keep_alive = head.keep_alive
        self._method = method
        self._version = version
        if head.chunked:
            self._state = _CHUNKED_BODY
        elif head.content_length:
            self._state = _LENGTH_BODY
            self._left = head.content_length
        self.sink.on_request_head(head)
        if self._stopped:
            raise Stop

    def on_body(self, data: bytes) -> None:
        self.sink.on_request_data(data)
        if self._stopped:
            raise Stop

    def on_message_complete(self) -> None:
        if self._state == _LENGTH_BODY:
            return  # an upgrade request's body, which llhttp skipped: taken by _take
        self._state = _HEAD
        self._message_complete()
        if self._stopped:
            raise Stop

    def _message_complete(self) -> None:
        if not self._keep_alive:
            self._closed_input = True  # RFC 9112 §9.6: what follows `close` is ignored
        self.paused = True  # set first: the sink may finish the exchange and resume at once
        self.sink.on_request_end()

    # --- output ---------------------------------------------------------------------------------
    def response_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> bytes:
        """The head for the client; `headers` (ours to extend) carry no Transfer-Encoding."""
        if self._method == b"HEAD" or status in (204, 304):
            self._mode = _NONE
        elif length is not None:
            self._mode = _LENGTH
        elif self._version == b"1.1":
            self._mode = _CHUNKED
            headers.append((b"transfer-encoding", b"chunked"))
        else:
            self._mode = _CLOSE
            self._keep_alive = False
        if not self._keep_alive:
            headers.append((b"connection", b"close"))
        self._responding = True
        return head_bytes(
            (_STATUS_LINES.get(status) or b"HTTP/1.1 %d " % status) + reason + b"\r\n", headers
        )

    def response_data(self, data: bytes) -> list[bytes]:
        mode = self._mode
        if mode == _CHUNKED:
            return chunk(data) if data else []
        return [] if mode == _NONE else [data]

    def response_trailers(self, headers: Headers) -> None:
        if self._mode == _CHUNKED:
            self._trailers = headers

    def response_end(self) -> bytes:
        if self._mode != _CHUNKED:
            return b""
        trailers = self._trailers
        if trailers:
            self._trailers = None
            return head_bytes(b"0\r\n", trailers)  # the last chunk, then the trailer section
        return b"0\r\n\r\n"

    def informational(self, status: int, reason: bytes, headers: Headers) -> bytes:
        return head_bytes((_STATUS_LINES.get(status) or b"") + reason + b"\r\n", headers)

    def local_response(self, status: int, headers: Headers, body: bytes) -> list[bytes] | None:
        if self._responding:
            return None
        self.stop()
        self._keep_alive = False
        self._mode = _LENGTH
        head = head_bytes(
            (_STATUS_LINES.get(status) or b"HTTP/1.1 %d " % status)
            + reason_phrase(status)
            + b"\r\n",
            [*headers, (b"content-length", b"%d" % len(body)), (b"connection", b"close")],
        )
        return [head, body]

    def next_cycle(self) -> bool:
        if not self._keep_alive or self._closed_input or self._stopped:
            return False
        self.paused = False
        self._responding = False
        if self._pending:
            data, self._pending = self._pending, b""
            self._take(data)
        return True
