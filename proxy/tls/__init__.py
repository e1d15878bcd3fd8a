"""TLS: certificate material, contexts, handshakes and reloads."""
