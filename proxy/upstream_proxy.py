"""--upstream-proxy-protocol: the app's connections are opened per client connection, each
starting with a PROXY header (v1, or v2 with TLVs as ghostunnel sends them) that says who the
client is. A client connection's pool is its own, so an app connection never carries two
clients; it is closed with the client connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from proxy import proxy_protocol as pp

if TYPE_CHECKING:
    from proxy.core.links import Pool
    from proxy.core.session import Session

ProxyVersion = Literal["v1", "v2"]


def header_for(
    version: ProxyVersion,
    session: Session,
    source: tuple[str, int],
    destination: tuple[str, int],
    alpn: str | None,
) -> bytes:
    """The header the app gets first on each connection made for this client connection."""
    if version == "v1":
        return pp.build_v1(source, destination)
    tlvs: list[tuple[int, bytes]] = []
    if alpn:
        tlvs.append((pp.TLV_ALPN, alpn.encode("ascii")))
    if session.sni:
        tlvs.append((pp.TLV_AUTHORITY, session.sni.encode("idna")))
    identity = session.identity
    cn = identity.common_names[0] if identity is not None and identity.common_names else None
    ssl = pp.ssl_value(
        client_cert=identity is not None,  # an unverified certificate never gets this far
        version=session.tls_version if session.tls_version != "-" else None,
        cn=cn,
    )
    tlvs.append((pp.TLV_SSL, ssl))
    spiffe = next(
        (uri for uri in (identity.uri_sans if identity else ()) if uri.startswith("spiffe://")),
        None,
    )
    if spiffe is not None:
        tlvs.append((pp.TLV_SPIFFE_ID, spiffe.encode("utf-8")))
    return pp.build_v2(source, destination, tlvs)


class ClientPools:
    """Opens and closes the pool of each client connection. `new_pool(preface)` makes a pool of
    the upstream kind whose every connection begins with `preface` (the server supplies it)."""

    def __init__(self, version: ProxyVersion, new_pool: Callable[[bytes], Pool]) -> None:
        self.version: ProxyVersion = version
        self.new_pool = new_pool

    def open(
        self,
        session: Session,
        source: tuple[str, int],
        destination: tuple[str, int],
        alpn: str | None,
    ) -> Pool:
        return self.new_pool(header_for(self.version, session, source, destination, alpn))

    def close(self, pool: Pool) -> None:
        pool.close_idle()
