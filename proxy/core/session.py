"""The client's side of an exchange: what it knows of the client's TLS connection (`Session`,
one record per connection), and the `Downstream` it answers through (an HTTP/1.1 connection,
an HTTP/2 stream)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from proxy.core.headers import ClientInfo, Headers
from proxy.identity import ClientIdentity

if TYPE_CHECKING:
    from proxy.core.links import Pool, Tunnel


@dataclass(slots=True)
class Session:
    """What an exchange needs to know of the client's TLS connection."""

    client: ClientInfo
    tls_version: str = "-"
    identity: ClientIdentity | None = None
    denied: str | None = None  # why the client certificate is refused, if it is
    xfcc: bytes | None = None  # the X-Forwarded-Client-Cert value for an admitted identity
    sni: str | None = None  # the server name the client asked for
    cipher: str | None = None
    # --upstream-proxy-protocol: this connection's own pool of app connections (else the shared)
    pool: Pool | None = None
    # the access line's per-connection fields, encoded at the connection's first line
    access_facts: str | None = None
    access_identity: str | None = None


# Why a downstream stops reading; it reads again only when no reason is left.
HOLD_CONNECT: Final = 1  # waiting for an upstream connection
HOLD_PIPELINE: Final = 2  # a pipelined request waits until the current response is done
HOLD_UPSTREAM_FULL: Final = 4  # the app is not reading the request body fast enough


class Downstream(Protocol):
    """The client side of one exchange: an HTTP/1.1 connection, or an HTTP/2 stream."""

    session: Session

    def cork(self) -> None: ...
    def uncork(self) -> None: ...
    def send_head(
        self, status: int, reason: bytes, headers: Headers, length: int | None
    ) -> None: ...
    def send_data(self, data: bytes) -> None: ...
    def send_trailers(self, headers: Headers) -> None: ...
    def send_end(self) -> None: ...
    def send_informational(self, status: int, reason: bytes, headers: Headers) -> None: ...
    def send_local(self, status: int, headers: Headers, body: bytes) -> None: ...
    def switch_protocols(self, tunnel: Tunnel) -> None: ...
    def hold(self, reason: int) -> None: ...
    def release(self, reason: int) -> None: ...
    def arm(self, phase: str, timeout: float) -> None: ...
    def exchange_done(self) -> None: ...
    def abort_all(self) -> None: ...
