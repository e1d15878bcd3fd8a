"""`python -m proxy.metrics` prints the README's metrics table."""

from proxy.metrics.table import reference

print(reference(), end="")
