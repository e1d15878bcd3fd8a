"""The codec pairs HTTP/2 tests run with.

Every HTTP/2 test runs once per HTTP/2 server codec; the HTTP/1.1 codec to the app goes with
it rather than across it (nghttp2 with httptools: the fast pair, the default; h2 with h11: the
strict pure-Python pair), so the HTTP/2 suites take as long as before and each HTTP/1.1 codec
still carries HTTP/2 traffic to the app. A module opts in by overriding conftest's
`codec_env` with `http2_env(http2_codec)`; tests that start a proxy of their own pass the same
environment to it.
"""

from __future__ import annotations

# the HTTP/1.1 codec (to the app) that goes with each HTTP/2 codec (to the client)
PAIRED = {"nghttp2": "httptools", "h2": "h11"}


def http2_env(http2_codec: str) -> dict[str, str]:
    """The environment that runs a proxy with this HTTP/2 codec and its HTTP/1.1 pair."""
    return {"TLS_SIDECAR_HTTP2_CODEC": http2_codec, "TLS_SIDECAR_HTTP": PAIRED[http2_codec]}
