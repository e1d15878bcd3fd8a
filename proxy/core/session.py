"""What an exchange knows of the client's TLS connection (`Session`, one record per connection),
and why a downstream stops reading (`HOLD_*`). The downstream itself is `client_side.py`'s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from proxy.core.headers import ClientInfo
from proxy.identity import ClientIdentity

if TYPE_CHECKING:
    from proxy.core.links import Pool


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
