"""The client side of one exchange (`Downstream`): an HTTP/1.1 connection, or an HTTP/2 stream.
Its own module: it is a timer (`PhaseTimer`), and the timer's context must not import back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.compiled import mypyc_attr
from proxy.core.headers import Headers
from proxy.core.session import Session
from proxy.core.timer import PhaseTimer

if TYPE_CHECKING:
    from proxy.core.links import Tunnel


# A native class, not a Protocol: compiled, a call through a Protocol goes by name (85 ns),
# through a native base by its vtable (6 ns); an HTTP/1.1 connection and an HTTP/2 stream are
# Downstreams, and the tests' fake is an interpreted subclass.
@mypyc_attr(allow_interpreted_subclasses=True)
class Downstream(PhaseTimer):
    """The client side of one exchange: an HTTP/1.1 connection, or an HTTP/2 stream. Every
    method is its subclasses' to define (`test_compiled_sources.py` checks they do)."""

    __slots__ = ("session",)

    session: Session

    def cork(self) -> None:
        raise NotImplementedError

    def uncork(self) -> None:
        raise NotImplementedError

    def send_head(self, status: int, reason: bytes, headers: Headers, length: int | None) -> None:
        raise NotImplementedError

    def send_data(self, data: bytes) -> None:
        raise NotImplementedError

    def send_trailers(self, headers: Headers) -> None:
        raise NotImplementedError

    def send_end(self) -> None:
        raise NotImplementedError

    def send_informational(self, status: int, reason: bytes, headers: Headers) -> None:
        raise NotImplementedError

    def send_local(self, status: int, headers: Headers, body: bytes) -> None:
        raise NotImplementedError

    def switch_protocols(self, tunnel: Tunnel) -> None:
        raise NotImplementedError

    def hold(self, reason: int) -> None:
        raise NotImplementedError

    def release(self, reason: int) -> None:
        raise NotImplementedError

    def exchange_done(self) -> None:
        raise NotImplementedError

    def abort_all(self) -> None:
        raise NotImplementedError
