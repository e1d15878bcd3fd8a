"""What an exchange knows of the client's TLS connection: one record per connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

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
