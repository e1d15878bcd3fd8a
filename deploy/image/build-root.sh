#!/bin/sh
# The image's build steps, in one place: the Dockerfile runs them on python:3.13-slim-trixie,
# and tests/e2e/test_image_root.py runs them on a Debian 13 root filesystem made with
# debootstrap (there is no container engine in CI), so the two cannot drift.
#
#   build-root.sh deps LOCKFILE   the build stage: a virtual environment without pip in
#                                 /opt/tls-sidecar, and the pinned dependencies (hashes checked)
#   build-root.sh package SOURCE  the build stage: the package itself, nothing else
#   build-root.sh harden          the final stage: no pip, no shell (run it last: it removes
#                                 the shell it runs in)
#
# pip runs from a throwaway environment (/opt/build-pip) and installs into the sidecar's with
# --python, so the sidecar's environment never holds pip; `harden` removes the throwaway one
# and the base's own pip.
set -eu

VENV=/opt/tls-sidecar
BUILD_PIP=/opt/build-pip
PYTHON=python3
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

pip_install() {
    if [ ! -x "$BUILD_PIP/bin/python" ]; then
        "$PYTHON" -m venv "$BUILD_PIP"
    fi
    "$BUILD_PIP/bin/python" -m pip --python "$VENV/bin/python" install --quiet "$@"
}

case "${1:-}" in
deps)
    "$PYTHON" -m venv --without-pip "$VENV"
    pip_install --require-hashes --no-deps -r "$2"
    ;;
package)
    # a wheel built in a scratch folder: the source may be read-only. setup.py builds the
    # optional nghttp2 codec where a compiler and libnghttp2's headers are; an in-place build
    # from a developer's editable install is not shipped.
    build=$(mktemp -d)
    cp -R "$2/pyproject.toml" "$2/setup.py" "$2/README.md" "$2/proxy" "$build/"
    rm -f "$build"/proxy/http2/_nghttp2*.so "$build"/proxy/http2/_nghttp2.c
    pip_install --no-deps "$build"
    rm -rf "$build"
    ;;
harden)
    # No pip (nothing installs at run time) ...
    rm -rf "$BUILD_PIP"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip uninstall --yes --quiet pip
    fi
    if "$PYTHON" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        echo "build-root.sh: pip is still importable" >&2
        exit 1
    fi
    # ... and no shell (nothing for an attacker to exec into). Last: this removes our own shell.
    exec /bin/rm -f /bin/sh /bin/bash /bin/dash /usr/bin/sh /usr/bin/bash /usr/bin/dash
    ;;
*)
    echo "usage: build-root.sh deps LOCKFILE | package SOURCE | harden" >&2
    exit 2
    ;;
esac
