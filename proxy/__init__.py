"""tls-sidecar: a TLS-terminating reverse proxy to run beside a web app."""

import os

__version__ = "0.1.0"

# TLS_SIDECAR_COMPILED=0: the compiled core's modules run from their sources (an interpreted
# run of the same install, for tests and comparisons). Read here, before any of them loads.
if os.environ.get("TLS_SIDECAR_COMPILED") == "0":
    from proxy import compiled as _compiled

    _compiled.run_interpreted()
