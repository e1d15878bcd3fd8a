"""Load-test harness for tls-sidecar (see loadtest/README.md)."""
