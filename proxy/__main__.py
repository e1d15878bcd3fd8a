"""`python -m proxy` runs the `tls-sidecar` command."""

from .cli import main

if __name__ == "__main__":
    main()
