"""The protocol-neutral core: one exchange per request, the checks and rewrites it applies."""
