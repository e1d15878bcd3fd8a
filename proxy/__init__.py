"""tls-sidecar: a TLS-terminating reverse proxy to run beside a web app."""

__version__ = "0.1.0"
