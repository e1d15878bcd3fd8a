"""The commands besides `serve`: check, demo, inject, certs. `serve` never imports these."""
