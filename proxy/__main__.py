"""`python -m proxy` runs the `tls-sidecar` command."""

from proxy.log import hold_warnings

# Before the imports below: a warning they raise is logged in the configured format.
hold_warnings()

from proxy.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
