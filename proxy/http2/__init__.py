"""HTTP/2: the codecs (nghttp2, h2; server and client side), the client connection, h2c to
the app.

The codec registry lives here: `--http2-codec` names a codec, resolved once per process
by import string (as `http1` does for `--http`), so a process running one codec never loads
the other's module: nghttp2's never imports h2, and h2's never loads the C extension."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from proxy.config import NGHTTP2_HOW_TO_BUILD as HOW_TO_BUILD
from proxy.config import nghttp2_built

__all__ = [
    "CODECS",
    "HOW_TO_BUILD",
    "available",
    "client_codec_class",
    "client_codec_name",
    "resolve",
    "server_codec_class",
]

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.http2.client_codec import ClientSettings, Http2ClientCodec
    from proxy.http2.codec import CodecSettings, Http2ServerCodec

CODECS = ("nghttp2", "h2")
SERVER_CODECS = {
    "nghttp2": "proxy.http2.nghttp2_codec:Nghttp2ServerCodec",
    "h2": "proxy.http2.h2_codec:H2ServerCodec",
}
# the h2c client side to the app, chosen by the same flag
CLIENT_CODECS = {
    "nghttp2": "proxy.http2.nghttp2_client:Nghttp2ClientCodec",
    "h2": "proxy.http2.h2_client:H2ClientCodec",
}


def available(name: str) -> bool:
    """Whether the codec can run here: h2 always, nghttp2 when its extension loads."""
    return name == "h2" or (name == "nghttp2" and nghttp2_built())


def resolve(name: str) -> str:
    """`auto` is nghttp2 when its extension is built, as `--http auto` picks httptools."""
    if name == "auto":
        return "nghttp2" if available("nghttp2") else "h2"
    return name


def client_codec_name(name: str) -> str:
    """The h2c client codec for `--http2-codec` (`name`, unresolved): the clients' side's,
    or h2 when nghttp2 is not built (for `auto`: an explicit `nghttp2` that is not built
    stops start-up, in Config.validate)."""
    resolved = resolve(name)
    return resolved if available(resolved) else "h2"


def _load(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def server_codec_class(name: str) -> Callable[[CodecSettings], Http2ServerCodec]:
    """The server codec's class (`name` as `resolve` returns it)."""
    return _load(SERVER_CODECS[name])  # type: ignore[no-any-return]


def client_codec_class(name: str) -> Callable[[ClientSettings], Http2ClientCodec]:
    """The h2c client codec's class (`name` as `resolve` returns it)."""
    return _load(CLIENT_CODECS[name])  # type: ignore[no-any-return]
