"""HTTP/1.1: the codecs (httptools, h11), the client connection, the app connections.

The codec registry lives here: `--http` names a codec, resolved once per process by import
string (as uvicorn does), so a process running one codec does not load the other and no codec
module imports the registry back."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from proxy.core.links import ClientCodec
    from proxy.http1.codec import RequestSink, ServerCodec

CODECS = ("httptools", "h11")
SERVER_CODECS = {
    "httptools": "proxy.http1.httptools_server:HttptoolsServer",
    "h11": "proxy.http1.h11_codec:H11Server",
}
CLIENT_CODECS = {
    "httptools": "proxy.http1.httptools_client:HttptoolsClient",
    "h11": "proxy.http1.h11_codec:H11Client",
}


def available(name: str) -> bool:
    return name == "h11" or importlib.util.find_spec(name) is not None


def resolve(name: str) -> str:
    """`auto` is httptools when it can be imported, as uvicorn's --http does."""
    if name == "auto":
        return "httptools" if available("httptools") else "h11"
    return name


def _load(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module), attribute)


def server_codec_class(name: str) -> Callable[[RequestSink, int], ServerCodec]:
    """The server codec's class (`name` as `resolve` returns it)."""
    return _load(SERVER_CODECS[name])  # type: ignore[no-any-return]


def client_codec_class(name: str) -> Callable[[], ClientCodec]:
    return _load(CLIENT_CODECS[name])  # type: ignore[no-any-return]
