"""`python -m proxy` runs the `tls-sidecar` command."""

from proxy.cli import main

if __name__ == "__main__":
    main()
